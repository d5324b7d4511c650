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
        /// L2 weight (objective: mean cross-entropy + l2/2 |W|^2); default 100 / (dim x classes).
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
        let w = reddino_models::weights::VitWeights::load(&self.checkpoint)?;
        let size = self.input_size.unwrap_or(w.config.img_size);
        let device = reddino_trainer::train::device_from(&self.device)?;
        let vs = tch::nn::VarStore::new(device);
        let vit = reddino_trainer::vit::Vit::from_weights(&vs.root(), &w, size)?;
        let set = LabelledSet::scan(data)?;
        log::info!(
            "{} images, {} classes, {} sources; ViT {}-d at {size} px on {device:?}",
            set.files.len(),
            set.class_names.len(),
            set.source_names.len(),
            w.config.embed_dim
        );
        let f = set.embed(&vit, device, self.batch)?;
        Ok((set, f))
    }
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
        } => {
            use reddino_trainer::report::{evaluate, markdown, Protocol};
            let (set, f) = model.features(&data)?;
            let knn = if cosine {
                reddino_trainer::eval::Knn::Cosine { temperature: 0.07 }
            } else {
                reddino_trainer::eval::Knn::Euclidean
            };
            let mut reports = vec![
                evaluate(&f, &set, &Protocol::Split { test_every: 5 }, knn)?,
                evaluate(&f, &set, &Protocol::KFold { k: 5, seed: 0 }, knn)?,
            ];
            if set.source_names.len() > 1 {
                reports.push(evaluate(&f, &set, &Protocol::LeaveOneSourceOut, knn)?);
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(
                out.join("report.json"),
                serde_json::to_vec_pretty(&reports)?,
            )?;
            let mut md = markdown(
                &format!("Evaluation of {}", model.checkpoint.display()),
                &set,
                &reports,
            );
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
            let l2 = l2.unwrap_or_else(|| default_l2(f.size()[1] as usize, classes));
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
