//! Supervised fine-tuning of a backbone with a linear classification head on labelled crops
//! (cross-entropy with label smoothing, AdamW with layer-wise lr decay, cosine schedule, the
//! stain, colour, noise and focus-blur transforms of RedDino's set). The result is the backbone and the linear head the edge runs:
//! logits = head(CLS after the final norm), the same graph `export` writes; with
//! [`FinetuneConfig::cell_size`] the head also takes each cell's measured size, a term the
//! bundle's manifest carries and the edge adds.

use crate::bail;
use crate::error::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reddino_models::cellsize::{CellSize, FEATURES};
use reddino_models::preprocess::{preprocess_into, Normalization};
use reddino_models::weights::{LinearHead, VitWeights};
use tch::{nn, Device, Kind, Tensor};

use crate::augment::{augment_with, AugmentConfig, Op};
use crate::eval::{metrics, Metrics};
use crate::labelled::LabelledSet;
use crate::optim::{AdamW, Optimizer};
use crate::schedule::Cosine;
use crate::vit::{linear, Vit};

/// Fine-tuning settings (the `reddino-trainer finetune` options).
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// Model input side (a multiple of 14); crops are resized to it.
    pub input_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (after warmup), for the head and the last block.
    pub lr: f64,
    pub min_lr: f64,
    /// Warmup as a fraction of all steps.
    pub warmup: f64,
    pub weight_decay: f64,
    /// Layer-wise lr decay (block i gets `decay^(depth - i)`).
    pub layer_decay: f64,
    pub label_smoothing: f64,
    /// Gradient-norm clip over all parameters; 0 = off.
    pub clip_grad: f64,
    pub augment: AugmentConfig,
    /// The transforms `augment.ops_per_image` draws from.
    pub pixel_pool: PixelPool,
    pub seed: u64,
    /// Cross-entropy weighted by inverse class frequency (each class weighs the same in the
    /// loss: for imbalanced data scored by balanced accuracy).
    pub balanced: bool,
    /// Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", 2021): the
    /// training loss sees the logits plus `tau * ln(prior)` of each class, the model's own
    /// logits stay without it, so that its argmax aims at balanced accuracy without weighing
    /// the rare classes' crops up; 0 = off.
    pub logit_adjust: f64,
    /// The model kept is an exponential moving average of the weights over the steps, with
    /// this decay per step (rising as `(1 + t) / (10 + t)` until it reaches it); 0 = the
    /// last step's weights.
    pub ema: f64,
    /// Stochastic depth: each block's residual branches are dropped for a sample with this
    /// probability in training (uniform over the blocks); 0 = off.
    pub drop_path: f64,
    /// Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", 2018): each batch is
    /// blended with a shuffled copy of itself, crops, sizes and losses alike, by a weight
    /// drawn from Beta(alpha, alpha) per batch; 0 = off.
    pub mixup: f64,
    /// Give the head each cell's measured size too ([`reddino_models::cellsize`]), measured
    /// at this many micrometres per pixel of the training fields; `None` = the crop alone.
    pub cell_size: Option<f32>,
    /// Cross-validation scores each crop by its logits averaged over this many turned and
    /// mirrored views ([`reddino_models::onnx::VIEW_COUNTS`]), as a model exported with
    /// `--test-time-views` reads it.
    pub test_time_views: usize,
}

/// Which pixel transforms fine-tuning draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PixelPool {
    /// [`Op::FINETUNE`]: stain, colour, exposure, noise and a mild blur.
    Finetune,
    /// [`Op::COLOUR`]: colour and exposure alone.
    Colour,
}

impl PixelPool {
    pub fn ops(self) -> &'static [Op] {
        match self {
            PixelPool::Finetune => &Op::FINETUNE,
            PixelPool::Colour => &Op::COLOUR,
        }
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            input_size: 112,
            epochs: 10,
            batch_size: 64,
            lr: 1e-3,
            min_lr: 1e-6,
            warmup: 0.1,
            weight_decay: 0.05,
            layer_decay: 0.75,
            label_smoothing: 0.1,
            clip_grad: 3.0,
            // Cells must stay whole (a dacrocyte's tail, a schistocyte's corners): mild crops.
            augment: AugmentConfig {
                crop_scale: (0.6, 1.0),
                crop_ratio: (0.8, 1.25),
                ops_per_image: 3,
                flip_p: 0.5,
            },
            pixel_pool: PixelPool::Finetune,
            seed: 0,
            balanced: false,
            logit_adjust: 0.0,
            ema: 0.0,
            drop_path: 0.0,
            mixup: 0.0,
            cell_size: None,
            test_time_views: 1,
        }
    }
}

