//! Running an exported RedDino graph on the CPU with tract: an optimised plan for a fixed
//! batch size and input side.
//!
//! A batch runs as chunks of at most [`MAX_CHUNK`] images through one plan built for the chunk
//! size. With several threads the chunks run side by side, one thread each (every op of the
//! graph is then parallel, where tract itself splits only the matrix products); a batch that is
//! a single chunk splits its matrix products over the threads instead.

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

/// Largest chunk of a batch one plan runs: past about 8 images a ViT's attention tensors fall
/// out of the caches and images/s drop.
pub const MAX_CHUNK: usize = 8;

/// An optimised tract plan for `[batch, 3, size, size]` inputs.
pub struct TractModel {
    /// Plan for `[chunk, 3, size, size]`.
    plan: TypedRunnableModel<TypedModel>,
    /// Matrix products split over this pool when the batch is one chunk and threads > 1.
    executor: Option<tract_linalg::multithread::Executor>,
    threads: usize,
    batch: usize,
    chunk: usize,
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
    /// Loads and optimises an ONNX model for a fixed batch and input side, run on the calling
    /// thread.
    pub fn new(onnx: &[u8], batch: usize, size: usize) -> Result<Self, Error> {
        Self::with_threads(onnx, batch, size, 1)
    }

    /// As [`TractModel::new`], for runs over `threads` threads (0 = one per core): the batch is
    /// cut into chunks so that every thread gets one (at most [`MAX_CHUNK`] images each).
    pub fn with_threads(
        onnx: &[u8],
        batch: usize,
        size: usize,
        threads: usize,
    ) -> Result<Self, Error> {
        if batch == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        let threads = resolve_threads(threads);
        let chunk = batch.div_ceil(threads).clamp(1, MAX_CHUNK);
        let mut reader = onnx;
        let model = tract_onnx::onnx()
            .model_for_read(&mut reader)
            .map_err(|e| Error::Onnx(format!("cannot load model: {e:#}")))?
            .with_input_fact(0, f32::fact([chunk, 3, size, size]).into())
            .map_err(infer_err)?;
        // tract labels each graph output with its ONNX name and keeps the output order
        // through optimisation, which may rename the nodes.
        let names: Vec<String> = model
            .output_outlets()
            .map_err(infer_err)?
            .iter()
            .map(|o| model.outlet_label(*o).unwrap_or_default().to_string())
            .collect();
        let mut typed = model.into_optimized().map_err(infer_err)?;
        softmax::replace_softmax(&mut typed);
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
        let mut m = TractModel {
            plan,
            executor: None,
            threads: 1,
            batch,
            chunk,
            size,
            embed_dim,
            classes,
            logits_slot,
            embedding_slot,
        };
        m.set_threads(threads);
        Ok(m)
    }

    /// Runs over `n` threads (1 = the calling thread only; 0 = one per available core): the
    /// chunks side by side, or the matrix products of a single chunk split over them. The
    /// chunk size stays the one chosen at construction ([`TractModel::with_threads`]).
    pub fn set_threads(&mut self, n: usize) {
        let n = resolve_threads(n);
        self.threads = n;
        let single_chunk = self.batch <= self.chunk;
        self.executor = (n > 1 && single_chunk).then(|| {
            tract_linalg::multithread::Executor::multithread_with_name(n, "reddino-tract")
        });
    }

