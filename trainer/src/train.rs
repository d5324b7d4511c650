//! The pretraining loop: schedules, the DINOv2 step, the teacher EMA, checkpoints with exact
//! resume, metrics as JSON lines, progress, and a clean stop on a non-finite loss.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::bail;
use crate::error::{Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reddino_models::weights::VitWeights;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::augment::augment;
use crate::config::Config;
use crate::data::{to_tensor, Dataset, Loader};
use crate::distributed::{ProcessGroup, BUCKET_BYTES};
use crate::loss::Center;
use crate::masking::MaskGenerator;
use crate::optim::{ema_update, AdamW, Optimizer};
use crate::schedule::{scaled_lr, Cosine};
use crate::ssl::{forward_losses, Batch, Centering, LossConfig, Network, StepLosses};

/// Picks the device named in the config.
pub fn device_from(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("`train.device` = cuda but no CUDA device is available to libtorch");
            }
            Device::Cuda(0)
        }
        other => match other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
        {
            Some(i) if (i as i64) < tch::Cuda::device_count() => Device::Cuda(i),
            Some(i) => bail!(
                "`train.device` = cuda:{i} but libtorch sees {} CUDA devices",
                tch::Cuda::device_count()
            ),
            None => bail!("`train.device` = `{other}`: expected auto, cpu, cuda or cuda:N"),
        },
    })
}

/// Every value the schedules give at one step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scheduled {
    pub lr: f64,
    pub last_layer_lr: f64,
    pub wd: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
}

/// DINOv2's five schedules.
pub struct Schedules {
    lr: Cosine,
    last_layer_lr: Cosine,
    wd: Cosine,
    momentum: Cosine,
    teacher_temp: Cosine,
}

impl Schedules {
    pub fn new(cfg: &Config) -> Schedules {
        let total = cfg.total_steps();
        let o = &cfg.optim;
        let s = &cfg.ssl;
        let lr = scaled_lr(o.base_lr, cfg.train.batch_size);
        let min_lr = o.min_lr;
        let warmup = cfg.iterations(o.warmup_epochs);
        // DINOv2 builds the temperature schedule over its own warmup only (total = warmup
        // iterations), then holds `teacher_temp`: a run shorter than the ramp ends below it.
        let temp_ramp = cfg.iterations(s.warmup_teacher_temp_epochs);
        Schedules {
            lr: Cosine::new(lr, min_lr, total, warmup, 0.0, 0),
            last_layer_lr: Cosine::new(
                lr,
                min_lr,
                total,
                warmup,
                0.0,
                cfg.iterations(o.freeze_last_layer_epochs),
            ),
            wd: Cosine::new(o.weight_decay, o.weight_decay_end, total, 0, 0.0, 0),
            momentum: Cosine::new(
                s.momentum_teacher,
                s.final_momentum_teacher,
                total,
                0,
                0.0,
                0,
            ),
            teacher_temp: Cosine::new(
                s.teacher_temp,
                s.teacher_temp,
                temp_ramp,
                temp_ramp,
                s.warmup_teacher_temp,
                0,
            ),
        }
    }

    pub fn at(&self, step: usize) -> Scheduled {
        Scheduled {
            lr: self.lr.at(step),
            last_layer_lr: self.last_layer_lr.at(step),
            wd: self.wd.at(step),
            momentum: self.momentum.at(step),
            teacher_temp: self.teacher_temp.at(step),
        }
    }
}

/// Dynamic loss scaling for fp16 autocast (torch.cuda.amp.GradScaler's policy).
struct Scaler {
    scale: f64,
    good_steps: usize,
}

/// What a checkpoint's `state.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: usize,
    config: Config,
    loss_scale: Option<f64>,
}

/// One line of metrics.jsonl.
#[derive(Debug, Serialize)]
struct Metrics {
    step: usize,
    epoch: f64,
    #[serde(flatten)]
    losses: StepLosses,
    #[serde(flatten)]
    sched: Scheduled,
    grad_norm_backbone: f64,
    grad_norm_head: f64,
    images_per_s: f64,
    elapsed_s: f64,
}

/// Outcome of [`Trainer::run`].
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub checkpoint: Option<PathBuf>,
    pub images_per_s: f64,
}

