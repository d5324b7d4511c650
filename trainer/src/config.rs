//! Pretraining configuration: TOML files that start from a preset (`s`, `b`, `l` = RedDino's
//! runs, `tiny` for the CPU) and override any key.
//!
//! ```toml
//! preset = "s"
//! [data]
//! path = "/data/smears"
//! [train]
//! out_dir = "runs/reddino-s"
//! ```

use std::path::{Path, PathBuf};

use crate::bail;
use crate::error::{Context, Result};
use reddino_models::arch::{Preset, VitConfig};
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::head::HeadConfig;
use crate::ssl::Centering;

/// The backbone and where its weights start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// ViT size: tiny, small, base, large.
    pub arch: Preset,
    /// Transformer blocks, when not the preset's (`tiny` has 4): a deeper model of the same
    /// width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    /// Global crop side (the model's input size during training).
    pub img_size: usize,
    /// Register tokens (0 for RedDino).
    pub registers: usize,
    /// Stochastic depth of the student.
    pub drop_path: f64,
    /// Where the weights start: a safetensors file (timm, DINOv2, RedDino or this trainer's
    /// checkpoints), `dinov2` or `reddino` for the same-size published weights in
    /// `weights_dir` ([`InitWeights::file_name`]), or `scratch`. RedDino's presets start from
    /// `dinov2`, as RedDino's released runs do; `tiny` from scratch.
    pub init: InitWeights,
    /// Where `init = "dinov2"` / `"reddino"` look for their file; relative to the config file.
    pub weights_dir: PathBuf,
    /// How the starting weights' position embedding is brought to `img_size`.
    pub init_pos_resample: PosResample,
    /// LayerScale gammas of a backbone started from scratch (`init = "scratch"`). DINOv2's
    /// 1e-5 (the default) leaves every block's output out of the residual stream at first:
    /// the CLS output is nearly the same for every image, the teacher's targets uniform, and
    /// the DINO loss stays at ln(prototypes) for as long as the gammas take to grow. A small
    /// model trained from scratch on few, similar images needs 1 (DINO's ViTs, without
    /// LayerScale), and views that keep what they show in common (docs/training.md). Not used
    /// when the weights come from a checkpoint: its gammas are loaded.
    #[serde(default = "default_layerscale_init")]
    pub layerscale_init: f64,
}

fn default_layerscale_init() -> f64 {
    crate::vit::LAYERSCALE_INIT
}

/// The starting weights of a pretraining run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitWeights {
    /// Random weights (timm's init).
    Scratch,
    /// DINOv2's published weights of the run's size (`dinov2_vit{s,b,l}14.safetensors`).
    Dinov2,
    /// RedDino's published weights of the run's size (`reddino-{small,base,large}.safetensors`).
    RedDino,
    /// A weights file.
    File(PathBuf),
}

impl InitWeights {
    /// The file `weights_dir` must hold for `dinov2` / `reddino` at `arch` (None otherwise).
    pub fn file_name(&self, arch: Preset) -> Option<String> {
        let size = arch.name();
        let letter = size.chars().next().unwrap_or('s');
        match self {
            InitWeights::Dinov2 => Some(format!("dinov2_vit{letter}14.safetensors")),
            InitWeights::RedDino => Some(format!("reddino-{size}.safetensors")),
            _ => None,
        }
    }
}

impl Serialize for InitWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitWeights::Scratch => s.serialize_str("scratch"),
            InitWeights::Dinov2 => s.serialize_str("dinov2"),
            InitWeights::RedDino => s.serialize_str("reddino"),
            InitWeights::File(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

impl<'de> Deserialize<'de> for InitWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        Ok(match v.as_str() {
            "" => {
                return Err(serde::de::Error::custom(
                    "`model.init` is empty: use \"scratch\", \"dinov2\", \"reddino\" or a file",
                ))
            }
            "scratch" => InitWeights::Scratch,
            "dinov2" => InitWeights::Dinov2,
            "reddino" => InitWeights::RedDino,
            _ => InitWeights::File(PathBuf::from(v)),
        })
    }
}

