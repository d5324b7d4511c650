//! Per-frame pipeline speed of the tract backend: `cargo bench -p reddino-edge --bench pipeline`.
//!
//! Synthetic 1280x960 fields go through cell finding, cropping, preprocessing, ViT-S/14 (random
//! weights, 13-class head) and classification, at input 224 and 112, batch 8, the model's
//! matrix products on 1 and on 2 threads. Reports cells/s, frame latency p50/p99, and the
//! share of the time spent outside the model.

use std::time::Instant;

use reddino_edge::analyze::{analyze_image, AnalyzeConfig};
use reddino_edge::cells;
use reddino_edge::infer::TractBackend;
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Limits, NewBundle, SigningKey, TrustedKeys};
use reddino_models::preprocess::Normalization;
use reddino_models::synth::{render, FieldSpec, SourcePreset};
use reddino_models::taxonomy::default_class_names;
use reddino_models::weights::{LinearHead, Tensor, VitWeights};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() {
    let smoke = std::env::var_os("REDDINO_BENCH_SMOKE").is_some();
    let (preset, sizes, frames, (w, h)) = if smoke {
        (Preset::Tiny, vec![56usize], 1u64, (640u32, 480u32))
    } else {
        (Preset::Small, vec![224, 112], 3, (1280, 960))
    };
    let names = default_class_names();
    let key = SigningKey::generate().expect("key");
    let mut trusted = TrustedKeys::new();
    trusted.add(&key.public_key_base64()).expect("key");
    let tmp = tempfile::tempdir().expect("tempdir");
    let fields: Vec<_> = (0..frames)
        .map(|i| {
            let src = if i % 2 == 0 {
                "wright_100x"
            } else {
                "giemsa_60x"
            };
            render(&FieldSpec::new(
                w,
                h,
                500 + i,
                SourcePreset::by_name(src).expect("preset"),
            ))
            .expect("render")
        })
        .collect();
    println!(
        "| model | input | threads | frames | cells | cells/s | frame p50 ms | frame p99 ms | cell finding ms/frame | outside model % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let threads: Vec<usize> = if smoke { vec![2] } else { vec![1, 2] };
    for (size, threads) in sizes
        .iter()
        .flat_map(|&s| threads.iter().map(move |&t| (s, t)))
    {
        let cfg = VitConfig::preset(preset, size).expect("config");
        let weights = VitWeights::random(&cfg, 1, 1e-5).expect("weights");
        let c = names.len();
        let head = LinearHead {
            class_names: names.clone(),
            weight: Tensor::new(vec![c, cfg.embed_dim], vec![0.01; c * cfg.embed_dim]),
            bias: Tensor::new(vec![c], vec![0.0; c]),
        };
        let dir = tmp.path().join(format!("b{size}-{threads}"));
        bundle::write_dir(
            &NewBundle {
                name: "bench".into(),
                version: "0".into(),
                description: String::new(),
                weights: &weights,
                head: Some(&head),
                normalization: Normalization::default(),
            },
            &dir,
            &key,
        )
        .expect("bundle");
        let b = bundle::open(&dir, &trusted, &Limits::default()).expect("open");
        let mut backend = TractBackend::from_bundle(&b, 8, threads).expect("backend");
        let acfg = AnalyzeConfig::default();
        let mut lat = Vec::new();
        let mut find_ms = 0.0;
        let mut cells_total = 0;
        let mut batches = 0;
        for f in &fields {
            let t = Instant::now();
            let n = cells::find(&f.image, &acfg.cells).len();
            find_ms += t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let r = analyze_image(
                "f",
                &f.image,
                &mut backend,
                &names,
                &Normalization::default(),
                &acfg,
            )
            .expect("analyze");
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(r.cells.len(), n);
            cells_total += n;
            batches += n.div_ceil(8);
        }
        // Model-only time: full batches with nothing around them, times the batches run.
        let per = 3 * size * size;
        let batch = vec![0.1f32; 8 * per];
        let sample = 4;
        let t = Instant::now();
        for _ in 0..sample {
            reddino_edge::infer::Backend::run(&mut backend, &batch, 8).expect("run");
        }
        let model_ms = t.elapsed().as_secs_f64() * 1e3 / sample as f64 * batches as f64;
        let total_ms: f64 = lat.iter().sum();
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {} | {size} | {threads} | {} | {cells_total} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
            preset.name(),
            fields.len(),
            cells_total as f64 / (total_ms / 1e3),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            find_ms / fields.len() as f64,
            100.0 * (1.0 - model_ms / total_ms).max(0.0)
        );
    }
}
