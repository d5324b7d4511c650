//! Export of a backbone (this trainer's, timm's, DINOv2's or RedDino's safetensors) and an
//! optional linear head to a signed bundle, with the exported ONNX checked against the tch
//! model it came from.

use std::path::Path;

use crate::bail;
use crate::error::{Context, Error, Result};
use reddino_models::bundle::{self, Manifest, NewBundle, SigningKey};
use reddino_models::runtime::TractModel;
use reddino_models::weights::{LinearHead, VitWeights};
use tch::{nn, Device, Kind, Tensor};

use crate::vit::Vit;

/// Largest difference allowed between the ONNX (tract) and tch outputs.
pub const TOLERANCE: f32 = 1e-4;

/// What to export: a bundle of these weights (name, version, head, crop policy, finder
/// profile as the manifest will say), at this input size.
pub struct ExportSpec<'a> {
    pub bundle: NewBundle<'a>,
    pub input_size: usize,
}

/// Largest |ONNX - tch| over embedding and logits on a seeded random input, at `size`; with
/// `views` > 1 the logits are tch's mean over the turned and mirrored inputs.
pub fn check_onnx(
    weights: &VitWeights,
    head: Option<&LinearHead>,
    size: usize,
    views: usize,
) -> Result<f32> {
    let onnx = reddino_models::onnx::export_with_views(weights, head, views)?;
    let model = TractModel::new(&onnx, 2, size)?;
    tch::manual_seed(1234);
    let x = Tensor::randn([2, 3, size as i64, size as i64], (Kind::Float, Device::Cpu));
    let pixels = Vec::<f32>::try_from(x.flatten(0, -1))?;
    let out = model.run(&pixels)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = Vit::from_weights(&vs.root(), weights, size)?;
    let emb = tch::no_grad(|| vit.embed(&x));
    let ours = Vec::<f32>::try_from(emb.flatten(0, -1))?;
    let mut diff = max_diff(&out.embedding, &ours);
    if let Some(h) = head {
        let w = Tensor::from_slice(&h.weight.data)
            .view([h.weight.shape[0] as i64, h.weight.shape[1] as i64]);
        let b = Tensor::from_slice(&h.bias.data);
        let per_view: Vec<Tensor> = (0..views)
            .map(|k| {
                let e = tch::no_grad(|| vit.embed(&crate::finetune::view(&x, k)));
                e.matmul(&w.transpose(0, 1)).g_add(&b)
            })
            .collect();
        let mean = Tensor::stack(&per_view, 0).mean_dim(0, false, None);
        let logits = Vec::<f32>::try_from(mean.flatten(0, -1))?;
        let Some(theirs) = out.logits.as_ref() else {
            bail!("the exported graph has no `logits` output although a head was given");
        };
        diff = diff.max(max_diff(theirs, &logits));
    }
    Ok(diff)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Resamples the checkpoint to the input size, checks the ONNX against tch, and writes the
/// signed bundle directory `dir` (and `dir.tar` when `tar`).
pub fn export(spec: &ExportSpec<'_>, key: &SigningKey, dir: &Path) -> Result<(Manifest, f32)> {
    // Refused before the (slow) ONNX check, not after it.
    bundle::check_crop_min_side(spec.bundle.crop_min_side).map_err(Error::Invalid)?;
    bundle::check_crop_margin(spec.bundle.crop_margin).map_err(Error::Invalid)?;
    reddino_models::onnx::check_views(spec.bundle.test_time_views)?;
    let mut w = spec.bundle.weights.clone();
    w.resize_input(spec.input_size)
        .with_context(|| format!("input size {}", spec.input_size))?;
    let head = spec.bundle.head;
    if let Some(h) = head {
        h.validate(w.config.embed_dim)?;
    }
    let diff = check_onnx(&w, head, spec.input_size, spec.bundle.test_time_views)?;
    if diff.is_nan() || diff > TOLERANCE {
        bail!("the exported ONNX differs from the tch model by {diff:e} (limit {TOLERANCE:e}); nothing written");
    }
    let new = NewBundle {
        weights: &w,
        ..spec.bundle.clone()
    };
    let m = bundle::write_dir(&new, dir, key)?;
    Ok((m, diff))
}
