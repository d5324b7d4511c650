//! Inference backends behind one trait, chosen by the config's `model.backend`:
//! [`tract`] (pure Rust, CPU) and, with the `onnxruntime` cargo feature, [`onnxruntime`]
//! (ONNX Runtime loaded at run time, with the TensorRT, CUDA or CPU provider). [`engines`]
//! keeps compiled TensorRT engines in the state directory, keyed on all they depend on;
//! [`gpu`] reads the TensorRT version and GPU architecture that key needs. [`open`] is the one
//! way the service, `analyze` and `model compile` get a backend.

use std::borrow::Borrow;
use std::path::PathBuf;

use image::RgbImage;
use reddino_models::bundle::Bundle;
use reddino_models::preprocess::{preprocess_into, Normalization};
use serde::{Deserialize, Serialize};

use crate::classify::{classify, Prediction, SizeInput};

pub mod engines;
#[cfg(feature = "onnxruntime")]
pub mod gpu;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod tract;

#[cfg(feature = "onnxruntime")]
pub use self::onnxruntime::OrtBackend;
pub use self::tract::TractBackend;

/// Outputs for `n` images: embeddings `[n, dim]` and, with a head, logits `[n, classes]`.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub n: usize,
    pub dim: usize,
    pub embeddings: Vec<f32>,
    pub classes: usize,
    pub logits: Option<Vec<f32>>,
}

/// Something that turns preprocessed pixels into embeddings and logits.
pub trait Backend: Send {
    /// Input side in pixels.
    fn input_size(&self) -> usize;
    /// Largest batch per call.
    fn batch_size(&self) -> usize;
    /// Runs `n <= batch_size()` images (`n * 3 * S * S` values, NCHW).
    fn run(&mut self, pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error>;
    /// The backend's name (`tract`, `onnxruntime`).
    fn name(&self) -> &'static str;
    /// The execution provider that runs the model (`cpu`, `cuda`, `tensorrt`).
    fn provider(&self) -> &str;
    /// Short description for logs and the status message.
    fn describe(&self) -> String;
}

/// Which inference library runs the model (`model.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Tract,
    Onnxruntime,
}

impl BackendKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tract" => Ok(BackendKind::Tract),
            "onnxruntime" => Ok(BackendKind::Onnxruntime),
            _ => Err(format!("unknown backend `{s}` (tract or onnxruntime)")),
        }
    }
}

/// ONNX Runtime execution providers, in the config's order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Tensorrt,
    Cuda,
    Cpu,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tensorrt" => Ok(Provider::Tensorrt),
            "cuda" => Ok(Provider::Cuda),
            "cpu" => Ok(Provider::Cpu),
            _ => Err(format!("unknown provider `{s}` (tensorrt, cuda or cpu)")),
        }
    }
}

/// Precision of TensorRT engines. FP16 keeps LayerNorm in FP32 (ViTs overflow otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp16,
    Fp32,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
        }
    }
}

/// Everything [`open`] needs to build a backend.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub kind: BackendKind,
    /// Largest batch per call (TensorRT: the profile's opt and max).
    pub batch: usize,
    /// CPU threads (0 = one per core).
    pub threads: usize,
    /// ONNX Runtime providers, most preferred first.
    pub providers: Vec<Provider>,
    /// libonnxruntime.so; absent: `ORT_DYLIB_PATH`, then the loader's search.
    pub library: Option<PathBuf>,
    pub precision: Precision,
    /// The engine cache folder (`engines` in the state directory); TensorRT only.
    pub engines: Option<PathBuf>,
    /// CUDA device ordinal.
    pub device_id: i32,
}

impl BackendSpec {
    /// tract on the CPU.
    pub fn tract(batch: usize, threads: usize) -> Self {
        BackendSpec {
            kind: BackendKind::Tract,
            batch,
            threads,
            providers: vec![Provider::Cpu],
            library: None,
            precision: Precision::default(),
            engines: None,
            device_id: 0,
        }
    }
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("ONNX Runtime library {}: {reason}", path.display())]
    Library { path: PathBuf, reason: String },
    #[error("ONNX Runtime library {} is version {found}; this build needs {needed} or newer", path.display())]
    TooOld {
        path: PathBuf,
        found: String,
        needed: String,
    },
    #[error("no ONNX Runtime provider could run the model{}", tried_list(.0))]
    NoProvider(Vec<(String, String)>),
    #[error("this reddino-edge was built without the `onnxruntime` feature: use model.backend = \"tract\", or build with `--features onnxruntime`")]
    NotBuilt,
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error(transparent)]
    Model(#[from] reddino_models::Error),
}