/// How starting weights trained at another input size get their position embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosResample {
    /// Bicubic without antialiasing, as DINOv2's `interpolate_pos_encoding` computes it at the
    /// first forward pass of RedDino's runs (scale factor (grid + 0.1) / stored grid).
    Bicubic,
    /// timm's `resample_abs_pos_embed` (antialiased bicubic).
    BicubicAntialias,
}

/// The channel order training images are fed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelOrder {
    Rgb,
    /// Blue, green, red: what RedDino's runs train on (OpenCV's `imread`, never converted).
    Bgr,
}

impl ChannelOrder {
    /// `images` (`[b, 3, h, w]`, RGB) in this order.
    pub fn apply(self, images: tch::Tensor) -> tch::Tensor {
        match self {
            ChannelOrder::Rgb => images,
            ChannelOrder::Bgr => images.flip([1]),
        }
    }
}

/// What the data folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// Smear images cut into non-overlapping `patch_size` patches.
    Smears,
    /// One cell (or patch) per image, resized to `patch_size`.
    Crops,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Folder searched recursively for png/jpg/bmp/tif.
    pub path: PathBuf,
    pub kind: DataKind,
    /// Side of the patches cut from smears (RedDino: 224).
    pub patch_size: usize,
    /// Decoding threads.
    pub workers: usize,
    /// Batches decoded ahead of the training step.
    pub prefetch: usize,
    /// Channel order of the images fed to the networks: `bgr` in RedDino's presets (its runs
    /// read images with OpenCV and never convert them), `rgb` in `tiny`. Evaluation,
    /// fine-tuning, export and the edge feed RGB, as RedDino's evaluation does.
    pub channel_order: ChannelOrder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Images per step (each gives two global crops).
    pub batch_size: usize,
    pub epochs: usize,
    /// Steps per epoch (DINOv2's OFFICIAL_EPOCH_LENGTH).
    pub epoch_length: usize,
    pub seed: u64,
    /// Checkpoints, metrics and the final backbone go here.
    pub out_dir: PathBuf,
    /// Save a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept (oldest deleted first).
    pub keep_checkpoints: usize,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `fp32`, or `fp16` (autocast with loss scaling, CUDA only).
    pub precision: String,
    /// CPU threads for libtorch (0 = all cores).
    pub threads: usize,
    /// Metrics line every this many steps.
    pub log_every: usize,
    /// Process-group backend of a multi-process run (torchrun / SLURM): `auto` (NCCL on CUDA,
    /// Gloo on the CPU), `gloo` or `nccl`.
    pub dist_backend: String,
    /// Seconds the rendezvous and each collective may take before a run with a stopped or
    /// unreachable rank fails.
    pub dist_timeout_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Learning rate at batch 1024; scaled by sqrt(batch / 1024).
    pub base_lr: f64,
    pub min_lr: f64,
    /// Linear warmup of the learning rate, in epochs (fractions allowed: RedDino's 0.1).
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub layer_decay: f64,
    pub patch_embed_lr_mult: f64,
    /// Gradient-norm clip per module (backbone, head); 0 = off.
    pub clip_grad: f64,
    /// Epochs with the DINO head's last layer frozen (RedDino: 0).
    pub freeze_last_layer_epochs: f64,
    pub beta1: f64,
    pub beta2: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    pub student_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    /// Teacher temperature ramp from `warmup_teacher_temp` to `teacher_temp`, in epochs. As in
    /// DINOv2 the ramp is not shortened to the run: RedDino's 30 epochs over a 10-epoch run
    /// end at 0.05.
    pub warmup_teacher_temp_epochs: f64,
    pub momentum_teacher: f64,
    pub final_momentum_teacher: f64,
    pub centering: Centering,
    /// Weight of the DINO (CLS) term. RedDino's 0.5: DINOv2 scales the global term by
    /// 2 / (n_global (n_global - 1) + n_global n_local), and RedDino's runs keep one local crop
    /// in that count that never enters the loss, so the divisor is 2 + 2.
    pub dino_weight: f64,
    pub ibot_weight: f64,
    pub koleo_weight: f64,
    /// Fraction of images that get an iBOT mask.
    pub mask_probability: f64,
    /// Range of masked-patch ratios.
    pub mask_ratio: (f64, f64),
    /// Local crops per image (student only, DINO loss against both teacher views); RedDino: 0.
    pub local_crops: usize,
    /// Side of the local crops (DINOv2: 98).
    pub local_crop_size: usize,
    /// RandomResizedCrop area range of the local crops (DINOv2: 0.05-0.32).
    pub local_crop_scale: (f64, f64),
}

