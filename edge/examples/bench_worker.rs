//! The Rust side of the benchmark suite (`./scripts/bench.sh`, docs/benchmarks.md). One
//! measurement per process, so that the suite can pin its threads and read its peak memory;
//! every command prints one JSON object on stdout.
//!
//! ```text
//! bench_worker fields   --out DIR --source S --width W --height H --count N --seed S [--density D]
//! bench_worker model    --preset P --size S --out DIR      (weights.safetensors + model.onnx)
//! bench_worker infer    --onnx F --size S --batch B --threads T [--min-time SEC] [--min-reps N]
//!                       [--backend tract|onnxruntime [--onnxruntime-library LIB]]
//! bench_worker cells    --fields DIR [--reps N] [--threads T] [--profile P] [--um-per-px S]
//! bench_worker pipeline --fields DIR [--model BUNDLE --trusted-key KEY] [--batch B] [--threads T]
//!                       [--backend tract|onnxruntime [--onnxruntime-library LIB]]
//! bench_worker frame    --fields DIR --threads T [--reps N] [--shipped demo|chula]
//! bench_worker service  --fields DIR --threads T --fps F --frames N [--shipped demo|chula]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use image::RgbImage;
use reddino_edge::cells;
use reddino_edge::classify::SizeInput;
use reddino_edge::infer::{
    classify_inputs, Backend, BackendKind, BackendSpec, BatchOutput, CellInputs, Provider,
};
use reddino_edge::offline::analyze::AnalyzeConfig;
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::preprocess::{cell_crops, cell_crops_blanked, OwnerMap};
use reddino_models::runtime::TractModel;
use reddino_models::synth::{render, FieldSpec, SourcePreset};
use reddino_models::weights::{tensors_to_bytes, Tensor, VitWeights};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Render synthetic fields: DIR/field-NNN.png and DIR/field-NNN.json (true cells).
    Fields {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        source: String,
        #[arg(long)]
        width: u32,
        #[arg(long)]
        height: u32,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        seed: u64,
        /// Fraction of the field covered by cells (default: the source's).
        #[arg(long)]
        density: Option<f32>,
    },
    /// Random timm-layout weights of a preset at an input size, and their ONNX export.
    Model {
        #[arg(long)]
        preset: String,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Images/s of an ONNX model in tract, or in ONNX Runtime through the edge's backend
    /// (the service's own call, input copy included).
    Infer {
        #[arg(long)]
        onnx: PathBuf,
        #[command(flatten)]
        backend: BackendArg,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        threads: usize,
        #[arg(long, default_value_t = 2.0)]
        min_time: f64,
        #[arg(long, default_value_t = 3)]
        min_reps: usize,
    },
    /// The cell finder alone on each field: best-of-N time and the detected centres.
    Cells {
        #[arg(long)]
        fields: PathBuf,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Threads of the finder's pool.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Finder profile: `default` (the synthetic microscope's) or `real-smear`.
        #[arg(long, default_value = "default")]
        profile: String,
        /// The fields' scale, as a device's `analysis.um_per_px` gives it (0 = unknown).
        #[arg(long, default_value_t = 0.0)]
        um_per_px: f32,
    },
    /// Cell finding and cropping with and without blanked neighbours, side by side on each
    /// field (best of N each, alternating): the cost of the `blank_neighbours` crop policy.
    Crops {
        #[arg(long)]
        fields: PathBuf,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// The crop policy's minimum side (multiple of the median cell).
        #[arg(long, default_value_t = 0.6)]
        min_side: f32,
    },
    /// The CPU stages of a camera frame with a null model: MJPG decoding (each PNG field
    /// encoded as a camera's JPEG at quality 90, or a .jpg field as it is), cell finding, and
    /// the crops cut and preprocessed into the model's input batch, on `threads` threads;
    /// best of N per field and stage. Also YUYV conversion of the same frame.
    Frame {
        #[arg(long)]
        fields: PathBuf,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// The shipped model whose finder profile, crop policy and input size are used.
        #[arg(long, default_value = "demo", value_parser = parse_shipped)]
        shipped: reddino_edge::model::Shipped,
    },
    /// The service's pipeline (capture thread decoding MJPG, cells thread, inference thread)
    /// fed by a camera at `fps` with a null model: frames analysed and dropped.
    Service {
        #[arg(long)]
        fields: PathBuf,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long)]
        fps: f64,
        #[arg(long, default_value_t = 100)]
        frames: u64,
        #[arg(long, default_value = "demo", value_parser = parse_shipped)]
        shipped: reddino_edge::model::Shipped,
        /// Decode each frame in the capture thread as it arrives (dropped frames decoded too);
        /// with `--frame-workers 1`, the pipeline as it was before it held a camera's frames
        /// undecoded and cut frames side by side: the reference of the suite's service run.
        #[arg(long)]
        decode_at_capture: bool,
        /// Frames the cells stage works on side by side (0: the service's default; 1: one at a
        /// time, as the pipeline did before).
        #[arg(long, default_value_t = 0)]
        frame_workers: usize,
    },
    /// The per-frame path of the service (decode, find, crop, preprocess, model, classify) on
    /// replayed fields, one frame after the other.
    Pipeline {
        #[arg(long)]
        fields: PathBuf,
        /// Bundle (default: the shipped demo model).
        #[arg(long, requires = "trusted_key")]
        model: Option<PathBuf>,
        #[arg(long)]
        trusted_key: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[command(flatten)]
        backend: BackendArg,
    },
}