fn tried_list(tried: &[(String, String)]) -> String {
    if tried.is_empty() {
        return " (model.providers is empty)".into();
    }
    tried
        .iter()
        .map(|(p, e)| format!("; {p}: {e}"))
        .collect::<String>()
}

impl BackendError {
    /// A set-up the operator fixes (library path, providers, build): exit status 2.
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            BackendError::Library { .. }
                | BackendError::TooOld { .. }
                | BackendError::NoProvider(_)
                | BackendError::NotBuilt
        )
    }
}

/// Opens a verified bundle's model with the backend `spec` asks for.
pub fn open(spec: &BackendSpec, bundle: &Bundle) -> Result<Box<dyn Backend>, BackendError> {
    let views = bundle.manifest().test_time_views;
    if views > 1 {
        log::info!(
            "{} averages each cell's logits over {views} turned copies of its crop (the graph runs {views} crops per cell)",
            bundle.manifest().name
        );
    }
    match spec.kind {
        BackendKind::Tract => Ok(Box::new(TractBackend::from_bundle(
            bundle,
            spec.batch,
            spec.threads,
        )?)),
        #[cfg(feature = "onnxruntime")]
        BackendKind::Onnxruntime => Ok(Box::new(OrtBackend::open(spec, bundle)?)),
        #[cfg(not(feature = "onnxruntime"))]
        BackendKind::Onnxruntime => Err(BackendError::NotBuilt),
    }
}

/// The cells of a frame as the model's head takes them: their preprocessed pixels
/// (`3 x size x size` per cell, see [`crate::crop::find_and_cut_into`]), their boxes, and the
/// head's size term when it has one.
pub struct CellInputs<'a> {
    pub pixels: &'a [f32],
    pub boxes: &'a [[u32; 4]],
    pub size: Option<&'a SizeInput>,
}

/// Classifies the cells of `cells` in batches of the backend's size: run, the size term,
/// softmax and the `uncertain` threshold. One prediction per cell, in order.
pub fn classify_inputs(
    cells: CellInputs<'_>,
    backend: &mut dyn Backend,
    class_names: &[String],
    min_confidence: f32,
) -> Result<Vec<Prediction>, reddino_models::Error> {
    let size = backend.input_size();
    let per = 3 * size * size;
    let inputs = cells.pixels;
    if inputs.len() % per != 0 {
        return Err(reddino_models::Error::Inference(format!(
            "{} input values are not whole {size}x{size} crops: cut for another input size?",
            inputs.len()
        )));
    }
    if cells.boxes.len() != inputs.len() / per {
        return Err(reddino_models::Error::Inference(format!(
            "{} boxes for {} cells",
            cells.boxes.len(),
            inputs.len() / per
        )));
    }
    let batch = backend.batch_size().max(1);
    let mut out_preds = Vec::with_capacity(inputs.len() / per);
    for (chunk, boxes) in inputs.chunks(batch * per).zip(cells.boxes.chunks(batch)) {
        let mut out = backend.run(chunk, chunk.len() / per)?;
        if let (Some(s), Some(logits)) = (cells.size, out.logits.as_mut()) {
            let classes = out.classes.max(1);
            for (l, b) in logits.chunks_mut(classes).zip(boxes) {
                s.add_to(l, *b);
            }
        }
        out_preds.extend(logits_to_predictions(out, class_names, min_confidence)?);
    }
    Ok(out_preds)
}

/// Predictions from a batch's logits, checked against the bundle's classes.
fn logits_to_predictions(
    out: BatchOutput,
    class_names: &[String],
    min_confidence: f32,
) -> Result<impl Iterator<Item = Prediction>, reddino_models::Error> {
    let logits = out.logits.ok_or_else(|| {
        reddino_models::Error::Inference(
            "the model has no classification head (`logits` output)".into(),
        )
    })?;
    if out.classes != class_names.len() {
        return Err(reddino_models::Error::Inference(format!(
            "the model gives {} logits, the bundle lists {} classes",
            out.classes,
            class_names.len()
        )));
    }
    let classes = out.classes;
    Ok((0..logits.len() / classes.max(1))
        .map(move |i| classify(&logits[i * classes..(i + 1) * classes], min_confidence)))
}