/// A whole pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The preset the file started from.
    pub preset: String,
    pub model: ModelConfig,
    pub head: HeadConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub ssl: SslConfig,
    pub augment: AugmentConfig,
}

impl Config {
    /// A preset: `s`, `b`, `l` (RedDino's runs on one GPU) or `tiny` (CPU tests and demos).
    pub fn preset(name: &str) -> Result<Config> {
        let (arch, batch, epoch_length, prototypes) = match name {
            "s" | "small" => (Preset::Small, 280, 3200, 131_072),
            "b" | "base" => (Preset::Base, 196, 7300, 131_072),
            "l" | "large" => (Preset::Large, 64, 21800, 131_072),
            "tiny" => (Preset::Tiny, 16, 50, 4096),
            other => bail!("unknown preset `{other}`; expected one of s, b, l, tiny"),
        };
        let tiny = arch == Preset::Tiny;
        Ok(Config {
            preset: name.to_string(),
            model: ModelConfig {
                arch,
                depth: None,
                img_size: if tiny { 112 } else { 224 },
                registers: 0,
                drop_path: 0.0,
                init: if tiny {
                    InitWeights::Scratch
                } else {
                    InitWeights::Dinov2
                },
                weights_dir: PathBuf::from("weights"),
                init_pos_resample: PosResample::Bicubic,
                layerscale_init: crate::vit::LAYERSCALE_INIT,
            },
            head: if tiny {
                HeadConfig {
                    hidden_dim: 512,
                    bottleneck_dim: 128,
                    prototypes,
                    layers: 3,
                }
            } else {
                HeadConfig {
                    prototypes,
                    ..HeadConfig::default()
                }
            },
            data: DataConfig {
                path: PathBuf::from("data"),
                kind: DataKind::Smears,
                patch_size: 224,
                workers: 4,
                prefetch: 4,
                channel_order: if tiny {
                    ChannelOrder::Rgb
                } else {
                    ChannelOrder::Bgr
                },
            },
            train: TrainConfig {
                batch_size: batch,
                epochs: if tiny { 4 } else { 10 },
                epoch_length,
                seed: 0,
                out_dir: PathBuf::from("runs").join(name),
                checkpoint_every: if tiny { 100 } else { 1000 },
                keep_checkpoints: 3,
                device: "auto".into(),
                precision: if tiny { "fp32".into() } else { "fp16".into() },
                threads: 0,
                log_every: if tiny { 10 } else { 50 },
                dist_backend: "auto".into(),
                dist_timeout_s: 600,
            },
            optim: OptimConfig {
                // From scratch on a few hundred CPU steps the tiny model needs DINOv2's
                // from-scratch rate; RedDino continues from DINOv2 at 2e-4.
                base_lr: if tiny { 4e-3 } else { 2e-4 },
                min_lr: 1e-6,
                // RedDino: 0.1 epoch; the tiny CPU runs are a few hundred steps from scratch.
                warmup_epochs: if tiny { 1.0 } else { 0.1 },
                weight_decay: 0.04,
                weight_decay_end: 0.2,
                layer_decay: 1.0,
                patch_embed_lr_mult: 0.2,
                clip_grad: 3.0,
                freeze_last_layer_epochs: if tiny { 1.0 } else { 0.0 },
                beta1: 0.9,
                beta2: 0.999,
            },
            ssl: SslConfig {
                student_temp: 0.1,
                teacher_temp: 0.07,
                warmup_teacher_temp: 0.04,
                warmup_teacher_temp_epochs: if tiny { 2.0 } else { 30.0 },
                momentum_teacher: if tiny { 0.99 } else { 0.994 },
                final_momentum_teacher: 1.0,
                centering: Centering::SinkhornKnopp,
                dino_weight: if tiny { 1.0 } else { 0.5 },
                ibot_weight: 1.0,
                koleo_weight: 0.0,
                mask_probability: 0.5,
                mask_ratio: (0.1, 0.5),
                local_crops: 0,
                local_crop_size: 98,
                local_crop_scale: (0.05, 0.32),
            },
            augment: AugmentConfig::default(),
        })
    }

