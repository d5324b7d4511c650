//! ViT architecture presets shared by the trainer (tch) and the ONNX writer.
//!
//! The layout is DINOv2's as published by timm (`vit_*_patch14_dinov2`): patch 14, CLS token,
//! optional register tokens, LayerNorm eps 1e-6, GELU MLP with ratio 4, LayerScale.

use serde::{Deserialize, Serialize};

use crate::Error;

/// Patch size of every RedDino/DINOv2 model.
pub const PATCH_SIZE: usize = 14;
/// LayerNorm epsilon of DINOv2.
pub const LN_EPS: f32 = 1e-6;

/// A ViT preset name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 192-d, 4 layers, 3 heads: tests and CPU demos.
    Tiny,
    /// 384-d, 12 layers, 6 heads (ViT-S/14, 22M parameters).
    Small,
    /// 768-d, 12 layers, 12 heads (ViT-B/14, 86M parameters).
    Base,
    /// 1024-d, 24 layers, 16 heads (ViT-L/14, 304M parameters).
    Large,
}

impl Preset {
    /// All presets, smallest first.
    pub const ALL: [Preset; 4] = [Preset::Tiny, Preset::Small, Preset::Base, Preset::Large];

    /// Lower-case name (`tiny`, `small`, `base`, `large`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
            Preset::Large => "large",
        }
    }

    /// Parses a preset name; accepts the one-letter forms `t`, `s`, `b`, `l`.
    pub fn parse(s: &str) -> Result<Preset, Error> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" | "t" => Ok(Preset::Tiny),
            "small" | "s" => Ok(Preset::Small),
            "base" | "b" => Ok(Preset::Base),
            "large" | "l" => Ok(Preset::Large),
            other => Err(Error::Config(format!(
                "unknown ViT preset `{other}`; expected one of tiny, small, base, large"
            ))),
        }
    }

    /// (embed_dim, depth, num_heads).
    fn dims(self) -> (usize, usize, usize) {
        match self {
            Preset::Tiny => (192, 4, 3),
            Preset::Small => (384, 12, 6),
            Preset::Base => (768, 12, 12),
            Preset::Large => (1024, 24, 16),
        }
    }
}

/// Everything needed to build a ViT of the RedDino family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Token width.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Hidden width of the MLP (4 x embed_dim for DINOv2).
    pub mlp_hidden: usize,
    /// Register tokens placed after the CLS token (0 for RedDino).
    #[serde(default)]
    pub num_registers: usize,
    /// Square input side in pixels; a multiple of [`PATCH_SIZE`].
    pub img_size: usize,
    /// Whether blocks carry LayerScale gammas.
    #[serde(default = "default_true")]
    pub layer_scale: bool,
}

fn default_true() -> bool {
    true
}

impl VitConfig {
    /// The preset at the given input size.
    pub fn preset(preset: Preset, img_size: usize) -> Result<Self, Error> {
        let (embed_dim, depth, num_heads) = preset.dims();
        let cfg = VitConfig {
            embed_dim,
            depth,
            num_heads,
            mlp_hidden: 4 * embed_dim,
            num_registers: 0,
            img_size,
            layer_scale: true,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the dimensions are consistent.
    pub fn validate(&self) -> Result<(), Error> {
        if self.img_size == 0 || self.img_size % PATCH_SIZE != 0 {
            return Err(Error::Config(format!(
                "input size {} is not a positive multiple of the patch size {PATCH_SIZE} \
                 (try {} or {})",
                self.img_size,
                (self.img_size / PATCH_SIZE).max(1) * PATCH_SIZE,
                (self.img_size / PATCH_SIZE + 1) * PATCH_SIZE
            )));
        }
        if self.embed_dim == 0 || self.depth == 0 || self.num_heads == 0 || self.mlp_hidden == 0 {
            return Err(Error::Config("ViT dimensions must all be positive".into()));
        }
        if self.embed_dim % self.num_heads != 0 {
            return Err(Error::Config(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            )));
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.img_size / PATCH_SIZE
    }

    /// Number of patch tokens.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Tokens in the sequence: CLS + registers + patches.
    pub fn num_tokens(&self) -> usize {
        1 + self.num_registers + self.num_patches()
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// The preset these dimensions match, if any.
    pub fn preset_name(&self) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| {
            let (d, l, h) = p.dims();
            d == self.embed_dim && l == self.depth && h == self.num_heads
        })
    }

    /// Number of parameters of the backbone (pos-embed at this input size).
    pub fn num_params(&self) -> usize {
        let d = self.embed_dim;
        let patch = 3 * PATCH_SIZE * PATCH_SIZE * d + d;
        let tokens = d + self.num_registers * d + self.num_patches() * d + d;
        let ls = if self.layer_scale { 2 * d } else { 0 };
        let block = 4 * d
            + (3 * d * d + 3 * d)
            + (d * d + d)
            + (d * self.mlp_hidden + self.mlp_hidden)
            + (self.mlp_hidden * d + d)
            + ls;
        patch + tokens + self.depth * block + 2 * d
    }

    /// Multiply-accumulate count of one forward pass for one image.
    pub fn macs_per_image(&self) -> u64 {
        let t = self.num_tokens() as u64;
        let d = self.embed_dim as u64;
        let p = self.num_patches() as u64;
        let h = self.mlp_hidden as u64;
        let patch = p * d * 3 * (PATCH_SIZE * PATCH_SIZE) as u64;
        let per_block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * h;
        patch + self.depth as u64 * per_block
    }
}

/// ImageNet normalisation used by DINOv2 and RedDino.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation used by DINOv2 and RedDino.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_dinov2() {
        let s = VitConfig::preset(Preset::Small, 224).unwrap();
        assert_eq!(
            (s.embed_dim, s.depth, s.num_heads, s.mlp_hidden),
            (384, 12, 6, 1536)
        );
        assert_eq!(s.num_tokens(), 257);
        // timm vit_small_patch14_dinov2 at img_size=224.
        assert_eq!(s.num_params(), 21_628_800);
        let l = VitConfig::preset(Preset::Large, 224).unwrap();
        assert_eq!((l.embed_dim, l.depth, l.num_heads), (1024, 24, 16));
        assert_eq!(l.preset_name(), Some(Preset::Large));
    }

    #[test]
    fn input_size_must_be_multiple_of_patch() {
        let err = VitConfig::preset(Preset::Tiny, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiple of the patch size 14"), "{err}");
        assert!(err.contains("98") && err.contains("112"), "{err}");
        assert!(VitConfig::preset(Preset::Tiny, 112).is_ok());
    }

    #[test]
    fn preset_parse() {
        assert_eq!(Preset::parse("S").unwrap(), Preset::Small);
        assert!(Preset::parse("huge")
            .unwrap_err()
            .to_string()
            .contains("huge"));
    }
}