/// Classifies cell crops in batches of the backend's size: preprocess, run, softmax and the
/// `uncertain` threshold. One prediction per crop, in order. Crops carry no box: for a head
/// with a size term (manifest `cell_size`) use [`classify_inputs`].
pub fn classify_crops<C: Borrow<RgbImage>>(
    crops: &[C],
    backend: &mut dyn Backend,
    class_names: &[String],
    norm: &Normalization,
    min_confidence: f32,
) -> Result<Vec<Prediction>, reddino_models::Error> {
    let size = backend.input_size();
    let per = 3 * size * size;
    let batch = backend.batch_size().max(1);
    let mut pixels = vec![0f32; batch.min(crops.len().max(1)) * per];
    let mut out_preds = Vec::with_capacity(crops.len());
    for chunk in crops.chunks(batch) {
        for (i, crop) in chunk.iter().enumerate() {
            preprocess_into(
                crop.borrow(),
                size as u32,
                norm,
                &mut pixels[i * per..(i + 1) * per],
            );
        }
        let out = backend.run(&pixels[..chunk.len() * per], chunk.len())?;
        out_preds.extend(logits_to_predictions(out, class_names, min_confidence)?);
    }
    Ok(out_preds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reddino_models::cellsize::CellSize;

    /// The same logits for every cell, the middle class of three ahead by 1: only a size term
    /// can move a cell to another.
    struct Flat;

    impl Backend for Flat {
        fn input_size(&self) -> usize {
            2
        }
        fn batch_size(&self) -> usize {
            2
        }
        fn run(&mut self, pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
            assert_eq!(pixels.len(), n * 12);
            Ok(BatchOutput {
                n,
                dim: 1,
                embeddings: vec![0.0; n],
                classes: 3,
                logits: Some([0.0, 1.0, 0.0].repeat(n)),
            })
        }
        fn name(&self) -> &'static str {
            "flat"
        }
        fn provider(&self) -> &str {
            "cpu"
        }
        fn describe(&self) -> String {
            "flat".into()
        }
    }

    /// The size term picks each cell's class from its own box, across the backend's batches,
    /// at the device's scale; without it the cells are a tie.
    #[test]
    fn the_size_term_classifies_each_cell_by_its_own_box() {
        let names: Vec<String> = ["micro", "normal", "macro"].map(String::from).to_vec();
        // Against the image's lead of 1 for normal: micro under 7.5 um / e^0.1 (37.7 px), macro
        // over 7.5 um x e^0.1 (46.1 px), on the long side.
        let term = CellSize {
            um_per_px: 0.18,
            weight: vec![[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]],
        };
        let size = SizeInput {
            term,
            um_per_px: 0.18,
        };
        let side = |s: u32| [10, 10, 10 + s, 10 + s];
        let boxes = [side(30), side(42), side(60), side(41), side(29)];
        let pixels = vec![0f32; boxes.len() * 12];
        let run = |size: Option<&SizeInput>| {
            let cells = CellInputs {
                pixels: &pixels,
                boxes: &boxes,
                size,
            };
            classify_inputs(cells, &mut Flat, &names, 0.0)
                .unwrap()
                .iter()
                .map(|p| p.class)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            run(Some(&size)),
            [Some(0), Some(1), Some(2), Some(1), Some(0)]
        );
        // Twice the magnification: the same boxes are half the size in micrometres.
        let zoomed = SizeInput {
            um_per_px: 0.09,
            ..size.clone()
        };
        assert_eq!(run(Some(&zoomed)), [Some(0); 5]);
        // Without the term: the image's class for each.
        assert_eq!(run(None), [Some(1); 5]);
        // Boxes and crops that disagree are refused.
        let cells = CellInputs {
            pixels: &pixels,
            boxes: &boxes[..4],
            size: Some(&size),
        };
        let e = classify_inputs(cells, &mut Flat, &names, 0.0).unwrap_err();
        assert!(e.to_string().contains("4 boxes for 5 cells"), "{e}");
    }
}