impl FinetuneConfig {
    pub fn validate(&self) -> Result<()> {
        if self.input_size == 0 || self.input_size % 14 != 0 {
            bail!(
                "input size {} is not a positive multiple of 14",
                self.input_size
            );
        }
        if self.epochs == 0 || self.batch_size == 0 {
            bail!("epochs and batch size must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("lr must be positive, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "label smoothing must be in [0, 1), got {}",
                self.label_smoothing
            );
        }
        let (lo, hi) = self.augment.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            bail!("the random crop's area must be a range within (0, 1], got {lo}..{hi}");
        }
        if !(0.0..=1.0).contains(&self.warmup) {
            bail!("warmup must be a fraction in [0, 1], got {}", self.warmup);
        }
        reddino_models::onnx::check_views(self.test_time_views)?;
        if !(self.logit_adjust >= 0.0 && self.logit_adjust.is_finite()) {
            bail!(
                "logit adjustment must be a finite number >= 0, got {}",
                self.logit_adjust
            );
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            bail!(
                "drop path must be a probability in [0, 1), got {}",
                self.drop_path
            );
        }
        if !(self.mixup >= 0.0 && self.mixup.is_finite()) {
            bail!(
                "mixup's alpha must be a finite number >= 0, got {}",
                self.mixup
            );
        }
        if !(0.0..1.0).contains(&self.ema) {
            bail!(
                "the weights' moving average decays by a factor in [0, 1), got {}",
                self.ema
            );
        }
        if self.balanced && self.logit_adjust > 0.0 {
            bail!("class weights (balanced) and logit adjustment both correct for class frequency: choose one");
        }
        if let Some(um) = self.cell_size {
            if !(um.is_finite() && um > 0.0) {
                bail!("the cell size's scale must be a positive number of micrometres per pixel, got {um}");
            }
        }
        Ok(())
    }
}

/// Progress of one logged step.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub lr: f64,
}

/// The fine-tuned model.
pub struct Finetuned {
    pub backbone: VitWeights,
    pub head: LinearHead,
    /// Training-set metrics of the final model (eval mode, no augmentation).
    pub train: Metrics,
    pub first_loss: f64,
    pub last_loss: f64,
}

/// One fold of [`cross_validate`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FoldResult {
    /// The held-out source folder.
    pub fold: String,
    pub train: usize,
    pub test: usize,
    pub metrics: Metrics,
}

/// Cross-validation by source folder: the pooled metrics and each fold's.
#[derive(Debug)]
pub struct CrossValidation {
    pub pooled: Metrics,
    pub folds: Vec<FoldResult>,
    pub seconds: f64,
    /// Every crop's logits from the model that did not see its fold, under the eight flips
    /// and quarter turns ([`view_logits`]): `[8, N, classes]`, crops in fold order.
    pub logits: Tensor,
    /// The crops' truth and fold, in the order of `logits`.
    pub truth: Vec<i64>,
    pub fold_of: Vec<usize>,
    pub files: Vec<std::path::PathBuf>,
}

