//! ViT checkpoints as safetensors in the timm/DINOv2 key layout.
//!
//! Keys: `cls_token`, `pos_embed`, `patch_embed.proj.{weight,bias}`, optional `reg_token`,
//! `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`, `norm`.
//! DINOv2 training checkpoints (`teacher.backbone.` prefix, chunked `blocks.{c}.{i}`,
//! `register_tokens`) are read too. The architecture is inferred from the shapes.

use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use safetensors::{Dtype, SafeTensors};

use crate::arch::{VitConfig, PATCH_SIZE};
use crate::cellsize::{self, CellSize};
use crate::Error;

/// A dense f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor; panics if `data` does not fill `shape` (a programming error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data/shape mismatch"
        );
        Tensor { shape, data }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Prefixes under which checkpoints keep the backbone, tried in this order.
const PREFIXES: [&str; 6] = [
    "teacher.backbone.",
    "student.backbone.",
    "backbone.",
    "module.",
    "model.",
    "",
];

/// Metadata key under which this project stores the exact [`VitConfig`].
const CONFIG_META: &str = "reddino.config";

/// The weights of a ViT backbone with the config they fit.
#[derive(Debug, Clone)]
pub struct VitWeights {
    pub config: VitConfig,
    tensors: BTreeMap<String, Tensor>,
}

/// The backbone's checkpoint keys and shapes for a config, in timm's names (the contract every
/// reader and writer of weights follows). `pos_embed` is left out: checkpoints may or may not
/// give the CLS token a position.
pub fn backbone_keys(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.embed_dim;
    let h = cfg.mlp_hidden;
    let mut keys = vec![
        ("cls_token".to_string(), vec![1, 1, d]),
        (
            "patch_embed.proj.weight".into(),
            vec![d, 3, PATCH_SIZE, PATCH_SIZE],
        ),
        ("patch_embed.proj.bias".into(), vec![d]),
        ("norm.weight".into(), vec![d]),
        ("norm.bias".into(), vec![d]),
    ];
    if cfg.num_registers > 0 {
        keys.push(("reg_token".into(), vec![1, cfg.num_registers, d]));
    }
    for i in 0..cfg.depth {
        let b = format!("blocks.{i}");
        let mut push = |k: &str, s: Vec<usize>| keys.push((format!("{b}.{k}"), s));
        push("norm1.weight", vec![d]);
        push("norm1.bias", vec![d]);
        push("attn.qkv.weight", vec![3 * d, d]);
        push("attn.qkv.bias", vec![3 * d]);
        push("attn.proj.weight", vec![d, d]);
        push("attn.proj.bias", vec![d]);
        push("norm2.weight", vec![d]);
        push("norm2.bias", vec![d]);
        push("mlp.fc1.weight", vec![h, d]);
        push("mlp.fc1.bias", vec![h]);
        push("mlp.fc2.weight", vec![d, h]);
        push("mlp.fc2.bias", vec![d]);
        if cfg.layer_scale {
            push("ls1.gamma", vec![d]);
            push("ls2.gamma", vec![d]);
        }
    }
    keys
}

fn to_f32(
    view: &safetensors::tensor::TensorView<'_>,
    key: &str,
    path: &str,
) -> Result<Vec<f32>, Error> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::Checkpoint {
                path: path.into(),
                msg: format!("tensor `{key}` has dtype {other:?}; expected F32, F16, BF16 or F64"),
            })
        }
    };
    Ok(out)
}

/// Maps a checkpoint key (prefix already stripped) to the timm name.
fn canonical_key(key: &str) -> String {
    // DINOv2 FSDP checkpoints chunk blocks: `blocks.{chunk}.{i}.rest` -> `blocks.{i}.rest`.
    if let Some(rest) = key.strip_prefix("blocks.") {
        let mut parts = rest.splitn(3, '.');
        if let (Some(a), Some(b), Some(tail)) = (parts.next(), parts.next(), parts.next()) {
            if a.parse::<usize>().is_ok() && b.parse::<usize>().is_ok() {
                return format!("blocks.{b}.{tail}");
            }
        }
    }
    if key == "register_tokens" {
        return "reg_token".into();
    }
    key.to_string()
}

