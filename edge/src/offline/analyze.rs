//! Offline analysis of image files (`reddino-edge analyze`): for each image, find cells, crop,
//! preprocess, run the model in batches, classify and count.

use std::collections::BTreeMap;
use std::path::PathBuf;

use image::RgbImage;
use reddino_models::preprocess::Normalization;
use serde::Serialize;

use crate::cells::CellFinderConfig;
use crate::classify::{Counts, SizeInput, UNCERTAIN};
use crate::crop::{find_and_cut_into, CropPolicy, FrameInputs};
use crate::error::{Error, Result};
use crate::infer::{classify_inputs, Backend, BackendKind, BackendSpec, CellInputs, Provider};
use crate::model::{model_or_shipped, open_bundle, Shipped};

/// `reddino-edge analyze`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// Model bundle (directory or .tar) with a classification head; default: a shipped
    /// model (--shipped).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Without --model: `chula` (real smears, Chula RBC-12's classes, 1000x) or `demo`
    /// (the synthetic microscope's smears).
    #[arg(long, value_enum, default_value = "chula")]
    pub shipped: Shipped,
    /// Trusted minisign public key(s) for the bundle signature.
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<PathBuf>,
    /// Print one JSON object per line (default: a short summary per image).
    #[arg(long)]
    pub json: bool,
    /// Images per inference call.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Threads for the model's matrix products (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Below this top probability a cell counts as `uncertain`.
    #[arg(long, default_value_t = 0.5)]
    pub min_confidence: f32,
    /// Micrometres per pixel of the images, for a model that takes each cell's measured size
    /// (its manifest's `cell_size`); 0 = the model's own scale (the same microscope and camera).
    /// Set, it also gives the cell finder the cells' size (no first look at each image).
    #[arg(long, default_value_t = 0.0, value_parser = parse_um_per_px)]
    pub um_per_px: f32,
    /// `tract` (CPU) or `onnxruntime`.
    #[arg(long, default_value = "tract", value_parser = BackendKind::parse)]
    pub backend: BackendKind,
    /// ONNX Runtime providers, most preferred first (comma-separated: tensorrt,cuda,cpu).
    #[arg(long, value_delimiter = ',', default_value = "tensorrt,cuda,cpu", value_parser = Provider::parse)]
    pub providers: Vec<Provider>,
    /// libonnxruntime.so (default: ORT_DYLIB_PATH, then the loader's search path).
    #[arg(long)]
    pub onnxruntime_library: Option<PathBuf>,
    /// Where TensorRT engines are cached (default: ~/.cache/reddino-edge/engines).
    #[arg(long)]
    pub engines: Option<PathBuf>,
    /// Image files (png, jpg, bmp, tif).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// `reddino-edge analyze`: one line per image on stdout (JSON with `--json`). An image that
/// does not decode is reported and skipped; the command then fails after the others.
pub fn command(args: &AnalyzeArgs) -> Result<()> {
    // Without --model: a shipped model, unpacked into a private folder.
    let staging = tempfile::tempdir()
        .map_err(|e| Error::file("creating a temporary folder in", std::env::temp_dir(), e))?;
    let (model, trusted_keys) = model_or_shipped(
        args.model.clone(),
        args.trusted_keys.clone(),
        args.shipped,
        staging.path(),
    )?;
    let b = open_bundle(&model, &trusted_keys)?;
    let m = b.manifest();
    let spec = BackendSpec {
        kind: args.backend,
        providers: args.providers.clone(),
        library: args.onnxruntime_library.clone(),
        engines: args.engines.clone().or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/reddino-edge/engines"))
        }),
        ..BackendSpec::tract(args.batch.max(1), args.threads)
    };
    let mut backend = crate::infer::open(&spec, &b)?;
    log::info!("model {} {}: {}", m.name, m.version, backend.describe());
    let cfg = AnalyzeConfig {
        min_confidence: args.min_confidence,
        crop: m.crop_policy(CropPolicy::DEFAULT_MARGIN),
        cells: CellFinderConfig::for_device(m, args.um_per_px)?,
        size: SizeInput::of(m, args.um_per_px),
    };
    let mut failed = 0;
    for path in &args.images {
        let img = match crate::capture::decode_image_file(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        let report = analyze_image(
            &path.display().to_string(),
            &img,
            backend.as_mut(),
            &m.class_names,
            &m.normalization(),
            &cfg,
        )
        .map_err(|source| Error::Analyze {
            image: path.clone(),
            source,
        })?;
        if args.json {
            println!("{}", serde_json::to_string(&report).expect("serialisable"));
        } else {
            println!("{}", report.summary_line());
        }
    }
    if failed > 0 {
        return Err(Error::Failed(format!(
            "{failed} of {} images could not be read",
            args.images.len()
        )));
    }
    Ok(())
}