/// Which backend a measurement runs (ONNX Runtime with the CPU provider here).
#[derive(clap::Args)]
struct BackendArg {
    #[arg(long, default_value = "tract", value_parser = BackendKind::parse)]
    backend: BackendKind,
    /// libonnxruntime.so (default: ORT_DYLIB_PATH).
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
}

impl BackendArg {
    fn spec(&self, batch: usize, threads: usize) -> BackendSpec {
        BackendSpec {
            kind: self.backend,
            providers: vec![Provider::Cpu],
            library: self.onnxruntime_library.clone(),
            ..BackendSpec::tract(batch, threads)
        }
    }
}

fn main() {
    // As the service does (reddino-edge's main).
    reddino_edge::memory::reuse_frame_buffers();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("bench_worker: {e:#}");
        std::process::exit(1);
    }
}

/// PNG files of a fields folder, in name order.
fn field_files(dir: &Path) -> Result<Vec<PathBuf>> {
    image_files(dir, &["png"])
}

/// Files of a fields folder with one of these extensions, in name order.
fn image_files(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("no {} fields in {}", exts.join("/"), dir.display());
    }
    Ok(v)
}

fn parse_shipped(s: &str) -> Result<reddino_edge::model::Shipped, String> {
    match s {
        "demo" => Ok(reddino_edge::model::Shipped::Demo),
        "chula" => Ok(reddino_edge::model::Shipped::Chula),
        _ => Err(format!("{s}: demo or chula")),
    }
}

/// A field as a camera delivers it in MJPG: a .jpg as it is, any other image encoded as a
/// JPEG at quality 90.
fn mjpg_of(p: &Path) -> Result<Vec<u8>> {
    if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg")) {
        return Ok(std::fs::read(p)?);
    }
    let img = load(p)?;
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img)?;
    Ok(out)
}

/// Packed YUYV 4:2:2 (BT.601, limited range) of an RGB frame, as a camera sends it.
fn yuyv_of(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 3 * 2);
    for px in img.as_raw().chunks_exact(6) {
        let yuv = |r: u8, g: u8, b: u8| {
            let (r, g, b) = (r as f32, g as f32, b as f32);
            let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
            let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
            let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
            [y, u, v].map(|c| c.round().clamp(0.0, 255.0) as u8)
        };
        let a = yuv(px[0], px[1], px[2]);
        let b = yuv(px[3], px[4], px[5]);
        out.extend_from_slice(&[a[0], a[1], b[0], a[2]]);
    }
    out
}

/// The finder profile, crop policy, input size and normalisation of a shipped model.
struct CpuModel {
    cells: cells::CellFinderConfig,
    crop: reddino_edge::crop::CropPolicy,
    size: u32,
    norm: reddino_models::preprocess::Normalization,
    name: String,
    classes: usize,
}

