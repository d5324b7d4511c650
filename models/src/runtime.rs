//! Running an exported RedDino graph on the CPU with tract: an optimised plan for a fixed
//! batch size and input side.

use tract_onnx::prelude::*;

use crate::onnx::{EMBEDDING, LOGITS};
use crate::Error;

/// Outputs of one batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// `[batch, embed_dim]`.
    pub embedding: Vec<f32>,
    /// `[batch, classes]` when the graph has a head.
    pub logits: Option<Vec<f32>>,
}

/// An optimised tract plan for `[batch, 3, size, size]` inputs.
pub struct TractModel {
    plan: TypedRunnableModel<TypedModel>,
    batch: usize,
    size: usize,
    embed_dim: usize,
    classes: Option<usize>,
    logits_slot: Option<usize>,
    embedding_slot: usize,
}

fn infer_err(e: impl std::fmt::Display) -> Error {
    Error::Inference(format!("{e:#}"))
}

impl TractModel {
    /// Loads and optimises an ONNX model for a fixed batch and input side.
    pub fn new(onnx: &[u8], batch: usize, size: usize) -> Result<Self, Error> {
        if batch == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        let mut reader = onnx;
        let model = tract_onnx::onnx()
            .model_for_read(&mut reader)
            .map_err(|e| Error::Onnx(format!("cannot load model: {e:#}")))?
            .with_input_fact(0, f32::fact([batch, 3, size, size]).into())
            .map_err(infer_err)?;
        // tract labels each graph output with its ONNX name and keeps the output order
        // through optimisation, which may rename the nodes.
        let names: Vec<String> = model
            .output_outlets()
            .map_err(infer_err)?
            .iter()
            .map(|o| model.outlet_label(*o).unwrap_or_default().to_string())
            .collect();
        let typed = model.into_optimized().map_err(infer_err)?;
        let embedding_slot = names.iter().position(|n| n == EMBEDDING).ok_or_else(|| {
            Error::Onnx(format!(
                "model has no `{EMBEDDING}` output (outputs: {names:?})"
            ))
        })?;
        let logits_slot = names.iter().position(|n| n == LOGITS);
        let fact = |slot: usize| -> Result<Vec<usize>, Error> {
            let outlet = typed.output_outlets().map_err(infer_err)?[slot];
            let f = typed.outlet_fact(outlet).map_err(infer_err)?;
            f.shape.as_concrete().map(|s| s.to_vec()).ok_or_else(|| {
                Error::Onnx(format!("output {slot} has a symbolic shape {:?}", f.shape))
            })
        };
        let emb_shape = fact(embedding_slot)?;
        let embed_dim = *emb_shape.last().unwrap_or(&0);
        let classes = logits_slot
            .map(|s| fact(s).map(|sh| *sh.last().unwrap_or(&0)))
            .transpose()?;
        let plan = typed.into_runnable().map_err(infer_err)?;
        Ok(TractModel {
            plan,
            batch,
            size,
            embed_dim,
            classes,
            logits_slot,
            embedding_slot,
        })
    }

    /// Batch size the plan was built for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Input side in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Width of the embedding.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Number of classes of the head, if any.
    pub fn classes(&self) -> Option<usize> {
        self.classes
    }

    /// Runs one batch; `pixels` holds `batch * 3 * size * size` values (NCHW).
    pub fn run(&self, pixels: &[f32]) -> Result<Outputs, Error> {
        let expected = self.batch * 3 * self.size * self.size;
        if pixels.len() != expected {
            return Err(Error::Inference(format!(
                "input has {} values, expected {expected} ([{}, 3, {}, {}])",
                pixels.len(),
                self.batch,
                self.size,
                self.size
            )));
        }
        let input = Tensor::from_shape(&[self.batch, 3, self.size, self.size], pixels)
            .map_err(infer_err)?;
        let out = self
            .plan
            .run(tvec!(input.into_tvalue()))
            .map_err(infer_err)?;
        let take = |slot: usize| -> Result<Vec<f32>, Error> {
            let v = out[slot].to_array_view::<f32>().map_err(infer_err)?;
            Ok(v.iter().copied().collect())
        };
        Ok(Outputs {
            embedding: take(self.embedding_slot)?,
            logits: self.logits_slot.map(take).transpose()?,
        })
    }
}
