//! The RedDino/DINOv2 ViT in tch, with timm's parameter names (`cls_token`, `pos_embed`,
//! `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
//! ls2.gamma}`, `norm`) so that a checkpoint is a safetensors file `reddino-models` reads.
//!
//! Extras over the inference graph: `mask_token` (iBOT replaces masked patch embeddings with it),
//! per-sample drop path while training, and register tokens.

use std::collections::BTreeMap;

use crate::bail;
use crate::config::PosResample;
use crate::error::{Context, Result};
use reddino_models::arch::{VitConfig, LN_EPS, PATCH_SIZE};
use reddino_models::weights::{backbone_keys, Tensor as WTensor, VitWeights};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// LayerScale init of DINOv2's training config.
pub const LAYERSCALE_INIT: f64 = 1e-5;

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ls1: Option<Tensor>,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    ls2: Option<Tensor>,
}

/// A ViT backbone whose variables live in a [`nn::VarStore`] under the path it was built at.
#[derive(Debug)]
pub struct Vit {
    pub config: VitConfig,
    /// Position-embedding entries before the patch grid: 1 (CLS has a position, DINOv2) or 0
    /// (timm's `no_embed_class` register models).
    pub pos_prefix: usize,
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    reg_token: Option<Tensor>,
    pos_embed: Tensor,
    mask_token: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    /// Every variable by its timm name (relative to this backbone), looked up once in the
    /// var store by the names of the weights contract ([`backbone_keys`]).
    named: Vec<(String, Tensor)>,
    /// Stochastic-depth rate (training only).
    pub drop_path: f64,
}

/// Backbone outputs used by the losses.
pub struct VitOutput {
    /// CLS token after the final norm, [B, D].
    pub cls: Tensor,
    /// Patch tokens after the final norm, [B, N, D].
    pub patches: Tensor,
}

/// The variable `key` (dot-separated, e.g. `blocks.0.attn.qkv.weight`) under `p`.
fn var_at(p: &nn::Path, key: &str) -> Result<Tensor> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let name = parts.pop().unwrap_or_default();
    let found = match parts.split_first() {
        None => p.get(name),
        Some((first, rest)) => rest.iter().fold(p.sub(*first), |q, s| q.sub(*s)).get(name),
    };
    found.with_context(|| format!("the backbone has no variable `{key}`"))
}

fn ln(p: nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![d],
        nn::LayerNormConfig {
            eps: LN_EPS as f64,
            ..Default::default()
        },
    )
}

/// A linear layer with timm/DINOv2's init (also used by the DINO head).
pub(crate) fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    // timm/DINOv2: trunc_normal(std=0.02) weights, zero biases.
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