fn cpu_model(which: reddino_edge::model::Shipped) -> Result<CpuModel> {
    let staging = tempfile::tempdir()?;
    let (bundle, key) = reddino_edge::model::shipped_model(which, staging.path())?;
    let bundle = reddino_edge::model::open_bundle(&bundle, &[key])?;
    let m = bundle.manifest();
    Ok(CpuModel {
        cells: cells::CellFinderConfig::for_model(m)?,
        crop: m.crop_policy(AnalyzeConfig::default().crop.margin),
        size: m.input_size as u32,
        norm: m.normalization(),
        name: format!("{} {}", m.name, m.version),
        classes: m.class_names.len(),
    })
}

/// A model that costs nothing: the CPU stages alone.
struct NullBackend {
    size: usize,
    classes: usize,
}

impl Backend for NullBackend {
    fn input_size(&self) -> usize {
        self.size
    }
    fn batch_size(&self) -> usize {
        64
    }
    fn run(&mut self, _pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
        let mut logits = vec![0.0; n * self.classes];
        logits
            .iter_mut()
            .step_by(self.classes)
            .for_each(|l| *l = 9.0);
        Ok(BatchOutput {
            n,
            dim: 1,
            embeddings: vec![0.0; n],
            classes: self.classes,
            logits: Some(logits),
        })
    }
    fn name(&self) -> &'static str {
        "null"
    }
    fn provider(&self) -> &str {
        "cpu"
    }
    fn describe(&self) -> String {
        "null model".into()
    }
}

/// A camera in memory: MJPG frames handed over as the V4L2 source hands them over, `left` of
/// them.
struct MjpgCamera {
    frames: Vec<(Vec<u8>, (u32, u32))>,
    next: usize,
    left: u64,
    /// Each frame decoded as the camera gives it (in the capture thread), not handed over as a
    /// buffer for the cells stage to decode.
    decode_at_capture: bool,
}

impl reddino_edge::capture::FrameSource for MjpgCamera {
    fn next_frame(
        &mut self,
    ) -> Result<Option<reddino_edge::capture::Frame>, reddino_edge::capture::CaptureError> {
        use reddino_edge::capture::Captured;
        self.next_captured()?.map(Captured::decode).transpose()
    }
    fn next_captured(
        &mut self,
    ) -> Result<Option<reddino_edge::capture::Captured>, reddino_edge::capture::CaptureError> {
        use reddino_edge::capture::{CameraBuffer, Captured, PixelFormat};
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let (data, (width, height)) = &self.frames[self.next % self.frames.len()];
        self.next += 1;
        // Copied, as a V4L2 camera's frame is copied out of the driver's buffer.
        let buffer = Captured::Buffer(CameraBuffer {
            index: self.next as u64 - 1,
            captured: std::time::SystemTime::now(),
            origin: "camera".into(),
            format: PixelFormat::Mjpg,
            width: *width,
            height: *height,
            data: data.clone(),
        });
        Ok(Some(if self.decode_at_capture {
            Captured::Decoded(buffer.decode()?)
        } else {
            buffer
        }))
    }
    fn is_live(&self) -> bool {
        true
    }
}