/// The student, the teacher and the optimiser of one run.
pub struct Trainer {
    pub cfg: Config,
    pub device: Device,
    pub student: Network,
    pub teacher: Network,
    pub opt: Optimizer,
    pub schedules: Schedules,
    masker: MaskGenerator,
    centers: Option<(Center, Center)>,
    student_vars: Vec<Tensor>,
    teacher_vars: Vec<Tensor>,
    scaler: Option<Scaler>,
    /// Completed steps.
    pub step: usize,
    last_checkpoint: Option<PathBuf>,
    /// The process group of a multi-process run (None: one process).
    pub group: Option<ProcessGroup>,
}

fn step_seed(seed: u64, step: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64)
            .wrapping_add(1)
            .wrapping_mul(0xD1B5_4A32_D192_ED03)
}

impl Trainer {
    /// Builds the networks (from `model.init` or from scratch, seeded), the teacher as a copy of
    /// the student, and the optimiser.
    pub fn new(cfg: Config) -> Result<Trainer> {
        Trainer::with_group(cfg, None)
    }

    /// [`Trainer::new`] as one rank of `group`: `train.batch_size` is the global batch, split
    /// evenly over the ranks; the student starts from rank 0's weights; CUDA devices are picked
    /// by local rank (`auto` and `cuda` mean `cuda:LOCAL_RANK`).
    pub fn with_group(cfg: Config, group: Option<ProcessGroup>) -> Result<Trainer> {
        cfg.validate()?;
        let device = match &group {
            Some(g)
                if cfg.train.device == "cuda"
                    || (cfg.train.device == "auto" && tch::Cuda::is_available()) =>
            {
                device_from(&format!("cuda:{}", g.local_rank))?
            }
            _ => device_from(&cfg.train.device)?,
        };
        if let Some(g) = &group {
            if cfg.train.batch_size % g.world != 0 {
                bail!(
                    "`train.batch_size` = {} (the global batch) does not split evenly over {} processes",
                    cfg.train.batch_size,
                    g.world
                );
            }
        }
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        tch::manual_seed(cfg.train.seed as i64);
        let vit = cfg.vit()?;
        let init = match cfg.init_file()? {
            Some(p) => {
                let w =
                    VitWeights::load(&p).with_context(|| format!("model.init {}", p.display()))?;
                if (w.config.embed_dim, w.config.depth, w.config.num_heads)
                    != (vit.embed_dim, vit.depth, vit.num_heads)
                {
                    bail!(
                        "model.init {} is a {}-d, {}-layer ViT but model.arch = {} wants {}-d, {} layers",
                        p.display(),
                        w.config.embed_dim,
                        w.config.depth,
                        cfg.model.arch.name(),
                        vit.embed_dim,
                        vit.depth
                    );
                }
                Some(w)
            }
            None => None,
        };
        let resample = cfg.model.init_pos_resample;
        let ls = cfg.model.layerscale_init;
        let mut student = Network::new(device, &vit, &cfg.head, init.as_ref(), resample, ls)?;
        student.backbone.drop_path = cfg.model.drop_path;
        let mut teacher = Network::new(device, &vit, &cfg.head, init.as_ref(), resample, ls)?;
        if let Some(g) = &group {
            // Every rank starts from rank 0's student (DDP's broadcast at construction).
            let vars: Vec<Tensor> = student.named().into_iter().map(|(_, t)| t).collect();
            tch::no_grad(|| g.broadcast(&vars.iter().collect::<Vec<_>>(), 0))?;
        }
        teacher.vs.copy(&student.vs).context("teacher <- student")?;
        teacher.vs.freeze();
        let named = student.named();
        let tnamed = teacher.named();
        if named.iter().map(|n| &n.0).ne(tnamed.iter().map(|n| &n.0)) {
            bail!("student and teacher variables differ");
        }
        let student_vars = named.iter().map(|(_, t)| t.shallow_clone()).collect();
        let teacher_vars = tnamed.iter().map(|(_, t)| t.shallow_clone()).collect();
        let opt = Optimizer::new(
            named,
            AdamW {
                beta1: cfg.optim.beta1,
                beta2: cfg.optim.beta2,
                eps: 1e-8,
            },
            cfg.optim.layer_decay,
            cfg.optim.patch_embed_lr_mult,
            vit.depth,
        );
        let centers = (cfg.ssl.centering == Centering::Centering).then(|| {
            let k = cfg.head.prototypes as i64;
            (Center::new(k, 0.9, device), Center::new(k, 0.9, device))
        });
        let scaler = (cfg.train.precision == "fp16" && device.is_cuda()).then_some(Scaler {
            scale: 65536.0,
            good_steps: 0,
        });
        Ok(Trainer {
            masker: MaskGenerator::new(vit.grid()),
            schedules: Schedules::new(&cfg),
            cfg,
            device,
            student,
            teacher,
            opt,
            centers,
            student_vars,
            teacher_vars,
            scaler,
            step: 0,
            last_checkpoint: None,
            group,
        })
    }