    /// Threads each run uses.
    pub fn threads(&self) -> usize {
        self.threads
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

    /// Runs `n` images, 1 <= n <= batch: `pixels` holds `n * 3 * size * size` values (NCHW);
    /// the outputs have `n` rows. Only the chunks holding images run.
    pub fn run(&self, pixels: &[f32]) -> Result<Outputs, Error> {
        let per = 3 * self.size * self.size;
        let n = pixels.len() / per;
        if pixels.len() % per != 0 || n == 0 || n > self.batch {
            return Err(Error::Inference(format!(
                "input has {} values, expected 1 to {} images of {per} ([n, 3, {}, {}])",
                pixels.len(),
                self.batch,
                self.size,
                self.size
            )));
        }
        let chunks: Vec<&[f32]> = pixels.chunks(self.chunk * per).collect();
        let workers = self.threads.min(chunks.len()).max(1);
        let mut results: Vec<Option<ChunkResult>> = (0..chunks.len()).map(|_| None).collect();
        if workers == 1 {
            for (r, c) in results.iter_mut().zip(&chunks) {
                *r = Some(self.run_chunk(c));
            }
        } else {
            // Worker w runs chunks w, w + workers, ...
            let mut slots: Vec<Vec<(usize, &mut Option<ChunkResult>)>> =
                (0..workers).map(|_| Vec::new()).collect();
            for (i, r) in results.iter_mut().enumerate() {
                slots[i % workers].push((i, r));
            }
            std::thread::scope(|scope| {
                let mut slots = slots.into_iter();
                let own = slots.next().unwrap_or_default();
                for mine in slots {
                    let chunks = &chunks;
                    scope.spawn(move || {
                        for (i, r) in mine {
                            *r = Some(self.run_chunk(chunks[i]));
                        }
                    });
                }
                for (i, r) in own {
                    *r = Some(self.run_chunk(chunks[i]));
                }
            });
        }
        let mut out = Outputs {
            embedding: Vec::with_capacity(n * self.embed_dim),
            logits: self
                .logits_slot
                .map(|_| Vec::with_capacity(n * self.classes.unwrap_or(0))),
        };
        for (r, c) in results.into_iter().zip(&chunks) {
            let r = r.expect("every chunk ran")?;
            let n = c.len() / per;
            out.embedding
                .extend_from_slice(&r.embedding[..n * self.embed_dim]);
            if let (Some(all), Some(l)) = (out.logits.as_mut(), r.logits) {
                let k = l.len() / self.chunk;
                all.extend_from_slice(&l[..n * k]);
            }
        }
        Ok(out)
    }

    /// Runs one chunk of up to `chunk` images (a short last chunk is padded with zeros).
    fn run_chunk(&self, pixels: &[f32]) -> Result<Outputs, Error> {
        let full = self.chunk * 3 * self.size * self.size;
        let input = if pixels.len() == full {
            Tensor::from_shape(&[self.chunk, 3, self.size, self.size], pixels)
        } else {
            let mut padded = pixels.to_vec();
            padded.resize(full, 0.0);
            Tensor::from_shape(&[self.chunk, 3, self.size, self.size], &padded)
        }
        .map_err(infer_err)?;
        let run = || self.plan.run(tvec!(input.into_tvalue()));
        let out = match &self.executor {
            Some(ex) => tract_linalg::multithread::multithread_tract_scope(ex.clone(), run),
            None => run(),
        }
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

/// What one chunk's run gives.
type ChunkResult = Result<Outputs, Error>;

/// `n`, or one per available core for 0.
fn resolve_threads(n: usize) -> usize {
    if n == 0 {
        std::thread::available_parallelism().map_or(1, |p| p.get())
    } else {
        n
    }
}

/// The attention softmax. tract's float softmax calls libm's `expf` element by element, which
/// took two thirds of a ViT-S/14 forward at 224 (4.7 M exponentials per image); its fast
/// alternative is accurate to only ~1e-2. This op computes the same softmax over the last
/// axis with a vectorisable Cephes-style `exp` (relative error ~2e-7, below f32 rounding of
/// the sum), keeping parity with timm well inside 1e-4.
mod softmax {
    use tract_onnx::tract_core::internal::*;
    use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

    #[derive(Debug, Clone, Hash, PartialEq, Eq)]
    pub struct LastAxisSoftmax;

    impl Op for LastAxisSoftmax {
        fn name(&self) -> StaticName {
            "LastAxisSoftmax".into()
        }
        op_as_typed_op!();
    }

    impl EvalOp for LastAxisSoftmax {
        fn is_stateless(&self) -> bool {
            true
        }

        fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
            let input = args_1!(inputs);
            let mut t = input.into_tensor();
            let n = *t.shape().last().unwrap_or(&1);
            if n > 0 {
                for row in t.as_slice_mut::<f32>()?.chunks_exact_mut(n) {
                    softmax_row(row);
                }
            }
            Ok(tvec!(t.into_tvalue()))
        }
    }

    impl TypedOp for LastAxisSoftmax {
        fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
            Ok(tvec!(f32::fact(inputs[0].shape.clone())))
        }
        as_op!();
    }

    /// `exp(x)` for `x <= 0` (0 below -87.3, where f32 leaves the normal range).
    #[inline(always)]
    fn exp_nonpos(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let xc = x.max(-87.0);
        let t = xc * std::f32::consts::LOG2_E + MAGIC;
        let n = t - MAGIC;
        let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut y = 1.987_569_1e-4f32;
        y = y * r + 1.398_199_9e-3;
        y = y * r + 8.333_452e-3;
        y = y * r + 4.166_579_6e-2;
        y = y * r + 0.166_666_65;
        y = y * r + 0.5;
        y = y * r * r + r + 1.0;
        let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
        let scale = f32::from_bits(((ni + 127) << 23) as u32);
        if x < -87.336_54 {
            0.0
        } else {
            y * scale
        }
    }

    pub(super) fn softmax_row(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            // NaN or infinities: let IEEE arithmetic say so, as the plain formula would.
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            row.iter_mut().for_each(|x| *x = (*x - max).exp() / sum);
            return;
        }
        for x in row.iter_mut() {
            *x = exp_nonpos(*x - max);
        }
        // Eight partial sums so the reduction vectorises.
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                acc[i] += c[i];
            }
        }
        let sum = acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }

    /// Replaces every f32 softmax over the last axis of an optimised model.
    pub(super) fn replace_softmax(model: &mut TypedModel) {
        for id in 0..model.nodes.len() {
            let node = &model.nodes[id];
            let Some(sm) = node.op_as::<Softmax>() else {
                continue;
            };
            let Ok(fact) = model.outlet_fact(node.inputs[0]) else {
                continue;
            };
            let last = fact.rank().saturating_sub(1);
            if fact.datum_type == f32::datum_type()
                && sm.axes.as_slice() == [last]
                && matches!(sm.kind, SoftmaxKind::Softmax(_))
                && sm.quant_output_dt.is_none()
            {
                model.nodes[id].op = Box::new(LastAxisSoftmax);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn matches_f64_softmax() {
            let mut worst = 0f64;
            for (n, spread) in [(257usize, 1.0f32), (65, 30.0), (7, 200.0), (1000, 5.0)] {
                let row: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * spread)
                    .collect();
                let max = row
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, |m, x| m.max(x as f64));
                let e: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
                let s: f64 = e.iter().sum();
                let mut got = row.clone();
                super::softmax_row(&mut got);
                for (g, r) in got.iter().zip(&e) {
                    let want = r / s;
                    worst = worst.max((*g as f64 - want).abs() / want.max(1e-30));
                    if want < 1e-30 {
                        assert!(*g < 1e-30);
                    }
                }
            }
            assert!(worst < 2e-6, "worst relative error {worst:e}");
            let mut edge = vec![0.0f32, -1000.0, f32::NEG_INFINITY];
            super::softmax_row(&mut edge);
            assert_eq!(edge, vec![1.0, 0.0, 0.0]);
        }
    }
}
