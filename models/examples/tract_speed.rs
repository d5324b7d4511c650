//! Times one batch of the exported ViT in tract:
//! `cargo run --release -p reddino-models --example tract_speed [PRESET] [SIZE] [BATCH] [THREADS]`.
use std::time::Instant;

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::{onnx, runtime::TractModel, weights::VitWeights};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let preset = Preset::parse(a.get(1).map(String::as_str).unwrap_or("small")).expect("preset");
    let size: usize = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(112);
    let batch: usize = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(8);
    let cfg = VitConfig::preset(preset, size).expect("config");
    let w = VitWeights::random(&cfg, 0, 1e-5).expect("weights");
    let threads: usize = a.get(4).and_then(|v| v.parse().ok()).unwrap_or(1);
    let m = TractModel::with_threads(
        &onnx::export(&w, None).expect("export"),
        batch,
        size,
        threads,
    )
    .expect("model");
    let x = vec![0.1f32; batch * 3 * size * size];
    m.run(&x).expect("warm-up");
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        m.run(&x).expect("run");
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let gmac = cfg.macs_per_image() as f64 * batch as f64 / 1e9;
    println!(
        "{} {size} batch {batch} threads {threads}: {:.1} ms/batch, {:.1} images/s, {:.1} GMAC/s",
        preset.name(),
        s * 1e3,
        batch as f64 / s,
        gmac / s
    );
}