impl VitWeights {
    /// Reads a safetensors checkpoint from a file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Reads a safetensors checkpoint from memory; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, Error> {
        let ckpt_err = |msg: String| Error::Checkpoint {
            path: origin.into(),
            msg,
        };
        let (st, meta) = open_safetensors(bytes, origin)?;
        let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        let prefix = PREFIXES
            .iter()
            .find(|p| names.iter().any(|n| *n == format!("{p}cls_token")))
            .ok_or_else(|| {
                ckpt_err(
                    "no `cls_token` found (looked for it bare and under teacher.backbone., \
                     student.backbone., backbone., module., model.); is this a ViT checkpoint?"
                        .into(),
                )
            })?;
        let mut tensors = BTreeMap::new();
        for name in &names {
            let Some(key) = name.strip_prefix(prefix) else {
                continue;
            };
            let view = st
                .tensor(name)
                .map_err(|e| ckpt_err(format!("`{name}`: {e}")))?;
            let data = to_f32(&view, name, origin)?;
            tensors.insert(canonical_key(key), Tensor::new(view.shape().to_vec(), data));
        }
        let stored_cfg = meta
            .get(CONFIG_META)
            .map(|s| serde_json::from_str::<VitConfig>(s))
            .transpose()
            .map_err(|e| ckpt_err(format!("metadata `{CONFIG_META}` is not a ViT config: {e}")))?;
        let config = match stored_cfg {
            Some(c) => c,
            None => infer_config(&tensors).map_err(ckpt_err)?,
        };
        Self::from_tensors(config, tensors)
    }

    /// Builds weights from named tensors, checking every key and shape against `config`.
    /// Keys the backbone does not use (heads, `mask_token`) are kept but ignored.
    pub fn from_tensors(
        config: VitConfig,
        tensors: BTreeMap<String, Tensor>,
    ) -> Result<Self, Error> {
        config.validate()?;
        for (key, expected) in backbone_keys(&config) {
            match tensors.get(&key) {
                None => return Err(Error::MissingTensor { key, expected }),
                Some(t) if t.shape != expected => {
                    return Err(Error::ShapeMismatch {
                        key,
                        expected,
                        actual: t.shape.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        let p = config.num_patches();
        let d = config.embed_dim;
        match tensors.get("pos_embed") {
            None => {
                return Err(Error::MissingTensor {
                    key: "pos_embed".into(),
                    expected: vec![1, p + 1, d],
                })
            }
            Some(t) if t.shape != [1, p + 1, d] && t.shape != [1, p, d] => {
                return Err(Error::ShapeMismatch {
                    key: "pos_embed".into(),
                    expected: vec![1, p + 1, d],
                    actual: t.shape.clone(),
                })
            }
            Some(_) => {}
        }
        Ok(VitWeights { config, tensors })
    }

    /// Random weights for tests and demos: N(0, 0.02) matrices, norms near 1, LayerScale
    /// gammas near `gamma`.
    pub fn random(config: &VitConfig, seed: u64, gamma: f32) -> Result<Self, Error> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
        let mut sample = |shape: Vec<usize>, mean: f32, std: f32| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| mean + std * normal.sample(&mut rng))
                .collect();
            Tensor::new(shape, data)
        };
        let mut tensors = BTreeMap::new();
        for (key, shape) in backbone_keys(config) {
            let t = if key.ends_with("gamma") {
                sample(shape, gamma, 0.1 * gamma.abs().max(1e-6))
            } else if key.contains("norm") && key.ends_with("weight") {
                sample(shape, 1.0, 0.1)
            } else {
                sample(shape, 0.0, 0.02)
            };
            tensors.insert(key, t);
        }
        let p = config.num_patches();
        tensors.insert(
            "pos_embed".into(),
            sample(vec![1, p + 1, config.embed_dim], 0.0, 0.02),
        );
        Self::from_tensors(config.clone(), tensors)
    }

    /// A backbone tensor by its timm key.
    pub fn get(&self, key: &str) -> Result<&Tensor, Error> {
        self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            key: key.into(),
            expected: vec![],
        })
    }

    /// All tensors by key.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// Number of position-embedding entries before the patch grid (1 when the CLS token has a
    /// position, 0 for timm's `no_embed_class` register models).
    pub fn pos_prefix(&self) -> usize {
        let len = self.tensors["pos_embed"].shape[1];
        len - self.config.num_patches()
    }

    /// Resamples the position embedding to a new input size exactly as timm's
    /// `resample_abs_pos_embed` does (bicubic, antialiased, align_corners=False).
    pub fn resize_input(&mut self, img_size: usize) -> Result<(), Error> {
        let mut cfg = self.config.clone();
        cfg.img_size = img_size;
        cfg.validate()?;
        if img_size == self.config.img_size {
            return Ok(());
        }
        let prefix = self.pos_prefix();
        let d = self.config.embed_dim;
        let old = self.config.grid();
        let new = cfg.grid();
        let pos = &self.tensors["pos_embed"];
        let grid = &pos.data[prefix * d..];
        let resized = resample_grid(grid, old, old, new, new, d);
        let mut data = pos.data[..prefix * d].to_vec();
        data.extend_from_slice(&resized);
        self.tensors.insert(
            "pos_embed".into(),
            Tensor::new(vec![1, prefix + new * new, d], data),
        );
        self.config = cfg;
        Ok(())
    }

    /// Serialises to safetensors bytes (f32), with the config in the metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let config = serde_json::to_string(&self.config).expect("config serialises");
        serialize_tensors(self.tensors.iter(), Some(meta(CONFIG_META, config)))
    }

    /// Writes a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
    }
}