/// An image by its content, whatever its name's extension says (data sets hold PNGs named .jpg).
fn load(p: &Path) -> Result<RgbImage> {
    Ok(image::ImageReader::open(p)
        .with_context(|| format!("opening {}", p.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", p.display()))?
        .decode()
        .with_context(|| format!("decoding {}", p.display()))?
        .to_rgb8())
}

/// Counts the time spent in the model.
struct Timed {
    inner: Box<dyn Backend>,
    seconds: f64,
}

impl Backend for Timed {
    fn input_size(&self) -> usize {
        self.inner.input_size()
    }
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }
    fn run(&mut self, pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
        let t = Instant::now();
        let r = self.inner.run(pixels, n);
        self.seconds += t.elapsed().as_secs_f64();
        r
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// One timed call of a backend on a batch.
type Runner = Box<dyn FnMut(&[f32]) -> Result<()>>;

/// The edge's ONNX Runtime backend (CPU provider) on a `model` folder's graph, checked
/// against tract's embeddings of the probe images first.
#[cfg(feature = "onnxruntime")]
fn ort_runner(
    onnx: &Path,
    bytes: Vec<u8>,
    backend: &BackendArg,
    size: usize,
    batch: usize,
    threads: usize,
) -> Result<Runner> {
    let dir = onnx.parent().unwrap_or(Path::new("."));
    let w = VitWeights::load(&dir.join("weights.safetensors"))?;
    let model = reddino_edge::infer::onnxruntime::OrtModel {
        onnx: bytes,
        sha256: String::new(),
        input_size: size,
        embed_dim: w.config.embed_dim,
        classes: 0,
    };
    let mut b = reddino_edge::infer::OrtBackend::from_model(&backend.spec(batch, threads), &model)?;
    // Same model as tract's: the probe images' embeddings.
    let probe = std::fs::read(dir.join("probe.safetensors"))?;
    let probe = safetensors::SafeTensors::deserialize(&probe)?;
    let f32s = |name: &str| -> Result<Vec<f32>> {
        Ok(probe
            .tensor(name)?
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    // One probe image per call: the timed batch may be 1.
    let pixels = f32s("pixels")?;
    let mut got = Vec::new();
    for image in pixels.chunks_exact(pixels.len() / 2) {
        got.extend(b.run(image, 1)?.embeddings);
    }
    let diff = got
        .iter()
        .zip(f32s("embedding")?)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    if diff > 1e-3 {
        bail!("onnxruntime disagrees with tract on the probe images: max diff {diff}");
    }
    Ok(Box::new(move |x| {
        b.run(x, batch)?;
        Ok(())
    }))
}

#[cfg(not(feature = "onnxruntime"))]
fn ort_runner(
    _: &Path,
    _: Vec<u8>,
    _: &BackendArg,
    _: usize,
    _: usize,
    _: usize,
) -> Result<Runner> {
    bail!("built without the onnxruntime feature")
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Fields {
            out,
            source,
            width,
            height,
            count,
            seed,
            density,
        } => {
            std::fs::create_dir_all(&out)?;
            let mut preset = SourcePreset::by_name(&source)?;
            if let Some(d) = density {
                preset.density = d;
            }
            let mut cells_total = 0;
            for i in 0..count {
                let f = render(&FieldSpec::new(width, height, seed + i, preset.clone()))?;
                let stem = out.join(format!("field-{i:03}"));
                f.image.save(stem.with_extension("png"))?;
                let truth: Vec<_> = f
                    .cells
                    .iter()
                    .map(|c| json!({"center": [c.center.0, c.center.1], "radius": c.radius}))
                    .collect();
                cells_total += truth.len();
                std::fs::write(
                    stem.with_extension("json"),
                    serde_json::to_vec(&json!({ "cells": truth }))?,
                )?;
            }
            println!(
                "{}",
                json!({"fields": count, "cells": cells_total, "width": width, "height": height})
            );
        }
        Cmd::Model { preset, size, out } => {
            std::fs::create_dir_all(&out)?;
            let cfg = VitConfig::preset(Preset::parse(&preset)?, size)?;
            let w = VitWeights::random(&cfg, 7, 1e-5)?;
            w.save(&out.join("weights.safetensors"))?;
            let onnx = reddino_models::onnx::export(&w, None)?;
            std::fs::write(out.join("model.onnx"), &onnx)?;
            // Two images and tract's embeddings of them: every contender checks that it runs
            // the same model before it is timed.
            let pixels = input(2 * 3 * size * size);
            let emb = TractModel::new(&onnx, 2, size)?.run(&pixels)?.embedding;
            let probe = std::collections::BTreeMap::from([
                (
                    "pixels".to_string(),
                    Tensor::new(vec![2, 3, size, size], pixels),
                ),
                (
                    "embedding".to_string(),
                    Tensor::new(vec![2, cfg.embed_dim], emb),
                ),
            ]);
            std::fs::write(out.join("probe.safetensors"), tensors_to_bytes(&probe)?)?;
            println!(
                "{}",
                json!({
                    "embed_dim": cfg.embed_dim,
                    "depth": cfg.depth,
                    "heads": cfg.num_heads,
                    "macs_per_image": cfg.macs_per_image(),
                })
            );
        }
        Cmd::Infer {
            onnx,
            backend,
            size,
            batch,
            threads,
            min_time,
            min_reps,
        } => {
            let bytes =
                std::fs::read(&onnx).with_context(|| format!("reading {}", onnx.display()))?;
            let t = Instant::now();
            let mut run: Runner = match backend.backend {
                BackendKind::Tract => {
                    let m = TractModel::with_threads(&bytes, batch, size, threads)?;
                    Box::new(move |x| {
                        m.run(x)?;
                        Ok(())
                    })
                }
                BackendKind::Onnxruntime => {
                    ort_runner(&onnx, bytes, &backend, size, batch, threads)?
                }
            };
            let x = input(batch * 3 * size * size);
            run(&x)?;
            let load_s = t.elapsed().as_secs_f64();
            let (mut reps, t) = (0usize, Instant::now());
            while reps < min_reps || t.elapsed().as_secs_f64() < min_time {
                run(&x)?;
                reps += 1;
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{}",
                json!({
                    "images_per_s": batch as f64 / s,
                    "ms_per_batch": s * 1e3,
                    "reps": reps,
                    "load_s": load_s,
                })
            );
        }
        Cmd::Cells {
            fields,
            reps,
            threads,
            profile,
            um_per_px,
        } => {
            let cfg = cells::CellFinderConfig {
                um_per_px,
                ..cells::CellFinderConfig::profile(&profile)?
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()?;
            let mut rows = Vec::new();
            for p in image_files(&fields, &["png", "jpg"])? {
                let img = load(&p)?;
                let mut best = f64::MAX;
                let mut found = Vec::new();
                for _ in 0..reps.max(1) {
                    let t = Instant::now();
                    found = pool.install(|| cells::find(&img, &cfg));
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let centres: Vec<[f32; 2]> =
                    found.iter().map(|c| [c.center.0, c.center.1]).collect();
                rows.push(json!({
                    "field": p.file_name().map(|n| n.to_string_lossy().to_string()),
                    "ms": best * 1e3,
                    "centres": centres,
                }));
            }
            println!("{}", json!({ "fields": rows }));
        }
        Cmd::Crops {
            fields,
            reps,
            min_side,
        } => {
            let cfg = cells::CellFinderConfig::default();
            let margin = AnalyzeConfig::default().crop.margin;
            let mut out = Vec::new();
            for p in field_files(&fields)? {
                let img = load(&p)?;
                let (mut plain, mut blanked) = (f64::INFINITY, f64::INFINITY);
                let mut n = (0, 0);
                for _ in 0..reps.max(1) {
                    let t = Instant::now();
                    let found = cells::find(&img, &cfg);
                    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
                    n.0 = cell_crops(&img, &boxes, margin, min_side).len();
                    plain = plain.min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    let (found, owners) = cells::find_with_owners(&img, &cfg);
                    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
                    n.1 = cell_crops_blanked(&img, &boxes, &owners, margin, min_side).len();
                    blanked = blanked.min(t.elapsed().as_secs_f64());
                }
                anyhow::ensure!(n.0 == n.1, "{}: {} vs {} crops", p.display(), n.0, n.1);
                out.push(json!({
                    "field": p.file_name().map(|f| f.to_string_lossy().into_owned()),
                    "cells": n.0,
                    "plain_ms": plain * 1e3,
                    "blanked_ms": blanked * 1e3,
                }));
            }
            println!("{}", json!({ "fields": out }));
        }
        Cmd::Frame {
            fields,
            threads,
            reps,
            shipped,
        } => {
            let m = cpu_model(shipped)?;
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()?;
            let mut rows = Vec::new();
            for p in image_files(&fields, &["png", "jpg"])? {
                let mjpg = mjpg_of(&p)?;
                let first = reddino_edge::capture::mjpg_to_rgb(&mjpg, None)?;
                let size = first.dimensions();
                let yuyv = yuyv_of(&first);
                let mut best = [f64::MAX; 5];
                let mut cells_n = 0;
                let mut spare = Vec::new();
                for _ in 0..reps.max(1) {
                    let t0 = Instant::now();
                    let img = reddino_edge::capture::mjpg_to_rgb_into(
                        &mjpg,
                        Some(size),
                        std::mem::take(&mut spare),
                    )?;
                    let t1 = Instant::now();
                    let (found, owners) = pool.install(|| {
                        cells::find_maybe_owners(&img, &m.cells, m.crop.blank_neighbours)
                    });
                    let t2 = Instant::now();
                    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
                    let mut inputs = vec![0f32; boxes.len() * 3 * (m.size * m.size) as usize];
                    pool.install(|| {
                        m.crop
                            .cut_into(&img, &boxes, owners.as_ref(), m.size, &m.norm, &mut inputs)
                    });
                    let t3 = Instant::now();
                    let rgb =
                        pool.install(|| reddino_edge::capture::yuyv_to_rgb(&yuyv, size.0, size.1))?;
                    let t4 = Instant::now();
                    anyhow::ensure!(rgb.dimensions() == size);
                    cells_n = found.len();
                    spare = img.into_raw();
                    let times = [t1 - t0, t2 - t1, t3 - t2, t3 - t0, t4 - t3];
                    for (b, t) in best.iter_mut().zip(times) {
                        *b = b.min(t.as_secs_f64() * 1e3);
                    }
                }
                rows.push(json!({
                    "field": p.file_name().map(|n| n.to_string_lossy().to_string()),
                    "width": size.0,
                    "height": size.1,
                    "cells": cells_n,
                    "mjpg_bytes": mjpg.len(),
                    "decode_ms": best[0],
                    "find_ms": best[1],
                    "cut_ms": best[2],
                    "total_ms": best[3],
                    "yuyv_ms": best[4],
                }));
            }
            println!(
                "{}",
                json!({ "model": m.name, "threads": threads, "input_size": m.size, "fields": rows })
            );
        }
        Cmd::Service {
            fields,
            threads,
            fps,
            frames,
            shipped,
            decode_at_capture,
            frame_workers,
        } => {
            use reddino_edge::pipeline::{ModelInfo, Pipeline, PipelineSettings, Shared};
            let m = cpu_model(shipped)?;
            let mut camera = MjpgCamera {
                frames: Vec::new(),
                next: 0,
                left: frames,
                decode_at_capture,
            };
            for p in image_files(&fields, &["png", "jpg"])? {
                let mjpg = mjpg_of(&p)?;
                let size = reddino_edge::capture::mjpg_to_rgb(&mjpg, None)?.dimensions();
                camera.frames.push((mjpg, size));
            }
            let (w, h) = camera.frames[0].1;
            let tmp = tempfile::tempdir()?;
            let names: Vec<String> = (0..m.classes).map(|i| format!("c{i}")).collect();
            let shared = Shared::new(
                PipelineSettings {
                    device_id: "bench".into(),
                    topic_prefix: "reddino".into(),
                    cells: m.cells.clone(),
                    crop: m.crop,
                    min_confidence: 0.0,
                    frame_queue: 2,
                    crop_queue: 2,
                    camera_retry_max: std::time::Duration::from_secs(1),
                    batch_wait: std::time::Duration::ZERO,
                    camera_stall: std::time::Duration::from_secs(10),
                    cpu_threads: threads,
                    frame_workers,
                },
                ModelInfo {
                    id: "null@1".into(),
                    sha256: "0".repeat(64),
                    backend: "null".into(),
                    provider: "cpu".into(),
                    backend_detail: "null model".into(),
                    class_names: names,
                    normalization: m.norm,
                    input_size: m.size,
                    size: None,
                },
                reddino_edge::publish::outbox::Outbox::open(
                    &tmp.path().join("outbox.db"),
                    reddino_edge::publish::outbox::OutboxLimits::default(),
                )?,
                std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            );
            let source = reddino_edge::capture::Paced::new(camera, fps);
            let t = Instant::now();
            let pipeline = Pipeline::start(
                shared.clone(),
                Box::new(source),
                Box::new(NullBackend {
                    size: m.size as usize,
                    classes: m.classes,
                }),
            );
            while !shared.pipeline_idle() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            pipeline.join();
            let wall = t.elapsed().as_secs_f64();
            let f = shared.snapshot().frames;
            println!(
                "{}",
                json!({
                    "model": m.name, "threads": threads, "fps": fps, "width": w, "height": h,
                    "decode_at_capture": decode_at_capture, "frame_workers": frame_workers,
                    "captured": f.captured, "processed": f.processed, "dropped": f.dropped,
                    "bad": f.bad, "failed": f.failed, "cells": f.cells, "wall_s": wall,
                    "analysed_per_s": f.processed as f64 / wall,
                })
            );
        }
        Cmd::Pipeline {
            fields,
            model,
            trusted_key,
            batch,
            threads,
            backend,
        } => {
            // The CPU stages on the same number of threads as the model.
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build_global()?;
            let staging = tempfile::tempdir()?;
            let (bundle_path, key) = match (model, trusted_key) {
                (Some(m), Some(k)) => (m, k),
                _ => reddino_edge::model::demo_model(staging.path())?,
            };
            let bundle = reddino_edge::model::open_bundle(&bundle_path, &[key])?;
            let names = bundle.manifest().class_names.clone();
            let norm = bundle.manifest().normalization();
            let mut backend = Timed {
                inner: reddino_edge::infer::open(&backend.spec(batch, threads), &bundle)?,
                seconds: 0.0,
            };
            let m = bundle.manifest();
            let cfg = AnalyzeConfig {
                crop: m.crop_policy(AnalyzeConfig::default().crop.margin),
                size: SizeInput::of(m, 0.0),
                ..AnalyzeConfig::default()
            };
            let files = field_files(&fields)?;
            // The model's crop policy, as the service cuts.
            let find = |img: &RgbImage| {
                cells::find_maybe_owners(img, &cfg.cells, cfg.crop.blank_neighbours)
            };
            // Cut, resized and normalised straight into the model's input, as the service does.
            let size = m.input_size as u32;
            let crops_of = |img: &RgbImage, found: &[cells::Cell], owners: &Option<OwnerMap>| {
                let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
                let mut inputs = vec![0f32; boxes.len() * 3 * (size * size) as usize];
                cfg.crop
                    .cut_into(img, &boxes, owners.as_ref(), size, &norm, &mut inputs);
                inputs
            };
            // One warm-up frame (first-run allocations), not counted.
            let warm = load(&files[0])?;
            let (found, owners) = find(&warm);
            let crops = crops_of(&warm, &found, &owners);
            let boxes_of =
                |found: &[cells::Cell]| -> Vec<[u32; 4]> { found.iter().map(|c| c.bbox).collect() };
            let boxes = boxes_of(&found);
            let inputs = CellInputs {
                pixels: &crops,
                boxes: &boxes,
                size: cfg.size.as_ref(),
            };
            classify_inputs(inputs, &mut backend, &names, cfg.min_confidence)?;
            backend.seconds = 0.0;

            let mut frames = Vec::new();
            let t_all = Instant::now();
            for p in &files {
                let t0 = Instant::now();
                let img = load(p)?;
                let t1 = Instant::now();
                let (found, owners) = find(&img);
                let t2 = Instant::now();
                let crops = crops_of(&img, &found, &owners);
                let t3 = Instant::now();
                let model_before = backend.seconds;
                let boxes = boxes_of(&found);
                let inputs = CellInputs {
                    pixels: &crops,
                    boxes: &boxes,
                    size: cfg.size.as_ref(),
                };
                let preds = classify_inputs(inputs, &mut backend, &names, cfg.min_confidence)?;
                let t4 = Instant::now();
                let model_s = backend.seconds - model_before;
                let classify_s = (t4 - t3).as_secs_f64();
                frames.push(json!({
                    "cells": preds.len(),
                    "width": img.width(),
                    "height": img.height(),
                    "latency_ms": (t4 - t0).as_secs_f64() * 1e3,
                    "decode_ms": (t1 - t0).as_secs_f64() * 1e3,
                    "find_ms": (t2 - t1).as_secs_f64() * 1e3,
                    "crop_preprocess_ms": (t3 - t2).as_secs_f64() * 1e3,
                    "model_ms": model_s * 1e3,
                    "classify_ms": (classify_s - model_s) * 1e3,
                }));
            }
            let wall = t_all.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({
                    "model": format!("{} {}", m.name, m.version),
                    "crop_min_side": m.crop_min_side,
                    "blank_neighbours": m.blank_neighbours,
                    "input_size": m.input_size,
                    "batch": batch,
                    "threads": threads,
                    "wall_s": wall,
                    "frames": frames,
                })
            );
        }
    }
    Ok(())
}

/// Deterministic pixel values in about [-2, 2] (what normalised crops look like).
fn input(n: usize) -> Vec<f32> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}
