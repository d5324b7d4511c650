//! Inference backends behind one trait. The tract backend runs an optimised plan for a fixed
//! batch size on the CPU (in chunks, several threads side by side); a partial batch runs only
//! the chunks it fills.

use image::RgbImage;
use reddino_models::bundle::Bundle;
use reddino_models::preprocess::{preprocess_into, Normalization};
use reddino_models::runtime::TractModel;

use crate::classify::{classify, Prediction};

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
    /// Short description for logs and the status message.
    fn describe(&self) -> String;
}

/// CPU inference with tract.
pub struct TractBackend {
    model: TractModel,
}

impl TractBackend {
    /// Loads a verified bundle's model for `batch` images per call, run over `threads`
    /// threads (0 = one per core; see `TractModel::with_threads`).
    pub fn from_bundle(
        bundle: &Bundle,
        batch: usize,
        threads: usize,
    ) -> Result<Self, reddino_models::Error> {
        let model = TractModel::with_threads(
            &bundle.read_model()?,
            batch,
            bundle.manifest().input_size,
            threads,
        )?;
        Ok(TractBackend { model })
    }
}

impl Backend for TractBackend {
    fn input_size(&self) -> usize {
        self.model.size()
    }

    fn batch_size(&self) -> usize {
        self.model.batch()
    }

    fn run(&mut self, pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
        let b = self.model.batch();
        let per = 3 * self.model.size() * self.model.size();
        if n == 0 || n > b || pixels.len() != n * per {
            return Err(reddino_models::Error::Inference(format!(
                "batch of {n} images with {} values; the backend takes 1 to {b} images of {per} values",
                pixels.len()
            )));
        }
        // A short batch runs only the chunks that hold images (the model pads the last one).
        let out = self.model.run(pixels)?;
        Ok(BatchOutput {
            n,
            dim: self.model.embed_dim(),
            embeddings: out.embedding,
            classes: self.model.classes().unwrap_or(0),
            logits: out.logits,
        })
    }

    fn describe(&self) -> String {
        format!(
            "tract (CPU, {} threads), batch {}, input {}",
            self.model.threads(),
            self.model.batch(),
            self.model.size()
        )
    }
}

/// Classifies cell crops in batches of the backend's size: preprocess, run, softmax and the
/// `uncertain` threshold. One prediction per crop, in order.
pub fn classify_crops(
    crops: &[RgbImage],
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
            preprocess_into(crop, size as u32, norm, &mut pixels[i * per..(i + 1) * per]);
        }
        let out = backend.run(&pixels[..chunk.len() * per], chunk.len())?;
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
        out_preds.extend(
            logits
                .chunks_exact(out.classes)
                .map(|l| classify(l, min_confidence)),
        );
    }
    Ok(out_preds)
}