/// Serialises f32 tensors to safetensors.
/// safetensors metadata: `key` = `value`, and the `format` PyTorch's loaders expect.
fn meta(key: &str, value: String) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([
        (key.to_string(), value),
        ("format".to_string(), "pt".to_string()),
    ])
}

pub(crate) fn serialize_tensors<'a>(
    tensors: impl Iterator<Item = (&'a String, &'a Tensor)>,
    meta: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>, Error> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .map(|(k, t)| {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(k, s, b)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .expect("shape matches data");
            (k.clone(), view)
        })
        .collect();
    safetensors::serialize(views, meta).map_err(|e| Error::Checkpoint {
        path: "<memory>".into(),
        msg: format!("cannot serialise: {e}"),
    })
}

/// Serialises named f32 tensors to safetensors bytes.
pub fn tensors_to_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>, Error> {
    serialize_tensors(tensors.iter(), None)
}

type TensorMap = BTreeMap<String, Tensor>;
type MetaMap = std::collections::HashMap<String, String>;

/// Reads every tensor of a safetensors buffer as f32 (for self-test vectors and heads).
pub(crate) fn read_tensors(bytes: &[u8], origin: &str) -> Result<(TensorMap, MetaMap), Error> {
    let (st, meta) = open_safetensors(bytes, origin)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(&view, &name, origin)?;
        out.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    Ok((out, meta))
}