/// Fine-tunes once per source folder of `set`, each time on the other folders, and tests on
/// the one left out (with `reddino-edge import --folds K`: K-fold cross-validation by field).
/// `log(fold, step)` every 100 steps.
pub fn cross_validate(
    init: &VitWeights,
    set: &LabelledSet,
    cfg: &FinetuneConfig,
    device: Device,
    mut log: impl FnMut(usize, StepLog),
) -> Result<CrossValidation> {
    let folds = set.source_names.len();
    if folds < 2 {
        bail!("cross-validation needs crops in two or more source folders ({{fold}}/{{class}}/image, as `reddino-edge import --folds K` writes); found one");
    }
    let classes = set.class_names.len();
    let t0 = std::time::Instant::now();
    let (mut truth, mut pred, mut out) = (Vec::new(), Vec::new(), Vec::new());
    let (mut all_logits, mut fold_of, mut files) = (Vec::new(), Vec::new(), Vec::new());
    for f in 0..folds {
        let train = set.select(|s| s != f as i64);
        let test = set.select(|s| s == f as i64);
        log::info!(
            "cross-validation fold {}/{folds} ({}): fine-tuning on {} crops, testing on {}",
            f + 1,
            set.source_names[f],
            train.files.len(),
            test.files.len()
        );
        let r = finetune(init, &train, cfg, device, 100, |s| log(f, s))?;
        let vs = nn::VarStore::new(device);
        let vit = Vit::from_weights(&vs.root(), &r.backbone, cfg.input_size)?;
        let logits = view_logits(&vit, &r.head, &test, device, 128, 8)?;
        let t = head_truth(&r.head, &test)?;
        let p = argmax(
            &logits
                .narrow(0, 0, cfg.test_time_views as i64)
                .mean_dim(0, false, None),
        )?;
        let single = metrics(&t, &argmax(&logits.get(0))?, classes);
        let m = metrics(&t, &p, classes);
        log::info!(
            "fold {}: accuracy {:.3}, balanced accuracy {:.3}, weighted F1 {:.3} ({} view(s); the crop alone: balanced accuracy {:.3})",
            f + 1,
            m.accuracy,
            m.balanced_accuracy,
            m.weighted_f1,
            cfg.test_time_views,
            single.balanced_accuracy
        );
        all_logits.push(logits);
        fold_of.extend(std::iter::repeat_n(f, test.files.len()));
        files.extend(test.files.iter().cloned());
        out.push(FoldResult {
            fold: set.source_names[f].clone(),
            train: train.files.len(),
            test: test.files.len(),
            metrics: m,
        });
        truth.extend(t);
        pred.extend(p);
    }
    Ok(CrossValidation {
        pooled: metrics(&truth, &pred, classes),
        folds: out,
        seconds: t0.elapsed().as_secs_f64(),
        logits: Tensor::cat(&all_logits, 1),
        truth,
        fold_of,
        files,
    })
}

/// Logits of a backbone + linear head (with its size term) on every crop of `set` through the
/// edge's preprocessing, under the first `views` turned and mirrored copies of each crop:
/// `[views, N, classes]`, view `k` turned `k % 4` quarter turns and mirrored left to right
/// when `k >= 4` (view 0 is the crop as the edge gives it; the views of
/// [`reddino_models::onnx::export_with_views`]).
pub fn view_logits(
    vit: &Vit,
    head: &LinearHead,
    set: &LabelledSet,
    device: Device,
    batch: usize,
    views: usize,
) -> Result<Tensor> {
    let size = vit.config.img_size;
    let w = Tensor::from_slice(&head.weight.data)
        .view([head.weight.shape[0] as i64, head.weight.shape[1] as i64]);
    let bias = Tensor::from_slice(&head.bias.data);
    let size_term = match &head.size {
        Some(s) => {
            let u =
                Tensor::from_slice(&s.flat_weight()).view([s.weight.len() as i64, FEATURES as i64]);
            Some(set.size_features(s.um_per_px)?.matmul(&u.tr()))
        }
        None => None,
    };
    let mut out: Vec<Vec<Tensor>> = (0..views).map(|_| Vec::new()).collect();
    for chunk in set.files.chunks(batch.max(1)) {
        let x = crate::probe::input_batch(&crate::labelled::decode(chunk)?, size, device);
        tch::no_grad(|| {
            for (k, o) in out.iter_mut().enumerate() {
                o.push(vit.embed(&view(&x, k)).to_device(Device::Cpu));
            }
        });
    }
    let views: Vec<Tensor> = out
        .iter()
        .map(|o| {
            let l = Tensor::cat(o, 0).matmul(&w.tr()) + &bias;
            match &size_term {
                Some(t) => l + t,
                None => l,
            }
        })
        .collect();
    Ok(Tensor::stack(&views, 0))
}

