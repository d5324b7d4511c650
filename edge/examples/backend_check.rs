//! A backend checked against tract on one bundle, as scripts/jetson-check.sh runs it on a
//! device: how long the backend takes to open (TensorRT: the engine build, or its load from
//! the cache), how closely its embeddings follow tract's (cosine similarity per image, largest
//! absolute difference of embeddings and logits), and cells per second at each batch size.
//! Prints one JSON object.
//!
//! ```text
//! backend_check [--model BUNDLE --trusted-key KEY] [--providers tensorrt,cuda,cpu]
//!               [--onnxruntime-library LIB] [--engines DIR] [--precision fp16|fp32]
//!               [--batches 1,8,64] [--seconds 3]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use reddino_edge::infer::{self, BackendKind, BackendSpec, Precision, Provider};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Bundle (default: the shipped demo model).
    #[arg(long, requires = "trusted_key")]
    model: Option<PathBuf>,
    #[arg(long)]
    trusted_key: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "tensorrt,cuda,cpu", value_parser = Provider::parse)]
    providers: Vec<Provider>,
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
    /// TensorRT engine cache (a state directory's `engines`).
    #[arg(long, default_value = "engines")]
    engines: PathBuf,
    #[arg(long, default_value = "fp16", value_parser = parse_precision)]
    precision: Precision,
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    batches: Vec<usize>,
    /// Seconds of timed runs per batch size.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// CPU threads for tract (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    match s {
        "fp16" => Ok(Precision::Fp16),
        "fp32" => Ok(Precision::Fp32),
        _ => Err(format!("unknown precision {s} (fp16 or fp32)")),
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let a = Args::parse();
    let staging = tempfile::tempdir()?;
    let (bundle_path, key) = match (a.model, a.trusted_key) {
        (Some(m), Some(k)) => (m, k),
        _ => reddino_edge::model::demo_model(staging.path())?,
    };
    let bundle = reddino_edge::model::open_bundle(&bundle_path, &[key])?;
    let m = bundle.manifest();
    let size = m.input_size;
    let max_batch = a.batches.iter().copied().max().unwrap_or(1).max(1);

    let spec = BackendSpec {
        kind: BackendKind::Onnxruntime,
        providers: a.providers.clone(),
        library: a.onnxruntime_library.clone(),
        precision: a.precision,
        engines: Some(a.engines.clone()),
        ..BackendSpec::tract(max_batch, a.threads)
    };
    let t = Instant::now();
    let mut backend = infer::open(&spec, &bundle).context("opening the ONNX Runtime backend")?;
    let open_s = t.elapsed().as_secs_f64();
    let mut tract = infer::open(&BackendSpec::tract(max_batch.min(16), a.threads), &bundle)?;

    // Agreement with tract on the same images.
    let n = max_batch.min(16);
    let per = 3 * size * size;
    let x: Vec<f32> = (0..n * per)
        .map(|i| ((i as u64).wrapping_mul(2654435761) % 4000) as f32 / 1000.0 - 2.0)
        .collect();
    let got = backend.run(&x, n)?;
    let want = tract.run(&x, n)?;
    let dim = got.dim;
    let mut cos_min = f64::INFINITY;
    for i in 0..n {
        let (u, v) = (
            &got.embeddings[i * dim..(i + 1) * dim],
            &want.embeddings[i * dim..(i + 1) * dim],
        );
        let dot: f64 = u.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
        let nu: f64 = u.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nv: f64 = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        cos_min = cos_min.min(dot / (nu * nv).max(1e-30));
    }
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let emb_diff = max_diff(&got.embeddings, &want.embeddings);
    let logit_diff = match (&got.logits, &want.logits) {
        (Some(a), Some(b)) => Some(max_diff(a, b)),
        _ => None,
    };

    // Cells per second at each batch size.
    let mut speed = serde_json::Map::new();
    for &b in &a.batches {
        let x = vec![0.1f32; b * per];
        backend.run(&x, b)?;
        let (mut reps, t) = (0usize, Instant::now());
        while reps < 3 || t.elapsed().as_secs_f64() < a.seconds {
            backend.run(&x, b)?;
            reps += 1;
        }
        let s = t.elapsed().as_secs_f64();
        speed.insert(b.to_string(), json!((reps * b) as f64 / s));
    }
    println!(
        "{}",
        json!({
            "model": format!("{} {}", m.name, m.version),
            "input_size": size,
            "backend": backend.describe(),
            "provider": backend.provider(),
            "precision": a.precision.name(),
            "open_s": open_s,
            "cosine_min": cos_min,
            "embedding_max_abs_diff": emb_diff,
            "logits_max_abs_diff": logit_diff,
            "images_checked": n,
            "cells_per_s": speed,
        })
    );
    Ok(())
}