/// Settings of the analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeConfig {
    pub cells: CellFinderConfig,
    /// How cells are cut: the model's policy (`Manifest::crop_policy`) at the device's margin.
    pub crop: CropPolicy,
    /// Below this top probability a cell counts as uncertain.
    pub min_confidence: f32,
    /// The head's size term at the frames' scale, for a model that has one.
    pub size: Option<SizeInput>,
}

impl Default for AnalyzeConfig {
    fn default() -> Self {
        AnalyzeConfig {
            cells: CellFinderConfig::default(),
            crop: CropPolicy::default(),
            min_confidence: 0.5,
            size: None,
        }
    }
}

/// One classified cell in the report.
#[derive(Debug, Clone, Serialize)]
pub struct CellReport {
    pub bbox: [u32; 4],
    pub class: String,
    pub confidence: f32,
}

/// Result for one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub image: String,
    pub width: u32,
    pub height: u32,
    /// Cells per class name (and `uncertain`).
    pub counts: BTreeMap<String, u64>,
    pub cells: Vec<CellReport>,
}

impl ImageReport {
    /// `IMAGE: N cells - class n, ...` (classes with no cell left out).
    pub fn summary_line(&self) -> String {
        let total: u64 = self.counts.values().sum();
        let mut parts: Vec<String> = self
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        parts.sort();
        format!("{}: {total} cells - {}", self.image, parts.join(", "))
    }
}

/// Analyses one image with a backend whose head has `class_names`.
pub fn analyze_image(
    name: &str,
    img: &RgbImage,
    backend: &mut dyn Backend,
    class_names: &[String],
    norm: &Normalization,
    cfg: &AnalyzeConfig,
) -> Result<ImageReport, reddino_models::Error> {
    let size = backend.input_size() as u32;
    let FrameInputs {
        cells: found,
        boxes,
        inputs,
    } = find_and_cut_into(img, &cfg.cells, &cfg.crop, size, norm);
    let cells = CellInputs {
        pixels: &inputs,
        boxes: &boxes,
        size: cfg.size.as_ref(),
    };
    let predictions = classify_inputs(cells, backend, class_names, cfg.min_confidence)?;
    let mut counts = Counts::new(class_names.len());
    let reports = found
        .iter()
        .zip(&predictions)
        .map(|(cell, p)| {
            counts.add(p);
            CellReport {
                bbox: cell.bbox,
                class: p
                    .class
                    .map(|c| class_names[c].clone())
                    .unwrap_or_else(|| UNCERTAIN.into()),
                confidence: p.confidence,
            }
        })
        .collect();
    let by_name = counts.by_name(class_names);
    Ok(ImageReport {
        image: name.into(),
        width: img.width(),
        height: img.height(),
        counts: by_name,
        cells: reports,
    })
}

/// `--um-per-px`: 0 or a positive, finite scale.
fn parse_um_per_px(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v == 0.0 || (v.is_finite() && v > 0.0) => Ok(v),
        _ => Err(format!(
            "{s:?} is neither 0 (the model's own scale) nor a positive number of micrometres per pixel"
        )),
    }
}