    /// (rank, world size): (0, 1) for one process.
    pub fn rank_world(&self) -> (usize, usize) {
        self.group.as_ref().map_or((0, 1), |g| (g.rank, g.world))
    }

    /// Images per step on this rank.
    pub fn local_batch(&self) -> usize {
        self.cfg.train.batch_size / self.rank_world().1
    }

    fn loss_config(&self) -> LossConfig {
        let s = &self.cfg.ssl;
        LossConfig {
            student_temp: s.student_temp,
            dino_weight: s.dino_weight,
            ibot_weight: s.ibot_weight,
            koleo_weight: s.koleo_weight,
            centering: s.centering,
        }
    }

    /// One optimisation step on `images` ([B, 3, H, W] RGB in [0, 1] on the training device),
    /// put in `data.channel_order` before the augmentations (as RedDino's runs augment the
    /// BGR arrays OpenCV reads). Returns the losses and the gradient norms (backbone, head)
    /// before clipping.
    pub fn train_step(&mut self, images: &Tensor) -> Result<(StepLosses, f64, f64)> {
        let images = self.cfg.data.channel_order.apply(images.shallow_clone());
        let batch = self.make_batch(&images);
        self.optimize(&batch)
    }

    /// The step's two augmented global crops of every image and the iBOT masks. Seeded by
    /// (seed, step): the same step always sees the same views. The masks are drawn for the
    /// global batch and each rank takes its images' rows, so the masks of a step do not
    /// depend on the world size; the augmentations are drawn per rank (rank 0's stream is the
    /// single process's).
    pub fn make_batch(&self, images: &Tensor) -> Batch {
        let (rank, world) = self.rank_world();
        let seed = step_seed(self.cfg.train.seed, self.step);
        let aug_seed = if rank == 0 {
            seed
        } else {
            step_seed(seed ^ 0xA5A5_5A5A_F00D_CAFE, rank)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(aug_seed);
        let mut mask_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6D61_736B_7321_0001);
        tch::manual_seed((aug_seed >> 1) as i64);
        let size = self.cfg.model.img_size as i64;
        let b = images.size()[0] as usize;
        tch::no_grad(|| {
            let (c1, _) = augment(images, size, &self.cfg.augment, &mut rng);
            let (c2, _) = augment(images, size, &self.cfg.augment, &mut rng);
            let global = self.masker.batch(
                2 * b * world,
                self.cfg.ssl.mask_probability,
                self.cfg.ssl.mask_ratio,
                &mut mask_rng,
            );
            // Rows of crop 1, then crop 2, of this rank's images.
            let masks: Vec<Vec<bool>> = (0..2)
                .flat_map(|c| (0..b).map(move |i| c * b * world + rank * b + i))
                .map(|row| global[row].clone())
                .collect();
            let n = masks[0].len() as i64;
            let flat: Vec<u8> = masks.iter().flatten().map(|&m| m as u8).collect();
            let masks = Tensor::from_slice(&flat)
                .view([(2 * b) as i64, n])
                .to_kind(Kind::Bool)
                .to_device(self.device);
            let locals = (self.cfg.ssl.local_crops > 0).then(|| {
                let mut local_cfg = self.cfg.augment.clone();
                local_cfg.crop_scale = self.cfg.ssl.local_crop_scale;
                let s = self.cfg.ssl.local_crop_size as i64;
                let views: Vec<Tensor> = (0..self.cfg.ssl.local_crops)
                    .map(|_| augment(images, s, &local_cfg, &mut rng).0)
                    .collect();
                Tensor::cat(&views, 0)
            });
            Batch {
                crops: Tensor::cat(&[c1, c2], 0),
                masks,
                locals,
            }
        })
    }