impl Vit {
    /// Builds a freshly initialised backbone under `p` (timm's init: N(0, 0.02) linear weights
    /// and position embedding, CLS N(0, 1e-6), LayerScale 1e-5, zero mask token).
    pub fn new(p: &nn::Path, config: &VitConfig, pos_prefix: usize) -> Result<Vit> {
        config.validate()?;
        if pos_prefix > 1 {
            bail!("pos_prefix must be 0 or 1, got {pos_prefix}");
        }
        let d = config.embed_dim as i64;
        let h = config.mlp_hidden as i64;
        let n = config.num_patches() as i64;
        let patch_embed = nn::conv2d(
            p / "patch_embed" / "proj",
            3,
            d,
            PATCH_SIZE as i64,
            nn::ConvConfig {
                stride: PATCH_SIZE as i64,
                ..Default::default()
            },
        );
        let cls_token = p.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1e-6,
            },
        );
        let reg_token = (config.num_registers > 0).then(|| {
            p.var(
                "reg_token",
                &[1, config.num_registers as i64, d],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1e-6,
                },
            )
        });
        let pos_embed = p.var(
            "pos_embed",
            &[1, n + pos_prefix as i64, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let mask_token = p.var("mask_token", &[1, d], nn::Init::Const(0.0));
        let blocks = (0..config.depth)
            .map(|i| {
                let b = p / "blocks" / i;
                let gamma = |name: &str| {
                    config
                        .layer_scale
                        .then(|| (&b / name).var("gamma", &[d], nn::Init::Const(LAYERSCALE_INIT)))
                };
                Block {
                    norm1: ln(&b / "norm1", d),
                    qkv: linear(&b / "attn" / "qkv", d, 3 * d),
                    proj: linear(&b / "attn" / "proj", d, d),
                    ls1: gamma("ls1"),
                    norm2: ln(&b / "norm2", d),
                    fc1: linear(&b / "mlp" / "fc1", d, h),
                    fc2: linear(&b / "mlp" / "fc2", h, d),
                    ls2: gamma("ls2"),
                }
            })
            .collect();
        let norm = ln(p / "norm", d);
        let named = ["pos_embed", "mask_token"]
            .into_iter()
            .map(String::from)
            .chain(backbone_keys(config).into_iter().map(|(k, _)| k))
            .map(|k| var_at(p, &k).map(|t| (k, t)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Vit {
            config: config.clone(),
            pos_prefix,
            patch_embed,
            cls_token,
            reg_token,
            pos_embed,
            mask_token,
            blocks,
            norm,
            named,
            drop_path: 0.0,
        })
    }

    /// Builds the backbone under `p` with the weights of a checkpoint (timm, DINOv2, RedDino or
    /// this trainer's), resampling the position embedding to `img_size` as timm does.
    /// A freshly initialised backbone that can serve as a baseline: LayerScale gammas at 1
    /// instead of DINOv2's 1e-5 training init, so that the CLS output depends on the image
    /// (with 1e-5 every block adds almost nothing to the residual stream and every image gets
    /// nearly the same CLS feature: a baseline that cannot win).
    pub fn random_baseline(p: &nn::Path, config: &VitConfig, pos_prefix: usize) -> Result<Vit> {
        let vit = Vit::new(p, config, pos_prefix)?;
        vit.fill_layer_scale(1.0);
        Ok(vit)
    }

    /// Sets every LayerScale gamma to `value` (a fresh backbone's start; no-op without
    /// LayerScale).
    pub fn fill_layer_scale(&self, value: f64) {
        tch::no_grad(|| {
            for b in &self.blocks {
                for g in [&b.ls1, &b.ls2].into_iter().flatten() {
                    let _ = g.shallow_clone().fill_(value);
                }
            }
        });
    }

    pub fn from_weights(p: &nn::Path, weights: &VitWeights, img_size: usize) -> Result<Vit> {
        let mut w = weights.clone();
        w.resize_input(img_size)?;
        let vit = Vit::new(p, &w.config, w.pos_prefix())?;
        vit.load(&w)?;
        Ok(vit)
    }

    /// [`Vit::from_weights`] with the position embedding brought to `img_size` by `resample`:
    /// `Bicubic` computes it as DINOv2's `interpolate_pos_encoding` would at `img_size` from
    /// the stored grid ([`Vit::pos_for_grid`]), what RedDino's runs train from.
    pub fn from_weights_resampled(
        p: &nn::Path,
        weights: &VitWeights,
        img_size: usize,
        resample: PosResample,
    ) -> Result<Vit> {
        let vit = Vit::from_weights(p, weights, img_size)?;
        if resample == PosResample::Bicubic && img_size != weights.config.img_size {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let stored = Vit::new(&vs.root(), &weights.config, weights.pos_prefix())?;
            stored.load(weights)?;
            let grid = (img_size / PATCH_SIZE) as i64;
            let pos = tch::no_grad(|| stored.pos_for_grid(grid));
            tch::no_grad(|| {
                vit.pos_embed
                    .shallow_clone()
                    .copy_(&pos.to_device(vit.pos_embed.device()))
            });
        }
        Ok(vit)
    }

    /// Copies checkpoint tensors into this backbone's variables (shapes must match).
    pub fn load(&self, w: &VitWeights) -> Result<()> {
        let vars = self.named_vars();
        tch::no_grad(|| -> Result<()> {
            for (name, var) in &vars {
                let src = match w.tensors().get(name) {
                    Some(t) => t,
                    // DINOv2 training checkpoints have it; timm's do not: keep zeros.
                    None if name == "mask_token" => continue,
                    None => bail!("checkpoint has no tensor `{name}`"),
                };
                let shape: Vec<i64> = src.shape.iter().map(|&s| s as i64).collect();
                if shape != var.size() {
                    bail!(
                        "checkpoint tensor `{name}` has shape {:?}; the model expects {:?}",
                        src.shape,
                        var.size()
                    );
                }
                let t = Tensor::from_slice(&src.data)
                    .reshape(&shape)
                    .to_device(var.device());
                var.shallow_clone().copy_(&t);
            }
            Ok(())
        })
    }

    /// Every variable with its timm name (relative to this backbone).
    pub fn named_vars(&self) -> Vec<(String, Tensor)> {
        self.named
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    }

    /// The current weights as a `reddino-models` checkpoint (f32, CPU).
    pub fn to_weights(&self) -> Result<VitWeights> {
        let mut map = BTreeMap::new();
        for (name, t) in self.named_vars() {
            let t = t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu);
            let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
            let data = Vec::<f32>::try_from(t.flatten(0, -1)).context("tensor to f32")?;
            map.insert(name, WTensor::new(shape, data));
        }
        Ok(VitWeights::from_tensors(self.config.clone(), map)?)
    }

    /// Patch embedding, mask-token substitution, CLS/register tokens and position embedding.
    fn prepare_tokens(&self, x: &Tensor, masks: Option<&Tensor>) -> Tensor {
        let b = x.size()[0];
        let d = self.config.embed_dim as i64;
        // [B, D, g, g] -> [B, N, D]
        let mut t = x.apply(&self.patch_embed).flatten(2, 3).transpose(1, 2);
        if let Some(m) = masks {
            t = self
                .mask_token
                .to_kind(t.kind())
                .unsqueeze(0)
                .where_self(&m.unsqueeze(-1), &t);
        }
        let cls = self.cls_token.expand([b, 1, d], false);
        let grid = x.size()[2] / PATCH_SIZE as i64;
        let pos = &self.pos_for_grid(grid);
        if self.pos_prefix == 1 {
            let t = Tensor::cat(&[cls, t], 1) + pos;
            match &self.reg_token {
                Some(r) => {
                    let r = r.expand([b, -1, d], false);
                    Tensor::cat(&[t.narrow(1, 0, 1), r, t.narrow(1, 1, t.size()[1] - 1)], 1)
                }
                None => t,
            }
        } else {
            let t = t + pos;
            match &self.reg_token {
                Some(r) => Tensor::cat(&[cls, r.expand([b, -1, d], false), t], 1),
                None => Tensor::cat(&[cls, t], 1),
            }
        }
    }

    /// The position embedding for a `grid x grid` patch grid: as stored for the configured
    /// input size, otherwise the patch part resampled bicubically as DINOv2's
    /// `interpolate_pos_encoding` does (scale factor (grid + 0.1) / stored grid, no antialias).
    pub fn pos_for_grid(&self, grid: i64) -> Tensor {
        let g0 = self.config.grid() as i64;
        if grid == g0 {
            return self.pos_embed.shallow_clone();
        }
        let d = self.config.embed_dim as i64;
        let prefix = self.pos_prefix as i64;
        let patches = self
            .pos_embed
            .narrow(1, prefix, g0 * g0)
            .reshape([1, g0, g0, d])
            .permute([0, 3, 1, 2]);
        let scale = (grid as f64 + 0.1) / g0 as f64;
        let resized = patches
            .to_kind(Kind::Float)
            .upsample_bicubic2d([grid, grid], false, scale, scale)
            .to_kind(self.pos_embed.kind())
            .permute([0, 2, 3, 1])
            .reshape([1, grid * grid, d]);
        Tensor::cat(&[self.pos_embed.narrow(1, 0, prefix), resized], 1)
    }

    fn drop_path(&self, x: Tensor, train: bool) -> Tensor {
        if !train || self.drop_path <= 0.0 {
            return x;
        }
        let keep = 1.0 - self.drop_path;
        let b = x.size()[0];
        let mask = Tensor::empty([b, 1, 1], (x.kind(), x.device()))
            .bernoulli_float_(keep)
            .divide_scalar(keep);
        x * mask
    }

    fn attention(&self, blk: &Block, x: &Tensor) -> Tensor {
        let sz = x.size();
        let (b, n, d) = (sz[0], sz[1], sz[2]);
        let h = self.config.num_heads as i64;
        let qkv = x
            .apply(&blk.qkv)
            .reshape([b, n, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let o = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        o.transpose(1, 2).reshape([b, n, d]).apply(&blk.proj)
    }

    /// Every token after the final norm, [B, 1 + R + N, D]. `masks` ([B, N] bool) marks patches
    /// replaced by the mask token.
    pub fn forward_tokens(&self, x: &Tensor, masks: Option<&Tensor>, train: bool) -> Tensor {
        let mut t = self.prepare_tokens(x, masks);
        for blk in &self.blocks {
            let mut a = self.attention(blk, &t.apply(&blk.norm1));
            if let Some(g) = &blk.ls1 {
                a *= g;
            }
            t = &t + self.drop_path(a, train);
            let mut m = t
                .apply(&blk.norm2)
                .apply(&blk.fc1)
                .gelu("none")
                .apply(&blk.fc2);
            if let Some(g) = &blk.ls2 {
                m *= g;
            }
            t = &t + self.drop_path(m, train);
        }
        t.apply(&self.norm)
    }

    /// CLS and patch tokens after the final norm.
    pub fn forward(&self, x: &Tensor, masks: Option<&Tensor>, train: bool) -> VitOutput {
        let t = self.forward_tokens(x, masks, train);
        let r = self.config.num_registers as i64;
        let n = t.size()[1] - 1 - r;
        VitOutput {
            cls: t.select(1, 0),
            patches: t.narrow(1, 1 + r, n),
        }
    }

    /// Features as the edge computes them: CLS after the final norm, eval mode.
    pub fn embed(&self, x: &Tensor) -> Tensor {
        self.forward(x, None, false).cls
    }
}

impl Module for Vit {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.embed(xs)
    }
}