/// View `k` of images `[N, 3, S, S]`: turned `k % 4` quarter turns and mirrored left to right
/// when `k >= 4`, as [`reddino_models::onnx::export_with_views`] turns them.
pub fn view(x: &Tensor, k: usize) -> Tensor {
    let v = x.rot90((k % 4) as i64, [2, 3]);
    if k >= 4 {
        v.flip([3])
    } else {
        v
    }
}

fn argmax(logits: &Tensor) -> Result<Vec<i64>> {
    Ok(Vec::<i64>::try_from(logits.argmax(1, false))?)
}

/// `set`'s labels as indices into the head's class names; a class of the data the head lacks
/// is an error.
fn head_truth(head: &LinearHead, set: &LabelledSet) -> Result<Vec<i64>> {
    let mut to_head = Vec::with_capacity(set.class_names.len());
    for c in &set.class_names {
        match head.class_names.iter().position(|h| h == c) {
            Some(i) => to_head.push(i as i64),
            None => bail!(
                "the data has class `{c}`, which the head does not know (head classes: {})",
                head.class_names.join(", ")
            ),
        }
    }
    Ok(set.labels.iter().map(|&l| to_head[l as usize]).collect())
}

/// Inverse-frequency class weights, `n / (classes * n_c)` (1 for every class of balanced
/// data; classes without samples get 0).
pub fn class_weights(labels: &[i64], classes: usize) -> Tensor {
    let n = labels.len() as f64;
    let w: Vec<f32> = class_counts(labels, classes)
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                (n / (classes as f64 * c as f64)) as f32
            }
        })
        .collect();
    Tensor::from_slice(&w)
}

/// The logit adjustment's offsets, `tau * ln(n_c / n)` per class; a class without samples
/// counts as half a sample (its offset stays finite).
pub fn prior_offsets(labels: &[i64], classes: usize, tau: f64) -> Tensor {
    let n = labels.len().max(1) as f64;
    let o: Vec<f32> = class_counts(labels, classes)
        .iter()
        .map(|&c| (tau * ((c as f64).max(0.5) / n).ln()) as f32)
        .collect();
    Tensor::from_slice(&o)
}

/// Crops per class.
fn class_counts(labels: &[i64], classes: usize) -> Vec<usize> {
    let mut count = vec![0usize; classes];
    for &l in labels {
        count[l as usize] += 1;
    }
    count
}