    /// Forward, losses, backward, clipping, AdamW and the teacher EMA on a prepared batch.
    /// Returns the losses and the gradient norms (backbone, head) before clipping.
    pub fn optimize(&mut self, batch: &Batch) -> Result<(StepLosses, f64, f64)> {
        let sched = self.schedules.at(self.step);
        self.opt.zero_grad();
        let lcfg = self.loss_config();
        let fp16 = self.scaler.is_some();
        let group = self.group.as_ref();
        let (loss, mut parts) = tch::autocast(fp16, || {
            forward_losses(
                &self.student,
                &self.teacher,
                batch,
                sched.teacher_temp,
                &lcfg,
                &mut self.centers,
                group,
            )
        });
        if let Some(g) = group {
            g.check()?;
            // The ranks' mean losses (what one process on the global batch reports), so that
            // every rank sees the same value and stops together on a non-finite one.
            let v = Tensor::from_slice(&[parts.total, parts.dino, parts.ibot, parts.koleo])
                .to_device(self.device);
            g.all_reduce(&[&v], false)?;
            let v = Vec::<f64>::try_from((v / g.world as f64).to_device(Device::Cpu))
                .unwrap_or_default();
            if let [total, dino, ibot, koleo] = v[..] {
                parts = StepLosses {
                    total,
                    dino,
                    ibot,
                    koleo,
                };
            }
        }
        if !parts.total.is_finite() {
            bail!(
                "loss is {} at step {} (dino {}, ibot {}, koleo {}); stopping. Last good checkpoint: {}",
                parts.total,
                self.step,
                parts.dino,
                parts.ibot,
                parts.koleo,
                self.last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none yet (no checkpoint was written before this step)".into())
            );
        }
        let mut skip = false;
        match &self.scaler {
            Some(sc) => (&loss * sc.scale).backward(),
            None => loss.backward(),
        }
        if let Some(g) = &self.group {
            let vars: Vec<Tensor> = self
                .opt
                .params
                .iter()
                .map(|p| p.var.shallow_clone())
                .collect();
            g.average_gradients(&vars, BUCKET_BYTES)?;
        }
        if let Some(sc) = &mut self.scaler {
            let inv = 1.0 / sc.scale;
            let mut finite = true;
            tch::no_grad(|| {
                for p in &self.opt.params {
                    let g = p.var.grad();
                    if g.defined() {
                        let _ = g.shallow_clone().g_mul_scalar_(inv);
                        if finite && !bool::try_from(g.isfinite().all()).unwrap_or(false) {
                            finite = false;
                        }
                    }
                }
            });
            if finite {
                sc.good_steps += 1;
                if sc.good_steps % 2000 == 0 {
                    sc.scale *= 2.0;
                }
            } else {
                sc.scale /= 2.0;
                sc.good_steps = 0;
                skip = true;
                log::warn!(
                    "step {}: fp16 gradients overflowed; update skipped, loss scale now {}",
                    self.step,
                    sc.scale
                );
            }
        }
        let (gb, gh) = self.apply_updates(&sched, skip);
        self.step += 1;
        Ok((parts, gb, gh))
    }

    /// After the backward pass: clips and applies the student's update unless the fp16 step
    /// overflowed (`skip`), then moves the teacher towards the student. The EMA runs on a
    /// skipped step too, as in DINOv2 and RedDino (the scaler skips only the optimiser).
    /// Returns the backbone's and the head's gradient norms (0 when skipped or not clipped).
    pub fn apply_updates(&mut self, sched: &Scheduled, skip: bool) -> (f64, f64) {
        let (mut gb, mut gh) = (0.0, 0.0);
        if !skip {
            if self.cfg.optim.clip_grad > 0.0 {
                gb = self
                    .opt
                    .clip_grad_norm("backbone.", self.cfg.optim.clip_grad);
                gh = self
                    .opt
                    .clip_grad_norm("dino_head.", self.cfg.optim.clip_grad);
            }
            self.opt.update(sched.lr, sched.last_layer_lr, sched.wd);
        }
        ema_update(&self.teacher_vars, &self.student_vars, sched.momentum);
        (gb, gh)
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.cfg.train.out_dir.join("checkpoints")
    }