    /// Parses a TOML config: `preset` (default `s`) gives every value, the file overrides any.
    /// Relative paths are taken from the file's directory.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Config> {
        let user: toml::Table = toml::from_str(text).context("not valid TOML")?;
        let preset = match user.get("preset") {
            None => "s".to_string(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => bail!("`preset` must be a string (s, b, l, tiny), got {other}"),
        };
        let base = Config::preset(&preset)?;
        let mut merged = toml::Table::try_from(&base).context("preset to TOML")?;
        merge(&mut merged, user, "")?;
        // Re-parsed from text so that type errors quote the offending line (and so its key).
        let text = toml::to_string(&merged).context("merged config to TOML")?;
        let mut cfg: Config = toml::from_str(&text).context("invalid config")?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base_dir.join(&*p);
            }
        };
        abs(&mut cfg.data.path);
        abs(&mut cfg.train.out_dir);
        abs(&mut cfg.model.weights_dir);
        if let InitWeights::File(p) = &mut cfg.model.init {
            abs(p);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, dir).with_context(|| format!("config {}", path.display()))
    }

    /// The backbone dimensions.
    pub fn vit(&self) -> Result<VitConfig> {
        let mut v = VitConfig::preset(self.model.arch, self.model.img_size)?;
        v.num_registers = self.model.registers;
        if let Some(depth) = self.model.depth {
            if depth == 0 {
                bail!("model.depth must be at least 1");
            }
            v.depth = depth;
        }
        Ok(v)
    }

    /// Total optimisation steps.
    pub fn total_steps(&self) -> usize {
        self.train.epochs * self.train.epoch_length
    }

    /// Iterations in `epochs` epochs (DINOv2's `epochs * OFFICIAL_EPOCH_LENGTH`, rounded).
    pub fn iterations(&self, epochs: f64) -> usize {
        (epochs * self.train.epoch_length as f64).round() as usize
    }

    /// The starting weights' file, or None when training from scratch. `dinov2` and `reddino`
    /// name a file in `model.weights_dir`; a missing one is refused with what to put where.
    pub fn init_file(&self) -> Result<Option<PathBuf>> {
        let path = match &self.model.init {
            InitWeights::Scratch => return Ok(None),
            InitWeights::File(p) => p.clone(),
            w => self
                .model
                .weights_dir
                .join(w.file_name(self.model.arch).expect("named weights")),
        };
        if !path.is_file() {
            let what = match &self.model.init {
                InitWeights::Dinov2 => format!(
                    "RedDino's recipe starts from DINOv2's published ViT-{} weights",
                    self.model.arch.name()
                ),
                InitWeights::RedDino => format!(
                    "`reddino` starts from RedDino's published ViT-{} weights",
                    self.model.arch.name()
                ),
                _ => "the starting weights".into(),
            };
            bail!(
                "model.init: {what}, expected at {} (nothing is downloaded: convert the published \
                 checkpoint to safetensors and put it there, set `model.weights_dir`, name a file \
                 in `model.init`, or set `model.init = \"scratch\"` to train from random weights)",
                path.display()
            );
        }
        Ok(Some(path))
    }

    /// Checks values that would otherwise fail deep inside a run; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.vit().context("model")?;
        let pos = |v: usize, key: &str| -> Result<()> {
            if v == 0 {
                bail!("`{key}` must be positive");
            }
            Ok(())
        };
        pos(self.train.batch_size, "train.batch_size")?;
        pos(self.train.epochs, "train.epochs")?;
        pos(self.train.epoch_length, "train.epoch_length")?;
        pos(self.train.checkpoint_every, "train.checkpoint_every")?;
        pos(self.train.log_every, "train.log_every")?;
        pos(self.train.keep_checkpoints, "train.keep_checkpoints")?;
        pos(self.data.patch_size, "data.patch_size")?;
        pos(self.data.workers, "data.workers")?;
        pos(self.data.prefetch, "data.prefetch")?;
        pos(self.head.prototypes, "head.prototypes")?;
        pos(self.head.bottleneck_dim, "head.bottleneck_dim")?;
        pos(self.head.hidden_dim, "head.hidden_dim")?;
        if !matches!(self.train.precision.as_str(), "fp32" | "fp16") {
            bail!(
                "`train.precision` = `{}`: expected fp32 or fp16 (bf16 autocast is not exposed by \
                 libtorch's C API that tch wraps)",
                self.train.precision
            );
        }
        if self.ssl.local_crops > 0 {
            let s = self.ssl.local_crop_size;
            if s == 0 || s % reddino_models::arch::PATCH_SIZE != 0 {
                bail!(
                    "`ssl.local_crop_size` = {s}: must be a positive multiple of the patch size 14"
                );
            }
            let (a, b) = self.ssl.local_crop_scale;
            if !(a > 0.0 && a <= b && b <= 1.0) {
                bail!("`ssl.local_crop_scale` = ({a}, {b}): expected 0 < min <= max <= 1");
            }
        }
        let (lo, hi) = self.ssl.mask_ratio;
        if !(0.0..=1.0).contains(&lo) || !(lo..=1.0).contains(&hi) {
            bail!("`ssl.mask_ratio` = ({lo}, {hi}): expected 0 <= min <= max <= 1");
        }
        if !(0.0..=1.0).contains(&self.ssl.mask_probability) {
            bail!("`ssl.mask_probability` must be in [0, 1]");
        }
        let ls = self.model.layerscale_init;
        if !(ls > 0.0 && ls.is_finite()) {
            bail!("`model.layerscale_init` = {ls}: expected a positive number (DINOv2: 1e-5)");
        }
        for (key, v) in [
            ("optim.warmup_epochs", self.optim.warmup_epochs),
            (
                "optim.freeze_last_layer_epochs",
                self.optim.freeze_last_layer_epochs,
            ),
            (
                "ssl.warmup_teacher_temp_epochs",
                self.ssl.warmup_teacher_temp_epochs,
            ),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("`{key}` = {v}: expected a number of epochs >= 0");
            }
        }
        if self.ssl.student_temp <= 0.0
            || self.ssl.teacher_temp <= 0.0
            || self.ssl.warmup_teacher_temp <= 0.0
        {
            bail!("`ssl.*_temp` must be positive");
        }
        if !matches!(self.train.dist_backend.as_str(), "auto" | "gloo" | "nccl") {
            bail!(
                "`train.dist_backend` = `{}`: expected auto, gloo or nccl",
                self.train.dist_backend
            );
        }
        pos(self.train.dist_timeout_s as usize, "train.dist_timeout_s")?;
        if !(0.0..=1.0).contains(&self.augment.flip_p) {
            bail!("`augment.flip_p` must be in [0, 1]");
        }
        let (s0, s1) = self.augment.crop_scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            bail!("`augment.crop_scale` = ({s0}, {s1}): expected 0 < min <= max <= 1");
        }
        if self.augment.ops_per_image > 33 {
            bail!("`augment.ops_per_image` must be at most 33");
        }
        Ok(())
    }
}