/// Decodes every image of `set` resized to `size` x `size`, as u8 [N, 3, size, size].
pub fn load_images(set: &LabelledSet, size: usize) -> Result<Tensor> {
    let plane = 3 * size * size;
    let unit = Normalization {
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let mut data = vec![0u8; set.files.len() * plane];
    let mut buf = vec![0f32; plane];
    for (i, p) in set.files.iter().enumerate() {
        let img = image::open(p)
            .with_context(|| format!("decoding {}", p.display()))?
            .to_rgb8();
        // The edge's resize: the crops the model sees in training are the crops it sees there.
        preprocess_into(&img, size as u32, &unit, &mut buf);
        for (d, &v) in data[i * plane..(i + 1) * plane].iter_mut().zip(&buf) {
            *d = (v * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(Tensor::from_slice(&data).view([set.files.len() as i64, 3, size as i64, size as i64]))
}

/// Fine-tunes `init` with a new linear head over `set`'s classes. `log` is called every
/// `log_every` steps and at the last one.
pub fn finetune(
    init: &VitWeights,
    set: &LabelledSet,
    cfg: &FinetuneConfig,
    device: Device,
    log_every: usize,
    mut log: impl FnMut(StepLog),
) -> Result<Finetuned> {
    cfg.validate()?;
    let classes = set.class_names.len();
    if classes < 2 {
        bail!("fine-tuning needs at least two classes, found {classes}");
    }
    let n = set.files.len();
    tch::manual_seed(cfg.seed as i64);
    let images = load_images(set, cfg.input_size)?;
    let sizes = cfg.cell_size.map(|um| set.size_features(um)).transpose()?;
    let labels = Tensor::from_slice(&set.labels);
    let class_weights = cfg
        .balanced
        .then(|| class_weights(&set.labels, classes).to_device(device));
    let offsets = (cfg.logit_adjust > 0.0)
        .then(|| prior_offsets(&set.labels, classes, cfg.logit_adjust).to_device(device));

    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let mut vit = Vit::from_weights(&(&root / "backbone"), init, cfg.input_size)?;
    vit.drop_path = cfg.drop_path;
    let d = vit.config.embed_dim as i64;
    let head = linear(&root / "head", d, classes as i64);
    // The size term starts at zero: the crop alone until the loss finds a use for the size.
    let size_head = sizes.as_ref().map(|_| {
        nn::linear(
            &root / "head_size",
            FEATURES as i64,
            classes as i64,
            nn::LinearConfig {
                bias: false,
                ws_init: nn::Init::Const(0.0),
                ..Default::default()
            },
        )
    });
    let mut named: Vec<(String, Tensor)> = vit
        .named_vars()
        .into_iter()
        .filter(|(name, _)| name != "mask_token")
        .map(|(name, t)| (format!("backbone.{name}"), t))
        .collect();
    named.push(("head.weight".into(), head.ws.shallow_clone()));
    if let Some(b) = &head.bs {
        named.push(("head.bias".into(), b.shallow_clone()));
    }
    if let Some(h) = &size_head {
        named.push(("head.size_weight".into(), h.ws.shallow_clone()));
    }
    let mut opt = Optimizer::new(
        named,
        AdamW::default(),
        cfg.layer_decay,
        1.0,
        vit.config.depth,
    );

    // The moving average's copy of every weight the optimiser updates.
    let mut ema: Vec<Tensor> = if cfg.ema > 0.0 {
        tch::no_grad(|| opt.params.iter().map(|p| p.var.detach().copy()).collect())
    } else {
        Vec::new()
    };
    let b = cfg.batch_size.min(n);
    let steps_per_epoch = n.div_ceil(b);
    let total = steps_per_epoch * cfg.epochs;
    let warmup = (total as f64 * cfg.warmup).round() as usize;
    let lr = Cosine::new(cfg.lr, cfg.min_lr, total, warmup, 0.0, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut step = 0;
    for _epoch in 0..cfg.epochs {
        // A fresh permutation per epoch (Fisher-Yates on the seeded stream).
        let mut order: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        for chunk in order.chunks(b) {
            let idx = Tensor::from_slice(chunk);
            let x = images
                .index_select(0, &idx)
                .to_device(device)
                .to_kind(Kind::Float)
                / 255.0;
            let y = labels.index_select(0, &idx).to_device(device);
            let (x, _) = augment_with(
                &x,
                cfg.input_size as i64,
                &cfg.augment,
                cfg.pixel_pool.ops(),
                &mut rng,
            );
            let mut size = sizes
                .as_ref()
                .map(|f| f.index_select(0, &idx).to_device(device));
            // Mixup: the batch blended with itself in another order, by `lambda`.
            let mix = (cfg.mixup > 0.0).then(|| {
                let lambda: f64 =
                    rng.sample(rand_distr::Beta::new(cfg.mixup, cfg.mixup).expect("alpha checked"));
                let mut perm: Vec<i64> = (0..chunk.len() as i64).collect();
                for i in (1..perm.len()).rev() {
                    perm.swap(i, rng.gen_range(0..=i));
                }
                (lambda, Tensor::from_slice(&perm).to_device(device))
            });
            let x = match &mix {
                Some((lambda, perm)) => {
                    size = size.map(|f| &f * *lambda + f.index_select(0, perm) * (1.0 - lambda));
                    &x * *lambda + x.index_select(0, perm) * (1.0 - lambda)
                }
                None => x,
            };
            opt.zero_grad();
            let cls = vit.forward(&x, None, true).cls;
            let mut logits = cls.apply(&head);
            if let (Some(f), Some(h)) = (&size, &size_head) {
                logits += f.apply(h);
            }
            if let Some(o) = &offsets {
                logits += o;
            }
            let ce = |y: &Tensor| {
                logits.cross_entropy_loss::<&Tensor>(
                    y,
                    class_weights.as_ref(),
                    tch::Reduction::Mean,
                    -100,
                    cfg.label_smoothing,
                )
            };
            let loss = match &mix {
                Some((lambda, perm)) => {
                    ce(&y) * *lambda + ce(&y.index_select(0, perm)) * (1.0 - lambda)
                }
                None => ce(&y),
            };
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                bail!("loss became {value} at step {step}; lower the learning rate");
            }
            loss.backward();
            if cfg.clip_grad > 0.0 {
                opt.clip_grad_norm("", cfg.clip_grad);
            }
            let l = lr.at(step);
            opt.update(l, l, cfg.weight_decay);
            if !ema.is_empty() {
                let decay = cfg.ema.min((1.0 + step as f64) / (10.0 + step as f64));
                tch::no_grad(|| {
                    for (e, p) in ema.iter_mut().zip(&opt.params) {
                        let _ = e.lerp_(&p.var, 1.0 - decay);
                    }
                });
            }
            if step == 0 {
                first_loss = value;
            }
            last_loss = value;
            step += 1;
            if step % log_every.max(1) == 0 || step == total {
                log(StepLog {
                    step,
                    total,
                    loss: value,
                    lr: l,
                });
            }
        }
    }

    if !ema.is_empty() {
        tch::no_grad(|| {
            for (e, p) in ema.iter().zip(&mut opt.params) {
                p.var.copy_(e);
            }
        });
    }
    // Training-set metrics in eval mode through the edge's preprocessing.
    let mut logits = predict_logits(&vit, &head, &images, device, 128);
    if let (Some(f), Some(h)) = (&sizes, &size_head) {
        logits += tch::no_grad(|| f.to_device(device).apply(h)).to_device(Device::Cpu);
    }
    let pred: Vec<i64> = Vec::try_from(logits.argmax(1, false))?;
    let train = metrics(&set.labels, &pred, classes);
    let to_tensor = |t: &Tensor| -> Result<reddino_models::weights::Tensor> {
        let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float);
        Ok(reddino_models::weights::Tensor::new(
            t.size().iter().map(|&s| s as usize).collect(),
            Vec::<f32>::try_from(t.flatten(0, -1))?,
        ))
    };
    let head_out = LinearHead {
        class_names: set.class_names.clone(),
        weight: to_tensor(&head.ws)?,
        bias: to_tensor(head.bs.as_ref().expect("head has a bias"))?,
        size: match (&size_head, cfg.cell_size) {
            (Some(h), Some(um_per_px)) => {
                Some(CellSize::from_flat(um_per_px, &to_tensor(&h.ws)?.data))
            }
            _ => None,
        },
    };
    head_out.validate(d as usize)?;
    Ok(Finetuned {
        backbone: vit.to_weights()?,
        head: head_out,
        train,
        first_loss,
        last_loss,
    })
}

/// Logits of u8 images [N, 3, S, S] (already at the model's size), eval mode.
fn predict_logits(
    vit: &Vit,
    head: &nn::Linear,
    images: &Tensor,
    device: Device,
    batch: i64,
) -> Tensor {
    let n = images.size()[0];
    let mut out = Vec::new();
    tch::no_grad(|| {
        let mut i = 0;
        while i < n {
            let len = batch.min(n - i);
            let x = images
                .narrow(0, i, len)
                .to_device(device)
                .to_kind(Kind::Float)
                / 255.0;
            let x = crate::augment::normalize(&x);
            out.push(vit.embed(&x).apply(head).to_device(Device::Cpu));
            i += len;
        }
    });
    Tensor::cat(&out, 0)
}

/// Truth and predictions of a backbone + linear head on `set` (the edge's preprocessing, the
/// logits averaged over `views` turned and mirrored copies of each crop as in
/// [`view_logits`]), both as indices into the head's class names; a class of the data the
/// head lacks is an error.
pub fn classify_set(
    vit: &Vit,
    head: &LinearHead,
    set: &LabelledSet,
    device: Device,
    batch: usize,
    views: usize,
) -> Result<(Vec<i64>, Vec<i64>)> {
    reddino_models::onnx::check_views(views)?;
    let truth = head_truth(head, set)?;
    let logits = view_logits(vit, head, set, device, batch, views)?;
    let pred = argmax(&logits.mean_dim(0, false, None))?;
    Ok((truth, pred))
}
