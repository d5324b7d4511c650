//! Numerical parity with timm's `vit_*_patch14_dinov2` (references from
//! `tests/reference/timm_vit.py`, written by the test set-up into `$REDDINO_REFERENCE_DIR`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use reddino_models::onnx;
use reddino_models::runtime::TractModel;
use reddino_models::weights::{resample_grid, Tensor, VitWeights};

/// The reference directory, or `None` (test skipped) when the set-up did not make one.
/// `REDDINO_REQUIRE_REFERENCE=1` turns a missing directory into a failure.
fn reference_dir() -> Option<PathBuf> {
    match std::env::var_os("REDDINO_REFERENCE_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None if std::env::var_os("REDDINO_REQUIRE_REFERENCE").is_some() => {
            panic!("REDDINO_REQUIRE_REFERENCE is set but REDDINO_REFERENCE_DIR is not; run scripts/test.sh")
        }
        None => {
            eprintln!("skipped: REDDINO_REFERENCE_DIR not set (scripts/test.sh sets it)");
            None
        }
    }
}

fn read(dir: &std::path::Path, name: &str) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, Tensor::new(v.shape().to_vec(), data))
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(weights: &VitWeights, io: &BTreeMap<String, Tensor>, what: &str) {
    let pixels = &io["pixels"];
    let expected = &io["embedding"];
    let batch = pixels.shape[0];
    let size = pixels.shape[2];
    assert_eq!(weights.config.img_size, size);
    let model_bytes = onnx::export(weights, None).unwrap();
    let model = TractModel::new(&model_bytes, batch, size).unwrap();
    let out = model.run(&pixels.data).unwrap();
    let diff = max_abs_diff(&out.embedding, &expected.data);
    let scale = expected.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("{what}: max |tract - timm| = {diff:.3e} (max |embedding| = {scale:.2})");
    assert!(diff < 1e-4, "{what}: max abs difference {diff} >= 1e-4");
}

#[test]
fn vit_small_224_matches_timm() {
    let Some(dir) = reference_dir() else { return };
    let w = VitWeights::load(&dir.join("vit_small.safetensors")).unwrap();
    assert_eq!(
        (w.config.embed_dim, w.config.depth, w.config.num_heads),
        (384, 12, 6)
    );
    check(
        &w,
        &read(&dir, "vit_small_224_io.safetensors"),
        "vit_small 224",
    );
}

#[test]
fn vit_small_112_with_resampled_pos_embed_matches_timm() {
    let Some(dir) = reference_dir() else { return };
    let mut w = VitWeights::load(&dir.join("vit_small.safetensors")).unwrap();
    w.resize_input(112).unwrap();
    check(
        &w,
        &read(&dir, "vit_small_112_io.safetensors"),
        "vit_small 112",
    );
}

#[test]
fn register_model_matches_timm() {
    let Some(dir) = reference_dir() else { return };
    let w = VitWeights::load(&dir.join("vit_reg_56.safetensors")).unwrap();
    assert_eq!(w.config.num_registers, 2);
    check(
        &w,
        &read(&dir, "vit_reg_56_io.safetensors"),
        "register tokens 56",
    );
}

#[test]
fn pos_embed_resampling_matches_timm() {
    let Some(dir) = reference_dir() else { return };
    let r = read(&dir, "resample.safetensors");
    let grid = &r["grid"];
    for n in [8usize, 5, 20] {
        let ours = resample_grid(&grid.data, 16, 16, n, n, 8);
        let diff = max_abs_diff(&ours, &r[&format!("to_{n}")].data);
        assert!(diff < 1e-5, "16 -> {n}: max abs difference {diff}");
    }
}
