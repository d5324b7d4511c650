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
    /// Global crop side (the model's input size during training).
    pub img_size: usize,
    /// Register tokens (0 for RedDino).
    pub registers: usize,
    /// Stochastic depth of the student.
    pub drop_path: f64,
    /// Start from these weights (timm, DINOv2, RedDino or this trainer's safetensors);
    /// absent: from scratch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Learning rate at batch 1024; scaled by sqrt(batch / 1024).
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub layer_decay: f64,
    pub patch_embed_lr_mult: f64,
    /// Gradient-norm clip per module (backbone, head); 0 = off.
    pub clip_grad: f64,
    pub freeze_last_layer_epochs: usize,
    pub beta1: f64,
    pub beta2: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    pub student_temp: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: usize,
    pub momentum_teacher: f64,
    pub final_momentum_teacher: f64,
    pub centering: Centering,
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
                img_size: if tiny { 112 } else { 224 },
                registers: 0,
                drop_path: 0.0,
                init: None,
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
            },
            optim: OptimConfig {
                // From scratch on a few hundred CPU steps the tiny model needs DINOv2's
                // from-scratch rate; RedDino continues from DINOv2 at 2e-4.
                base_lr: if tiny { 4e-3 } else { 2e-4 },
                min_lr: 1e-6,
                warmup_epochs: 1,
                weight_decay: 0.04,
                weight_decay_end: 0.2,
                layer_decay: 1.0,
                patch_embed_lr_mult: 0.2,
                clip_grad: 3.0,
                freeze_last_layer_epochs: 1,
                beta1: 0.9,
                beta2: 0.999,
            },
            ssl: SslConfig {
                student_temp: 0.1,
                teacher_temp: 0.07,
                warmup_teacher_temp: 0.04,
                warmup_teacher_temp_epochs: if tiny { 2 } else { 30 },
                momentum_teacher: if tiny { 0.99 } else { 0.994 },
                final_momentum_teacher: 1.0,
                centering: Centering::SinkhornKnopp,
                dino_weight: 1.0,
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
        if let Some(p) = cfg.model.init.as_mut() {
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
        Ok(v)
    }

    /// Total optimisation steps.
    pub fn total_steps(&self) -> usize {
        self.train.epochs * self.train.epoch_length
    }

    /// Checks values that would otherwise fail deep inside a run; errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.vit().context("model.img_size")?;
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
        if self.ssl.student_temp <= 0.0
            || self.ssl.teacher_temp <= 0.0
            || self.ssl.warmup_teacher_temp <= 0.0
        {
            bail!("`ssl.*_temp` must be positive");
        }
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
            // Optional keys absent from the preset.
            (None, v) if name == "model.init" => {
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