    /// Writes a checkpoint of the current step and returns its folder. Files: `student` and
    /// `teacher` variables, `optimizer` moments (and centres), `state.json`, and
    /// `backbone.safetensors` (the teacher backbone in timm layout: what `export` takes).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.checkpoints_dir();
        let name = format!("step_{:08}", self.step);
        let dir = root.join(&name);
        let tmp = root.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Tensor::write_safetensors(&self.student.named(), tmp.join("student.safetensors"))?;
        Tensor::write_safetensors(&self.teacher.named(), tmp.join("teacher.safetensors"))?;
        let mut opt = self.opt.state();
        if let Some((c1, c2)) = &self.centers {
            opt.push(("center.dino".into(), c1.center.shallow_clone()));
            opt.push(("center.ibot".into(), c2.center.shallow_clone()));
        }
        Tensor::write_safetensors(&opt, tmp.join("optimizer.safetensors"))?;
        self.teacher
            .backbone
            .to_weights()?
            .save(&tmp.join("backbone.safetensors"))?;
        let state = State {
            step: self.step,
            config: self.cfg.clone(),
            loss_scale: self.scaler.as_ref().map(|s| s.scale),
        };
        std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state)?)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("moving checkpoint to {}", dir.display()))?;
        // `last` names the newest complete checkpoint; replaced atomically.
        let last_tmp = root.join(".last.tmp");
        std::fs::write(&last_tmp, &name)?;
        std::fs::rename(&last_tmp, root.join("last"))?;
        self.prune_checkpoints(&root)?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    fn prune_checkpoints(&self, root: &Path) -> Result<()> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step_"))
            })
            .collect();
        dirs.sort();
        while dirs.len() > self.cfg.train.keep_checkpoints {
            let old = dirs.remove(0);
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }

    /// Loads the newest checkpoint of this run's `out_dir`; `Ok(false)` when there is none.
    /// Refuses a checkpoint written with a different training configuration.
    pub fn resume(&mut self) -> Result<bool> {
        let root = self.checkpoints_dir();
        let last = root.join("last");
        let name = match std::fs::read_to_string(&last) {
            Ok(n) => n.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("reading {}", last.display())),
        };
        let dir = root.join(&name);
        let state: State = serde_json::from_slice(
            &std::fs::read(dir.join("state.json"))
                .with_context(|| format!("reading {}/state.json", dir.display()))?,
        )
        .with_context(|| format!("{}/state.json", dir.display()))?;
        let comparable = |c: &Config| {
            let mut c = c.clone();
            c.train.device = String::new();
            c.train.threads = 0;
            c.train.log_every = 1;
            c.train.checkpoint_every = 1;
            c.train.keep_checkpoints = 1;
            c.data.workers = 1;
            c.data.prefetch = 1;
            c
        };
        if comparable(&state.config) != comparable(&self.cfg) {
            bail!(
                "checkpoint {} was written with a different configuration; resuming would not \
                 continue the same run (start a new out_dir, or restore the config saved in its \
                 state.json)",
                dir.display()
            );
        }
        let load = |file: &str, vars: &[(String, Tensor)]| -> Result<()> {
            let path = dir.join(file);
            let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
                .with_context(|| format!("reading {}", path.display()))?
                .into_iter()
                .collect();
            tch::no_grad(|| -> Result<()> {
                for (name, var) in vars {
                    let src = saved
                        .get(name)
                        .with_context(|| format!("{} has no `{name}`", path.display()))?;
                    if src.size() != var.size() {
                        bail!(
                            "{}: `{name}` has shape {:?}, expected {:?}",
                            path.display(),
                            src.size(),
                            var.size()
                        );
                    }
                    var.shallow_clone().copy_(src);
                }
                Ok(())
            })
        };
        load("student.safetensors", &self.student.named())?;
        load("teacher.safetensors", &self.teacher.named())?;
        let opt_path = dir.join("optimizer.safetensors");
        let opt: BTreeMap<String, Tensor> = Tensor::read_safetensors(&opt_path)
            .with_context(|| format!("reading {}", opt_path.display()))?
            .into_iter()
            .collect();
        self.opt.load_state(&opt, state.step as i64)?;
        if let Some((c1, c2)) = &mut self.centers {
            if let (Some(a), Some(b)) = (opt.get("center.dino"), opt.get("center.ibot")) {
                c1.center = a.to_device(self.device);
                c2.center = b.to_device(self.device);
            }
        }
        if let (Some(sc), Some(s)) = (&mut self.scaler, state.loss_scale) {
            sc.scale = s;
        }
        self.step = state.step;
        self.last_checkpoint = Some(dir);
        Ok(true)
    }

    /// Trains until `until` steps (default: the configured total) on `data`, with checkpoints,
    /// metrics and progress. In a multi-process run every rank calls this; rank 0 alone writes
    /// the config, the metrics, the checkpoints and the progress.
    pub fn run(
        &mut self,
        data: Arc<Dataset>,
        until: Option<usize>,
        progress: bool,
    ) -> Result<RunSummary> {
        let total = until
            .unwrap_or(self.cfg.total_steps())
            .min(self.cfg.total_steps());
        let (rank, world) = self.rank_world();
        let lead = rank == 0;
        let out = self.cfg.train.out_dir.clone();
        let mut metrics = if lead {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join("config.toml"), toml::to_string_pretty(&self.cfg)?)?;
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(out.join("metrics.jsonl"))
                    .with_context(|| format!("opening {}/metrics.jsonl", out.display()))?,
            )
        } else {
            None
        };
        let b = self.cfg.train.batch_size;
        let loader = Loader::sharded(
            data,
            self.cfg.train.seed,
            b,
            (rank, world),
            self.step,
            self.cfg.data.workers,
            self.cfg.data.prefetch,
        );
        let bar = (progress && lead).then(|| {
            let pb = indicatif::ProgressBar::new(total as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("template"),
            );
            pb.set_position(self.step as u64);
            pb
        });
        let started = Instant::now();
        let start_step = self.step;
        let mut summary = RunSummary {
            steps: 0,
            first_loss: None,
            last_loss: None,
            checkpoint: None,
            images_per_s: 0.0,
        };
        let mut window = Instant::now();
        let mut window_steps = 0usize;
        while self.step < total {
            let raw = loader.next()?;
            debug_assert_eq!(raw.step, self.step);
            let images = to_tensor(&raw, self.device);
            let sched = self.schedules.at(self.step);
            let (losses, gb, gh) = self.train_step(&images)?;
            summary.first_loss.get_or_insert(losses.total);
            summary.last_loss = Some(losses.total);
            summary.steps += 1;
            window_steps += 1;
            let done = self.step;
            if lead && (done % self.cfg.train.log_every == 0 || done == total) {
                let ips = (window_steps * b) as f64 / window.elapsed().as_secs_f64().max(1e-9);
                window = Instant::now();
                window_steps = 0;
                let m = Metrics {
                    step: done,
                    epoch: done as f64 / self.cfg.train.epoch_length as f64,
                    losses,
                    sched,
                    grad_norm_backbone: gb,
                    grad_norm_head: gh,
                    images_per_s: ips,
                    elapsed_s: started.elapsed().as_secs_f64(),
                };
                if let Some(f) = metrics.as_mut() {
                    writeln!(f, "{}", serde_json::to_string(&m)?)?;
                }
                let line = format!(
                    "loss {:.4} (dino {:.4} ibot {:.4}) lr {:.2e} {:.1} img/s",
                    losses.total, losses.dino, losses.ibot, sched.lr, ips
                );
                match &bar {
                    Some(pb) => pb.set_message(line),
                    None => log::info!("step {done}/{total} {line}"),
                }
            }
            if let Some(pb) = &bar {
                pb.set_position(done as u64);
            }
            if lead && done % self.cfg.train.checkpoint_every == 0 && done < total {
                let dir = self.save_checkpoint()?;
                log::info!("checkpoint {}", dir.display());
            }
        }
        if lead && (summary.steps > 0 || self.last_checkpoint.is_none()) {
            let dir = self.save_checkpoint()?;
            log::info!("checkpoint {}", dir.display());
        }
        if let Some(g) = &self.group {
            // Nobody reports success before the last checkpoint is on disk.
            g.barrier()?;
        }
        if let Some(pb) = &bar {
            pb.finish();
        }
        summary.checkpoint = self.last_checkpoint.clone();
        summary.images_per_s =
            ((self.step - start_step) * b) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        Ok(summary)
    }
}
