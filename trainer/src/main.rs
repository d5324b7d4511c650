//! `reddino-trainer`: RedDino/DINOv2 self-supervised pretraining.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use reddino_trainer::config::Config;
use reddino_trainer::data::Dataset;
use reddino_trainer::report::LabelledSet;
use reddino_trainer::train::Trainer;

#[derive(Parser)]
#[command(
    name = "reddino-trainer",
    version,
    about = "RedDino self-supervised pretraining (tch / libtorch; CUDA when present, CPU otherwise)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pretrain a RedDino backbone (DINOv2 losses) on a folder of smears or crops.
    Pretrain {
        /// TOML config (see docs/pretrain.example.toml); `preset` gives every unset key.
        #[arg(long)]
        config: PathBuf,
        /// Continue from the newest checkpoint in the run's out_dir.
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps in total (default: epochs x epoch_length).
        #[arg(long)]
        steps: Option<usize>,
    },
    /// Export a backbone (+ optional linear head) to a signed bundle for reddino-edge; the ONNX
    /// is checked against the tch model (max difference 1e-4) before anything is written.
    Export {
        /// Backbone safetensors: this trainer's backbone.safetensors, or a timm / DINOv2 /
        /// RedDino checkpoint (detected from the keys).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Linear head safetensors (with its class names).
        #[arg(long)]
        head: Option<PathBuf>,
        /// Model input size (a multiple of 14); the position embedding is resampled.
        #[arg(long, default_value_t = 224)]
        input_size: usize,
        /// Bundle directory to write; `--tar` also packs it.
        #[arg(long)]
        out: PathBuf,
        /// Minisign secret key (reddino-models keygen makes one).
        #[arg(long)]
        sign: PathBuf,
        #[arg(long, default_value = "reddino")]
        name: String,
        #[arg(long, default_value = "0.1.0")]
        version: String,
        #[arg(long, default_value = "")]
        description: String,
        /// The crops the model was trained on: none smaller than this multiple of the frame's
        /// median cell (`--min-side` of the crop tools); 0 = each crop scaled to its cell.
        #[arg(long, default_value_t = 0.0)]
        crop_min_side: f32,
        /// The crops the model was trained on had their neighbours blanked out
        /// (`--blank-neighbours` of the crop tools); the edge then cuts them so too.
        #[arg(long)]
        blank_neighbours: bool,
        /// The edge's cell-finder profile the training crops were cut with (`reddino-edge
        /// import --profile`): `real-smear` for real fields; default: the synthetic microscope's.
        #[arg(long, default_value = "")]
        cell_finder: String,
        #[arg(long)]
        tar: bool,
    },
    /// Write CLS features (after the final norm) of a folder of labelled crops
    /// ({class}/image or {source}/{class}/image) to FILE.safetensors (+ FILE.json with names).
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of labelled crops.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate frozen features with the linear probe and kNN (k = 1, 20) under a fixed split,
    /// stratified 5-fold CV and leave-one-source-out; writes report.json and report.md.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of labelled crops.
        #[arg(long)]
        data: PathBuf,
        /// Report folder.
        #[arg(long)]
        out: PathBuf,
        /// kNN with cosine similarity and temperature-weighted votes instead of Euclidean.
        #[arg(long)]
        cosine: bool,
        /// Features to probe: the checkpoint's, or a baseline (same architecture randomly
        /// initialised, or raw pixels at the input size).
        #[arg(long, value_enum, default_value = "model")]
        features: FeatureKind,
        /// Leave-one-source-out only (skips the split and 5-fold protocols).
        #[arg(long)]
        loso_only: bool,
    },
    /// Fine-tune a backbone with a new linear head on labelled crops (cross-entropy, AdamW
    /// with layer-wise lr decay, RedDino's pixel augmentations); writes backbone.safetensors
    /// and head.safetensors for `export`.
    Finetune {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of labelled crops ({class}/image or {source}/{class}/image).
        #[arg(long)]
        data: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        /// Peak learning rate (head and last block; earlier blocks decay by --layer-decay).
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0.75)]
        layer_decay: f64,
        #[arg(long, default_value_t = 0.05)]
        weight_decay: f64,
        #[arg(long, default_value_t = 0.1)]
        label_smoothing: f64,
        /// Smallest area of the random crop taken from each training crop, as a fraction of
        /// it (the largest is 1): the cells are framed between sqrt(this) and 1 times the
        /// margin the crops were cut at.
        #[arg(long, default_value_t = 0.6)]
        crop_scale: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// CPU threads for libtorch (0 = its default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Weigh the cross-entropy by inverse class frequency (imbalanced classes).
        #[arg(long)]
        balanced: bool,
        /// Cross-validate first: one fine-tune per source folder of the data, tested on that
        /// folder (with `reddino-edge import --folds K`, K-fold cross-validation by field);
        /// writes OUT/cv/report.json and report.md, then fine-tunes on everything.
        #[arg(long)]
        cross_validate: bool,
        /// With --cross-validate: stop after the cross-validation.
        #[arg(long)]
        cv_only: bool,
    },
    /// Score a backbone + linear head on labelled crops: accuracy, balanced accuracy, F1 and
    /// the confusion matrix, overall and per source; writes report.json, report.md and
    /// confusion.png.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Linear head safetensors (its class names must include every class of the data).
        #[arg(long)]
        head: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the linear head the edge uses (multinomial logistic regression on the CLS
    /// features of all crops) and write it with its class names; `export --head` takes it.
    Probe {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of labelled crops.
        #[arg(long)]
        data: PathBuf,
        /// Head safetensors to write.
        #[arg(long)]
        out: PathBuf,
        /// L2 weight (objective: mean cross-entropy + l2/2 |W|^2); default RedDino's,
        /// 100 / (dim x classes x samples) (scikit-learn's C = dim x classes / 100).
        #[arg(long)]
        l2: Option<f64>,
    },
    /// Print a preset (s, b, l, tiny) as a complete TOML config.
    Preset { name: String },
    /// Write synthetic smear fields (PNG) to try pretraining without real data.
    SynthSmears {
        #[arg(long)]
        out: PathBuf,
        /// Fields per acquisition source.
        #[arg(long, default_value_t = 4)]
        per_source: usize,
        #[arg(long, default_value_t = 896)]
        width: u32,
        #[arg(long, default_value_t = 672)]
        height: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// The backbone to take features from.
#[derive(clap::Args)]
struct ModelArgs {
    /// Backbone safetensors (this trainer's, timm's, DINOv2's or RedDino's).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Input size the crops are resized to (position embedding resampled); default: the
    /// checkpoint's.
    #[arg(long)]
    input_size: Option<usize>,
    /// auto, cpu, cuda, cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

impl ModelArgs {
    fn features(&self, data: &std::path::Path) -> Result<(LabelledSet, tch::Tensor)> {
        self.features_of(data, FeatureKind::Model)
    }

    /// The backbone (with the checkpoint's weights, or freshly initialised) at the input size.
    fn vit(&self, random_init: bool) -> Result<(tch::nn::VarStore, reddino_trainer::vit::Vit)> {
        let w = reddino_models::weights::VitWeights::load(&self.checkpoint)?;
        let size = self.input_size.unwrap_or(w.config.img_size);
        let device = reddino_trainer::train::device_from(&self.device)?;
        let vs = tch::nn::VarStore::new(device);
        let vit = if random_init {
            tch::manual_seed(0);
            let mut cfg = w.config.clone();
            cfg.img_size = size;
            reddino_trainer::vit::Vit::random_baseline(&vs.root(), &cfg, w.pos_prefix())?
        } else {
            reddino_trainer::vit::Vit::from_weights(&vs.root(), &w, size)?
        };
        Ok((vs, vit))
    }

    fn features_of(
        &self,
        data: &std::path::Path,
        kind: FeatureKind,
    ) -> Result<(LabelledSet, tch::Tensor)> {
        let set = LabelledSet::scan(data)?;
        let (vs, vit) = self.vit(kind == FeatureKind::RandomInit)?;
        let size = vit.config.img_size;
        log::info!(
            "{} images, {} classes, {} sources; {} at {size} px on {:?}",
            set.files.len(),
            set.class_names.len(),
            set.source_names.len(),
            match kind {
                FeatureKind::Model => format!("ViT {}-d", vit.config.embed_dim),
                FeatureKind::RandomInit =>
                    format!("randomly initialised ViT {}-d", vit.config.embed_dim),
                FeatureKind::Pixels => "raw pixels".to_string(),
            },
            vs.device()
        );
        let f = match kind {
            FeatureKind::Pixels => set.pixels(size as u32)?,
            _ => set.embed(&vit, vs.device(), self.batch)?,
        };
        Ok((set, f))
    }
}

/// What `eval` probes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FeatureKind {
    /// CLS features of the checkpoint.
    Model,
    /// CLS features of the same architecture, freshly initialised (a baseline).
    RandomInit,
    /// The normalised pixels of the crop at the input size (a baseline).
    Pixels,
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Pretrain {
            config,
            resume,
            steps,
        } => {
            let cfg = Config::load(&config)?;
            let data = Dataset::scan(&cfg.data.path, cfg.data.kind, cfg.data.patch_size as u32)
                .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
            log::info!(
                "{} training samples from {} files in {}{}",
                data.items.len(),
                data.files.len(),
                cfg.data.path.display(),
                if data.skipped.is_empty() {
                    String::new()
                } else {
                    format!(" ({} unreadable files skipped)", data.skipped.len())
                }
            );
            let mut trainer = Trainer::new(cfg)?;
            log::info!(
                "device {:?}, ViT-{} at {} px, batch {}, {} steps",
                trainer.device,
                trainer.cfg.model.arch.name(),
                trainer.cfg.model.img_size,
                trainer.cfg.train.batch_size,
                trainer.cfg.total_steps()
            );
            if resume {
                if trainer.resume()? {
                    log::info!("resumed at step {}", trainer.step);
                } else {
                    log::info!(
                        "--resume: no checkpoint in {}, starting at step 0",
                        trainer.cfg.train.out_dir.display()
                    );
                }
            }
            let s = trainer.run(Arc::new(data), steps, std::io::stderr().is_terminal())?;
            println!(
                "{} steps, loss {:.4} -> {:.4}, {:.1} images/s; checkpoint {}",
                s.steps,
                s.first_loss.unwrap_or(f64::NAN),
                s.last_loss.unwrap_or(f64::NAN),
                s.images_per_s,
                s.checkpoint
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            Ok(())
        }
        Cmd::Export {
            checkpoint,
            head,
            input_size,
            out,
            sign,
            name,
            version,
            description,
            crop_min_side,
            blank_neighbours,
            cell_finder,
            tar,
        } => {
            let w = reddino_models::weights::VitWeights::load(&checkpoint)?;
            let head = head
                .map(|p| -> Result<_> {
                    let bytes =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    Ok(reddino_models::weights::LinearHead::from_bytes(
                        &bytes,
                        &p.display().to_string(),
                    )?)
                })
                .transpose()?;
            let key = reddino_models::bundle::SigningKey::from_file(&sign, None)?;
            let (m, diff) = reddino_trainer::export::export(
                &reddino_trainer::export::ExportSpec {
                    weights: &w,
                    head: head.as_ref(),
                    input_size,
                    name,
                    version,
                    description,
                    crop_min_side,
                    blank_neighbours,
                    cell_finder,
                },
                &key,
                &out,
            )?;
            println!(
                "{}: {} {} (ViT {}-d x {}, input {input_size}, {} classes); ONNX vs tch max diff {diff:.1e}",
                out.display(),
                m.name,
                m.version,
                w.config.embed_dim,
                w.config.depth,
                m.class_names.len()
            );
            if tar {
                let t = out.with_extension("tar");
                reddino_models::bundle::pack(&out, &t)?;
                println!("{}", t.display());
            }
            Ok(())
        }
        Cmd::Embed { model, data, out } => {
            let (set, f) = model.features(&data)?;
            let labels = tch::Tensor::from_slice(&set.labels);
            let sources = tch::Tensor::from_slice(&set.sources);
            tch::Tensor::write_safetensors(
                &[("features", &f), ("labels", &labels), ("sources", &sources)],
                &out,
            )?;
            let json = out.with_extension("json");
            std::fs::write(&json, serde_json::to_vec_pretty(&set)?)?;
            println!(
                "{} features [{} x {}] -> {} (+ {})",
                set.files.len(),
                f.size()[0],
                f.size()[1],
                out.display(),
                json.display()
            );
            Ok(())
        }
        Cmd::Eval {
            model,
            data,
            out,
            cosine,
            features,
            loso_only,
        } => {
            use reddino_trainer::report::{evaluate, markdown, Protocol};
            let (set, f) = model.features_of(&data, features)?;
            let knn = if cosine {
                reddino_trainer::eval::Knn::Cosine { temperature: 0.07 }
            } else {
                reddino_trainer::eval::Knn::Euclidean
            };
            if loso_only && set.source_names.len() < 2 {
                anyhow::bail!(
                    "--loso-only needs crops from two or more sources ({{source}}/{{class}}/image); {} has one",
                    data.display()
                );
            }
            let mut reports = Vec::new();
            if !loso_only {
                reports.push(evaluate(&f, &set, &Protocol::Split { test_every: 5 }, knn)?);
                reports.push(evaluate(&f, &set, &Protocol::KFold { k: 5, seed: 0 }, knn)?);
            }
            if set.source_names.len() > 1 {
                reports.push(evaluate(&f, &set, &Protocol::LeaveOneSourceOut, knn)?);
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(
                out.join("report.json"),
                serde_json::to_vec_pretty(&reports)?,
            )?;
            let what = match features {
                FeatureKind::Model => model.checkpoint.display().to_string(),
                FeatureKind::RandomInit => format!(
                    "a randomly initialised ViT shaped as {}",
                    model.checkpoint.display()
                ),
                FeatureKind::Pixels => "raw pixels".to_string(),
            };
            let mut md = markdown(&format!("Evaluation of {what}"), &set, &reports);
            md += &reddino_trainer::report::write_plots(&out, &f, &set, &reports[0])?;
            std::fs::write(out.join("report.md"), &md)?;
            print!("{md}");
            Ok(())
        }
        Cmd::Probe {
            model,
            data,
            out,
            l2,
        } => {
            use reddino_trainer::eval::{default_l2, metrics, LinearProbe};
            let (set, f) = model.features(&data)?;
            let classes = set.class_names.len();
            let l2 = l2
                .unwrap_or_else(|| default_l2(f.size()[1] as usize, classes, f.size()[0] as usize));
            let probe = LinearProbe::fit(&f, &set.labels, classes, l2, 5000);
            if !probe.converged {
                log::warn!(
                    "L-BFGS stopped after {} iterations without converging",
                    probe.iterations
                );
            }
            let train = metrics(&set.labels, &probe.predict(&f), classes);
            let tensor = |t: &tch::Tensor| -> Result<reddino_models::weights::Tensor> {
                let shape = t.size().iter().map(|&s| s as usize).collect();
                Ok(reddino_models::weights::Tensor::new(
                    shape,
                    Vec::<f32>::try_from(t.flatten(0, -1))?,
                ))
            };
            let head = reddino_models::weights::LinearHead {
                class_names: set.class_names.clone(),
                weight: tensor(&probe.weight)?,
                bias: tensor(&probe.bias)?,
            };
            head.validate(f.size()[1] as usize)?;
            std::fs::write(&out, head.to_bytes()?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "linear head ({classes} classes, l2 {l2:.3e}, {} L-BFGS iterations): training accuracy {:.3}, balanced {:.3} -> {}",
                probe.iterations,
                train.accuracy,
                train.balanced_accuracy,
                out.display()
            );
            Ok(())
        }
        Cmd::Finetune {
            model,
            data,
            out,
            epochs,
            lr,
            layer_decay,
            weight_decay,
            label_smoothing,
            crop_scale,
            seed,
            threads,
            balanced,
            cross_validate,
            cv_only,
        } => {
            use reddino_trainer::finetune::{finetune, FinetuneConfig};
            if cv_only && !cross_validate {
                anyhow::bail!("--cv-only needs --cross-validate");
            }
            if threads > 0 {
                tch::set_num_threads(threads as i32);
            }
            let init = reddino_models::weights::VitWeights::load(&model.checkpoint)?;
            let set = LabelledSet::scan(&data)?;
            let device = reddino_trainer::train::device_from(&model.device)?;
            let defaults = FinetuneConfig::default();
            let cfg = FinetuneConfig {
                input_size: model.input_size.unwrap_or(init.config.img_size),
                epochs,
                batch_size: model.batch,
                lr,
                layer_decay,
                weight_decay,
                label_smoothing,
                augment: reddino_trainer::augment::AugmentConfig {
                    crop_scale: (crop_scale, 1.0),
                    ..defaults.augment
                },
                seed,
                balanced,
                ..defaults
            };
            if cross_validate {
                let cv =
                    reddino_trainer::finetune::cross_validate(&init, &set, &cfg, device, |f, s| {
                        log::info!(
                            "fold {}: step {}/{}: loss {:.4}",
                            f + 1,
                            s.step,
                            s.total,
                            s.loss
                        )
                    })
                    .with_context(|| format!("cross-validating on {}", data.display()))?;
                let folds = set.source_names.len();
                let dir = out.join("cv");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                std::fs::write(
                    dir.join("report.json"),
                    serde_json::to_vec_pretty(&serde_json::json!({
                        "protocol": format!("{folds}-fold by source folder, fine-tuned per fold"),
                        "class_names": set.class_names,
                        "pooled": cv.pooled,
                        "folds": cv.folds,
                        "seconds": cv.seconds,
                    }))?,
                )?;
                let md = reddino_trainer::report::cv_markdown(
                    &format!("Fine-tuning, {folds}-fold cross-validation by source folder"),
                    &set,
                    &cv.pooled,
                );
                std::fs::write(dir.join("report.md"), &md)?;
                print!("{md}");
                if cv_only {
                    return Ok(());
                }
            }
            log::info!(
                "fine-tuning ViT {}-d x {} at {} px on {device:?}: {} crops, {} classes, {} sources, {epochs} epochs of batch {}",
                init.config.embed_dim,
                init.config.depth,
                cfg.input_size,
                set.files.len(),
                set.class_names.len(),
                set.source_names.len(),
                cfg.batch_size
            );
            let bar = progress_bar(std::io::stderr().is_terminal());
            let t0 = std::time::Instant::now();
            let r = finetune(&init, &set, &cfg, device, 10, |s| {
                bar.set_length(s.total as u64);
                bar.set_position(s.step as u64);
                bar.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
                if bar.is_hidden() {
                    log::info!(
                        "step {}/{}: loss {:.4}, lr {:.2e}",
                        s.step,
                        s.total,
                        s.loss,
                        s.lr
                    );
                }
            })?;
            bar.finish_and_clear();
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            r.backbone.save(&out.join("backbone.safetensors"))?;
            std::fs::write(out.join("head.safetensors"), r.head.to_bytes()?)?;
            let summary = serde_json::json!({
                "data": data,
                "init": model.checkpoint,
                "input_size": cfg.input_size,
                "epochs": epochs,
                "batch_size": cfg.batch_size,
                "lr": lr,
                "layer_decay": layer_decay,
                "weight_decay": weight_decay,
                "label_smoothing": label_smoothing,
                "crop_scale": crop_scale,
                "seed": seed,
                "balanced": balanced,
                "first_loss": r.first_loss,
                "last_loss": r.last_loss,
                "seconds": t0.elapsed().as_secs_f64(),
                "train": r.train,
            });
            std::fs::write(
                out.join("finetune.json"),
                serde_json::to_vec_pretty(&summary)?,
            )?;
            println!(
                "fine-tuned in {:.0} s: loss {:.4} -> {:.4}, training accuracy {:.3} (balanced {:.3}) -> {}/backbone.safetensors, {}/head.safetensors",
                t0.elapsed().as_secs_f64(),
                r.first_loss,
                r.last_loss,
                r.train.accuracy,
                r.train.balanced_accuracy,
                out.display(),
                out.display()
            );
            Ok(())
        }
        Cmd::Score {
            model,
            head,
            data,
            out,
        } => {
            let bytes =
                std::fs::read(&head).with_context(|| format!("reading {}", head.display()))?;
            let head_name = head.display().to_string();
            let head = reddino_models::weights::LinearHead::from_bytes(&bytes, &head_name)?;
            let set = LabelledSet::scan(&data)?;
            let (vs, vit) = model.vit(false)?;
            head.validate(vit.config.embed_dim)?;
            let (truth, pred) = reddino_trainer::finetune::classify_set(
                &vit,
                &head,
                &set,
                vs.device(),
                model.batch,
            )?;
            let report =
                reddino_trainer::report::score_report(&set, &head.class_names, &truth, &pred);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
            reddino_trainer::report::confusion_png(&report.overall.confusion, &head.class_names)
                .save(out.join("confusion.png"))
                .context("writing confusion.png")?;
            let md = reddino_trainer::report::score_markdown(
                &format!(
                    "{} + {head_name} on {}",
                    model.checkpoint.display(),
                    data.display()
                ),
                &head.class_names,
                &report,
            );
            std::fs::write(out.join("report.md"), &md)?;
            print!("{md}");
            Ok(())
        }
        Cmd::Preset { name } => {
            print!("{}", toml::to_string_pretty(&Config::preset(&name)?)?);
            Ok(())
        }
        Cmd::SynthSmears {
            out,
            per_source,
            width,
            height,
            seed,
        } => {
            let n = reddino_trainer::synth::write_smears(&out, per_source, width, height, seed)?;
            println!("{n} fields written to {}", out.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar on a terminal; hidden otherwise (progress then goes to the log).
fn progress_bar(terminal: bool) -> indicatif::ProgressBar {
    if !terminal {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("template"),
    );
    pb
}
