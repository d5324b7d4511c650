//! Training-step time of the tch trainer against the same model and losses in plain PyTorch
//! (tests/reference/pytorch_step.py), same torch build, same threads, same input, in one run.
//!
//!   . scripts/torch-env.sh && cargo bench -p reddino-trainer --bench step
//!
//! Each side is timed in several rounds that alternate (tch, PyTorch, tch, PyTorch, ...) and
//! the fastest round of each counts, so that a drift of a shared machine during the run does
//! not land on one side only.
//!
//! Env: REDDINO_BENCH_THREADS (default "1,2"), REDDINO_BENCH_STEPS (default 20),
//! REDDINO_BENCH_ROUNDS (default 3),
//! REDDINO_BENCH_SMOKE=1 (one step each: CI checks that it runs), REDDINO_PYTHON (the venv's),
//! REDDINO_BENCH_JSON=FILE (also write the rows as JSON: the suite, scripts/bench.sh, reads it).

use std::process::Command;
use std::time::Instant;

use reddino_trainer::config::Config;
use reddino_trainer::ssl::Batch;
use reddino_trainer::train::Trainer;
use tch::{Kind, Tensor};

fn main() {
    let smoke = std::env::var_os("REDDINO_BENCH_SMOKE").is_some();
    let (steps, warmup) = if smoke {
        (1, 1)
    } else {
        (
            std::env::var("REDDINO_BENCH_STEPS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(20),
            3,
        )
    };
    let threads: Vec<usize> = std::env::var("REDDINO_BENCH_THREADS")
        .unwrap_or_else(|_| if smoke { "1".into() } else { "1,2".into() })
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds: usize = if smoke {
        1
    } else {
        std::env::var("REDDINO_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3)
            .max(1)
    };
    let python = std::env::var("REDDINO_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/reference/pytorch_step.py"
    );

    let mut cfg = Config::preset("tiny").expect("tiny preset");
    cfg.train.device = "cpu".into();
    let b = cfg.train.batch_size as i64;
    let img = cfg.model.img_size as i64;
    let n = (img / 14) * (img / 14);
    println!(
        "training step, tiny preset (ViT {}-d x {} at {img} px, batch {b} x 2 crops, {} prototypes), CPU",
        cfg.vit().unwrap().embed_dim,
        cfg.vit().unwrap().depth,
        cfg.head.prototypes
    );
    println!("| threads | tch (ms/step) | PyTorch (ms/step) | ratio tch/PyTorch |");
    println!("|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &t in &threads {
        let mut c = cfg.clone();
        c.train.threads = t;
        let mut trainer = Trainer::new(c).expect("trainer");
        tch::manual_seed(0);
        let crops = Tensor::randn([2 * b, 3, img, img], (Kind::Float, tch::Device::Cpu));
        let masks = Tensor::zeros([2 * b, n], (Kind::Bool, tch::Device::Cpu));
        let _ = masks
            .narrow(0, 0, b)
            .narrow(1, 0, (n as f64 * 0.3) as i64)
            .fill_(1);
        let batch = Batch {
            crops,
            masks,
            locals: None,
        };
        for _ in 0..warmup {
            trainer.optimize(&batch).expect("step");
        }
        let reference_ms = || -> f64 {
            let h = &cfg.head;
            let v = cfg.vit().unwrap();
            let out = Command::new(&python)
                .arg(script)
                .args([
                    "--embed-dim",
                    &v.embed_dim.to_string(),
                    "--depth",
                    &v.depth.to_string(),
                ])
                .args([
                    "--heads",
                    &v.num_heads.to_string(),
                    "--img",
                    &img.to_string(),
                    "--batch",
                    &b.to_string(),
                ])
                .args([
                    "--hidden",
                    &h.hidden_dim.to_string(),
                    "--bottleneck",
                    &h.bottleneck_dim.to_string(),
                ])
                .args([
                    "--prototypes",
                    &h.prototypes.to_string(),
                    "--threads",
                    &t.to_string(),
                ])
                .args([
                    "--steps",
                    &steps.to_string(),
                    "--warmup",
                    &warmup.to_string(),
                ])
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "running {python} {script}: {e} (set REDDINO_PYTHON to the venv's python)"
                    )
                });
            assert!(
                out.status.success(),
                "PyTorch reference failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim()).expect("reference JSON");
            v["ms_per_step"].as_f64().expect("ms_per_step")
        };
        let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            let t0 = Instant::now();
            for _ in 0..steps {
                trainer.optimize(&batch).expect("step");
            }
            ours = ours.min(t0.elapsed().as_secs_f64() * 1000.0 / steps as f64);
            theirs = theirs.min(reference_ms());
        }
        println!("| {t} | {ours:.1} | {theirs:.1} | {:.3} |", ours / theirs);
        rows.push(serde_json::json!({
            "threads": t, "steps": steps, "rounds": rounds, "tch_ms": ours, "pytorch_ms": theirs,
        }));
    }
    if let Ok(path) = std::env::var("REDDINO_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_vec(&rows).expect("rows serialise"))
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
}