/// The tensors and the metadata of a safetensors buffer; `origin` names it in errors.
fn open_safetensors<'a>(
    bytes: &'a [u8],
    origin: &str,
) -> Result<(SafeTensors<'a>, MetaMap), Error> {
    let not_safetensors = |e: safetensors::SafeTensorError| Error::Checkpoint {
        path: origin.into(),
        msg: format!("not a safetensors file: {e}"),
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let st = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    Ok((st, meta.metadata().clone().unwrap_or_default()))
}

fn infer_config(t: &BTreeMap<String, Tensor>) -> Result<VitConfig, String> {
    let cls = t.get("cls_token").ok_or("missing `cls_token`")?;
    if cls.shape.len() != 3 || cls.shape[0] != 1 || cls.shape[1] != 1 {
        return Err(format!(
            "`cls_token` has shape {:?}, expected [1, 1, D]",
            cls.shape
        ));
    }
    let d = cls.shape[2];
    let depth = (0..)
        .take_while(|i| t.contains_key(&format!("blocks.{i}.norm1.weight")))
        .count();
    if depth == 0 {
        return Err("no transformer blocks (`blocks.0.norm1.weight`) found".into());
    }
    let fc1 = t
        .get("blocks.0.mlp.fc1.weight")
        .ok_or("missing `blocks.0.mlp.fc1.weight`")?;
    let mlp_hidden = fc1.shape[0];
    let num_registers = t.get("reg_token").map(|r| r.shape[1]).unwrap_or(0);
    let pos = t.get("pos_embed").ok_or("missing `pos_embed`")?;
    if pos.shape.len() != 3 {
        return Err(format!(
            "`pos_embed` has shape {:?}, expected [1, N, D]",
            pos.shape
        ));
    }
    let len = pos.shape[1];
    let grid = [len, len.saturating_sub(1)]
        .into_iter()
        .find_map(|p| {
            let g = (p as f64).sqrt().round() as usize;
            (g * g == p && g > 0).then_some(g)
        })
        .ok_or_else(|| {
            format!("`pos_embed` has {len} positions, which is not a square grid (+1)")
        })?;
    // Every DINOv2 model uses 64-wide heads.
    let num_heads = (d / 64).max(1);
    Ok(VitConfig {
        embed_dim: d,
        depth,
        num_heads,
        mlp_hidden,
        num_registers,
        img_size: grid * PATCH_SIZE,
        layer_scale: t.contains_key("blocks.0.ls1.gamma"),
    })
}

/// Antialiased bicubic kernel (a = -0.5), as PyTorch's `_upsample_bicubic2d_aa` and PIL.
fn aa_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Interpolation weights along one axis: for each output index, (first input index, weights).
fn axis_weights(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let xmax = ((center + support + 0.5).trunc() as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|j| aa_bicubic((j as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (xmin, w)
        })
        .collect()
}

/// Resamples a `[h, w, c]` grid (channels last) to `[nh, nw, c]` with antialiased bicubic.
pub fn resample_grid(src: &[f32], h: usize, w: usize, nh: usize, nw: usize, c: usize) -> Vec<f32> {
    let wx = axis_weights(w, nw);
    let wy = axis_weights(h, nh);
    // Horizontal pass: [h, nw, c].
    let mut tmp = vec![0f64; h * nw * c];
    for y in 0..h {
        for (ox, (x0, ws)) in wx.iter().enumerate() {
            let out = &mut tmp[(y * nw + ox) * c..(y * nw + ox + 1) * c];
            for (k, wgt) in ws.iter().enumerate() {
                let inp = &src[(y * w + x0 + k) * c..(y * w + x0 + k + 1) * c];
                for (o, i) in out.iter_mut().zip(inp) {
                    *o += wgt * *i as f64;
                }
            }
        }
    }
    // Vertical pass: [nh, nw, c].
    let mut dst = vec![0f32; nh * nw * c];
    for (oy, (y0, ws)) in wy.iter().enumerate() {
        for x in 0..nw {
            let out = &mut dst[(oy * nw + x) * c..(oy * nw + x + 1) * c];
            for (ch, o) in out.iter_mut().enumerate() {
                let mut acc = 0f64;
                for (k, wgt) in ws.iter().enumerate() {
                    acc += wgt * tmp[((y0 + k) * nw + x) * c + ch];
                }
                *o = acc as f32;
            }
        }
    }
    dst
}

/// A linear classification head on the CLS embedding, with its class names.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    pub class_names: Vec<String>,
    /// `[classes, embed_dim]`.
    pub weight: Tensor,
    /// `[classes]`.
    pub bias: Tensor,
    /// The size term (`head.size_weight`, `[classes, 2]`, and the training scale in the
    /// metadata), for a head trained with the cell's size as an input.
    pub size: Option<CellSize>,
}

const CLASSES_META: &str = "reddino.class_names";
const UM_PER_PX_META: &str = "reddino.um_per_px";

impl LinearHead {
    /// Checks that the shapes agree with the class list and `embed_dim`.
    pub fn validate(&self, embed_dim: usize) -> Result<(), Error> {
        let c = self.class_names.len();
        if c == 0 {
            return Err(Error::Config("a head needs at least one class".into()));
        }
        if self.weight.shape != [c, embed_dim] {
            return Err(Error::ShapeMismatch {
                key: "head.weight".into(),
                expected: vec![c, embed_dim],
                actual: self.weight.shape.clone(),
            });
        }
        if self.bias.shape != [c] {
            return Err(Error::ShapeMismatch {
                key: "head.bias".into(),
                expected: vec![c],
                actual: self.bias.shape.clone(),
            });
        }
        if let Some(size) = &self.size {
            size.validate(c).map_err(Error::Config)?;
        }
        Ok(())
    }

    /// The same head with every logit it gives multiplied by `factor` (its weight, bias and
    /// size term): the same class for every crop, probabilities sharper for a factor above 1.
    /// Temperature scaling divides by a temperature: `scaled(1 / t)`.
    pub fn scaled(&self, factor: f32) -> LinearHead {
        let scale =
            |t: &Tensor| Tensor::new(t.shape.clone(), t.data.iter().map(|x| x * factor).collect());
        LinearHead {
            class_names: self.class_names.clone(),
            weight: scale(&self.weight),
            bias: scale(&self.bias),
            size: self.size.as_ref().map(|s| CellSize {
                um_per_px: s.um_per_px,
                weight: s.weight.iter().map(|row| row.map(|x| x * factor)).collect(),
            }),
        }
    }

    /// Serialises to safetensors (`head.weight`, `head.bias`, with a size term
    /// `head.size_weight`; class names and the size term's scale in the metadata).
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let names = serde_json::to_string(&self.class_names).expect("names serialise");
        let w = "head.weight".to_string();
        let b = "head.bias".to_string();
        let sw = "head.size_weight".to_string();
        let mut metadata = meta(CLASSES_META, names);
        let size = self.size.as_ref().map(|s| {
            metadata.insert(UM_PER_PX_META.into(), s.um_per_px.to_string());
            Tensor::new(vec![s.weight.len(), cellsize::FEATURES], s.flat_weight())
        });
        let mut tensors = vec![(&w, &self.weight), (&b, &self.bias)];
        if let Some(t) = &size {
            tensors.push((&sw, t));
        }
        serialize_tensors(tensors.into_iter(), Some(metadata))
    }

    /// Reads a head written by [`LinearHead::to_bytes`].
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, Error> {
        let (mut t, meta) = read_tensors(bytes, origin)?;
        let err = |msg: String| Error::Checkpoint {
            path: origin.into(),
            msg,
        };
        let names: Vec<String> = meta
            .get(CLASSES_META)
            .ok_or_else(|| err(format!("no `{CLASSES_META}` metadata; not a RedDino head")))
            .and_then(|s| {
                serde_json::from_str(s).map_err(|e| err(format!("bad class names: {e}")))
            })?;
        let weight = t
            .remove("head.weight")
            .ok_or_else(|| Error::MissingTensor {
                key: "head.weight".into(),
                expected: vec![names.len(), 0],
            })?;
        let bias = t.remove("head.bias").ok_or_else(|| Error::MissingTensor {
            key: "head.bias".into(),
            expected: vec![names.len()],
        })?;
        let size = match (t.remove("head.size_weight"), meta.get(UM_PER_PX_META)) {
            (None, None) => None,
            (Some(w), Some(scale)) => {
                if w.shape != [names.len(), cellsize::FEATURES] {
                    return Err(Error::ShapeMismatch {
                        key: "head.size_weight".into(),
                        expected: vec![names.len(), cellsize::FEATURES],
                        actual: w.shape,
                    });
                }
                let um_per_px = scale
                    .parse::<f32>()
                    .map_err(|e| err(format!("bad `{UM_PER_PX_META}` {scale:?}: {e}")))?;
                Some(CellSize::from_flat(um_per_px, &w.data))
            }
            (Some(_), None) => {
                return Err(err(format!(
                    "`head.size_weight` without its scale (`{UM_PER_PX_META}` metadata)"
                )))
            }
            (None, Some(_)) => {
                return Err(err(format!(
                    "`{UM_PER_PX_META}` metadata without `head.size_weight`"
                )))
            }
        };
        let head = LinearHead {
            class_names: names,
            weight,
            bias,
            size,
        };
        head.validate(head.weight.shape.get(1).copied().unwrap_or(0))?;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Preset;

    fn tiny() -> VitConfig {
        VitConfig::preset(Preset::Tiny, 56).unwrap()
    }

    #[test]
    fn a_scaled_head_scales_every_term_of_the_logits_and_keeps_the_rest() {
        let head = LinearHead {
            class_names: vec!["a".into(), "b".into()],
            weight: Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            bias: Tensor::new(vec![2], vec![0.5, -1.0]),
            size: Some(CellSize {
                um_per_px: 0.2,
                weight: vec![[1.0, 2.0], [3.0, 4.0]],
            }),
        };
        let s = head.scaled(2.0);
        s.validate(3).unwrap();
        assert_eq!(s.class_names, head.class_names);
        assert_eq!(s.weight.shape, vec![2, 3]);
        assert_eq!(s.weight.data, vec![2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        assert_eq!(s.bias.data, vec![1.0, -2.0]);
        let size = s.size.unwrap();
        assert_eq!(
            size.um_per_px, 0.2,
            "the scale the boxes are measured at stays"
        );
        assert_eq!(size.weight, vec![[2.0, 4.0], [6.0, 8.0]]);
    }

    #[test]
    fn safetensors_round_trip() {
        let w = VitWeights::random(&tiny(), 1, 1.0).unwrap();
        let back = VitWeights::from_bytes(&w.to_bytes().unwrap(), "mem").unwrap();
        assert_eq!(back.config, w.config);
        assert_eq!(back.tensors, w.tensors);
    }

    #[test]
    fn infers_architecture_without_metadata_and_strips_teacher_prefix() {
        let w = VitWeights::random(&tiny(), 2, 1.0).unwrap();
        let renamed: BTreeMap<String, Tensor> = w
            .tensors()
            .iter()
            .map(|(k, t)| (format!("teacher.backbone.{k}"), t.clone()))
            .collect();
        let bytes = serialize_tensors(renamed.iter(), None).unwrap();
        let back = VitWeights::from_bytes(&bytes, "mem").unwrap();
        assert_eq!(back.config, w.config);
        assert_eq!(back.tensors(), w.tensors());
    }

    #[test]
    fn chunked_blocks_and_register_tokens_are_renamed() {
        assert_eq!(
            canonical_key("blocks.1.5.attn.qkv.weight"),
            "blocks.5.attn.qkv.weight"
        );
        assert_eq!(
            canonical_key("blocks.5.attn.qkv.weight"),
            "blocks.5.attn.qkv.weight"
        );
        assert_eq!(canonical_key("register_tokens"), "reg_token");
    }

    #[test]
    fn missing_and_misshaped_tensors_are_named() {
        let w = VitWeights::random(&tiny(), 3, 1.0).unwrap();
        let mut t = w.tensors().clone();
        t.remove("blocks.2.mlp.fc1.bias");
        let err = VitWeights::from_tensors(w.config.clone(), t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blocks.2.mlp.fc1.bias") && err.contains("[768]"),
            "{err}"
        );

        let mut t = w.tensors().clone();
        t.insert(
            "blocks.1.attn.qkv.weight".into(),
            Tensor::new(vec![2, 3], vec![0.0; 6]),
        );
        let err = VitWeights::from_tensors(w.config.clone(), t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blocks.1.attn.qkv.weight")
                && err.contains("[2, 3]")
                && err.contains("[576, 192]"),
            "{err}"
        );
    }

    #[test]
    fn resample_identity_and_constant() {
        // Same size: weights are a delta, values unchanged.
        let src: Vec<f32> = (0..4 * 4 * 2).map(|v| v as f32).collect();
        let same = resample_grid(&src, 4, 4, 4, 4, 2);
        for (a, b) in same.iter().zip(&src) {
            assert!((a - b).abs() < 1e-5);
        }
        // A constant field stays constant when shrinking or growing.
        let c = vec![3.5f32; 16 * 16];
        for n in [8, 5, 20] {
            for v in resample_grid(&c, 16, 16, n, n, 1) {
                assert!((v - 3.5).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn resize_input_changes_grid() {
        let mut w =
            VitWeights::random(&VitConfig::preset(Preset::Tiny, 224).unwrap(), 4, 1.0).unwrap();
        w.resize_input(112).unwrap();
        assert_eq!(w.config.img_size, 112);
        assert_eq!(w.get("pos_embed").unwrap().shape, vec![1, 65, 192]);
        assert!(w.resize_input(100).is_err());
    }

    #[test]
    fn head_round_trip_and_validation() {
        let head = LinearHead {
            class_names: vec!["a".into(), "b".into()],
            weight: Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            bias: Tensor::new(vec![2], vec![0.5, -0.5]),
            size: None,
        };
        let back = LinearHead::from_bytes(&head.to_bytes().unwrap(), "mem").unwrap();
        assert_eq!(back, head);
        assert!(head.validate(4).is_err());

        // With a size term: its weights and scale come back too.
        let sized = LinearHead {
            size: Some(CellSize {
                um_per_px: 0.18,
                weight: vec![[1.5, -0.25], [-2.0, 0.125]],
            }),
            ..head.clone()
        };
        let bytes = sized.to_bytes().unwrap();
        assert_eq!(LinearHead::from_bytes(&bytes, "mem").unwrap(), sized);
        // A size term with a row per class only.
        let short = LinearHead {
            size: Some(CellSize {
                um_per_px: 0.18,
                weight: vec![[1.0, 1.0]],
            }),
            ..head
        };
        let err = short.validate(3).unwrap_err().to_string();
        assert!(err.contains("1 rows for 2 classes"), "{err}");
    }
}