/// Keys a preset leaves out (optional, absent by default) that a config may still set.
const OPTIONAL_KEYS: &[&str] = &["model.depth"];

/// Overlays `user` on `base`, refusing keys the base does not have (with their full name).
fn merge(base: &mut toml::Table, user: toml::Table, prefix: &str) -> Result<()> {
    for (k, v) in user {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u, &name)?,
            (Some(_), toml::Value::Table(_)) => bail!("`{name}` is a value, not a table"),
            (Some(slot), v) => *slot = v,
            (None, v) if OPTIONAL_KEYS.contains(&name.as_str()) => {
                base.insert(k, v);
            }
            (None, _) => bail!("unknown key `{name}`"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_reddino() {
        let s = Config::preset("s").unwrap();
        assert_eq!(
            (s.train.batch_size, s.train.epoch_length, s.train.epochs),
            (280, 3200, 10)
        );
        assert_eq!(s.head.prototypes, 131_072);
        assert_eq!(s.optim.base_lr, 2e-4);
        assert_eq!(s.ssl.momentum_teacher, 0.994);
        assert_eq!(s.ssl.centering, Centering::SinkhornKnopp);
        assert_eq!(s.ssl.koleo_weight, 0.0);
        assert_eq!(s.augment.crop_scale, (0.32, 1.0));
        let b = Config::preset("b").unwrap();
        assert_eq!((b.train.batch_size, b.train.epoch_length), (196, 7300));
        let l = Config::preset("l").unwrap();
        assert_eq!((l.train.batch_size, l.train.epoch_length), (64, 21800));
        assert_eq!(l.vit().unwrap().embed_dim, 1024);
    }

    /// RedDino's released recipe, row by row, for each size: the rows where DINOv2's defaults
    /// or an earlier trainer differed.
    #[test]
    fn presets_follow_reddinos_released_recipe_row_by_row() {
        use crate::train::Schedules;
        for (name, ep) in [("s", 3200), ("b", 7300), ("l", 21800)] {
            let c = Config::preset(name).unwrap();
            // DINO term 0.5 (divisor 2 + 2 with RedDino's one uncounted local crop).
            assert_eq!(c.ssl.dino_weight, 0.5, "{name}");
            assert_eq!(c.ssl.ibot_weight, 1.0, "{name}");
            // Warmup 0.1 epoch: 320 / 730 / 2180 iterations.
            assert_eq!(c.iterations(c.optim.warmup_epochs), ep / 10, "{name}");
            // Last layer never frozen.
            assert_eq!(c.optim.freeze_last_layer_epochs, 0.0, "{name}");
            // Starts from the same-size DINOv2 weights, position embedding bicubic, no AA.
            assert_eq!(c.model.init, InitWeights::Dinov2, "{name}");
            assert_eq!(c.model.init_pos_resample, PosResample::Bicubic, "{name}");
            // Trained on BGR.
            assert_eq!(c.data.channel_order, ChannelOrder::Bgr, "{name}");
            let sched = Schedules::new(&c);
            let total = c.total_steps();
            let warm = ep / 10;
            // lr: 0 at step 0, the peak at the end of the warmup, then the cosine.
            let peak = crate::schedule::scaled_lr(2e-4, c.train.batch_size);
            assert_eq!(sched.at(0).lr, 0.0);
            assert!((sched.at(warm - 1).lr - peak).abs() < 1e-15, "{name}");
            assert!(sched.at(warm + 1).lr < peak);
            // The last layer learns from step 1 like the rest.
            assert_eq!(sched.at(1).last_layer_lr, sched.at(1).lr, "{name}");
            // Teacher temperature 0.04 -> 0.07 over 30 epochs: 0.05 at the end of 10.
            assert_eq!(sched.at(0).teacher_temp, 0.04);
            let end = sched.at(total - 1).teacher_temp;
            assert!((end - 0.05).abs() < 1e-4, "{name}: ends at {end}");
        }
        let names = |c: &Config| c.model.init.file_name(c.model.arch).unwrap();
        assert_eq!(
            names(&Config::preset("s").unwrap()),
            "dinov2_vits14.safetensors"
        );
        assert_eq!(
            names(&Config::preset("l").unwrap()),
            "dinov2_vitl14.safetensors"
        );
        assert_eq!(
            InitWeights::RedDino.file_name(Preset::Base).unwrap(),
            "reddino-base.safetensors"
        );
        // tiny: the CPU preset keeps from scratch, RGB, a whole-epoch warmup and DINO 1.0.
        let t = Config::preset("tiny").unwrap();
        assert_eq!(t.model.init, InitWeights::Scratch);
        assert_eq!(t.init_file().unwrap(), None);
        assert_eq!(t.data.channel_order, ChannelOrder::Rgb);
        // A ramp longer than the run is not squeezed into it (DINOv2's schedule).
        let mut t = t;
        t.ssl.warmup_teacher_temp_epochs = 3.0 * t.train.epochs as f64;
        let s = Schedules::new(&t);
        let end = s.at(t.total_steps() - 1).teacher_temp;
        assert!((end - (0.04 + 0.03 / 3.0)).abs() < 1e-3, "{end}");
        assert_eq!(s.at(3 * t.total_steps()).teacher_temp, 0.07);
    }

    #[test]
    fn init_and_channel_order_parse() {
        let c = |t: &str| Config::from_toml(t, Path::new("/cfg"));
        let s = c("[model]\ninit = \"scratch\"").unwrap();
        assert_eq!(s.model.init, InitWeights::Scratch);
        assert_eq!(s.model.weights_dir, PathBuf::from("/cfg/weights"));
        let f = c("[model]\ninit = \"w/x.safetensors\"").unwrap();
        assert_eq!(
            f.model.init,
            InitWeights::File("/cfg/w/x.safetensors".into())
        );
        let r = c("[model]\ninit = \"reddino\"\nweights_dir = \"/w\"").unwrap();
        let err = format!("{:#}", r.init_file().unwrap_err());
        assert!(
            err.contains("/w/reddino-small.safetensors") && err.contains("scratch"),
            "{err}"
        );
        assert!(format!("{:#}", c("[model]\ninit = \"\"").unwrap_err()).contains("model.init"));
        let rgb = c("[data]\nchannel_order = \"rgb\"").unwrap();
        assert_eq!(rgb.data.channel_order, ChannelOrder::Rgb);
        assert!(c("[data]\nchannel_order = \"grb\"").is_err());
        // Fractional epochs, and integers where they were integers before.
        let w = c("[optim]\nwarmup_epochs = 1\nfreeze_last_layer_epochs = 0.5").unwrap();
        assert_eq!((w.optim.warmup_epochs, w.iterations(0.5)), (1.0, 1600));
        assert!(
            format!("{:#}", c("[optim]\nwarmup_epochs = -1").unwrap_err())
                .contains("optim.warmup_epochs")
        );
        let x = tch::Tensor::from_slice(&[1f32, 2., 3.]).view([1, 3, 1, 1]);
        let bgr = Vec::<f32>::try_from(ChannelOrder::Bgr.apply(x.shallow_clone()).flatten(0, -1));
        assert_eq!(bgr.unwrap(), vec![3., 2., 1.]);
        let same = Vec::<f32>::try_from(ChannelOrder::Rgb.apply(x).flatten(0, -1));
        assert_eq!(same.unwrap(), vec![1., 2., 3.]);
    }

    #[test]
    fn overrides_and_errors_name_the_key() {
        let c = Config::from_toml(
            "preset = \"tiny\"\n[train]\nbatch_size = 8\n[data]\npath = \"smears\"\n",
            Path::new("/cfg"),
        )
        .unwrap();
        assert_eq!(c.train.batch_size, 8);
        assert_eq!(c.model.arch, Preset::Tiny);
        assert_eq!(c.data.path, PathBuf::from("/cfg/smears"));
        let err = |t: &str| format!("{:#}", Config::from_toml(t, Path::new(".")).unwrap_err());
        assert!(err("[train]\nbatchsize = 8").contains("unknown key `train.batchsize`"));
        assert!(err("[train]\nbatch_size = 0").contains("train.batch_size"));
        assert!(err("[train]\nbatch_size = \"x\"").contains("batch_size"));
        assert!(err("preset = \"xl\"").contains("unknown preset `xl`"));
        assert!(err("[model]\nimg_size = 100").contains("multiple of the patch size"));
        assert!(err("[model]\ndepth = 0").contains("model.depth"));
        let deep = Config::from_toml("preset = \"tiny\"\n[model]\ndepth = 8\n", Path::new("."));
        assert_eq!(deep.unwrap().vit().unwrap().depth, 8);
        assert!(err("[train]\nprecision = \"bf16\"").contains("train.precision"));
        assert!(
            err("[ssl]\nlocal_crops = 8\nlocal_crop_size = 100").contains("ssl.local_crop_size")
        );
        assert!(err("this is not toml").contains("TOML"));
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/pretrain.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.preset, "s");
    }
}
