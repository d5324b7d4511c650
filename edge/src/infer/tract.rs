//! CPU inference with tract: an optimised plan for a fixed batch size (in chunks, several
//! threads side by side); a partial batch runs only the chunks it fills.

use reddino_models::bundle::Bundle;
use reddino_models::runtime::TractModel;

use super::{Backend, BatchOutput};

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

    fn name(&self) -> &'static str {
        "tract"
    }

    fn provider(&self) -> &str {
        "cpu"
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
