//! `reddino-models`: synthetic smears, ONNX export and bundle tools (no libtorch needed).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Limits, NewBundle, SigningKey, TrustedKeys};
use reddino_models::onnx;
use reddino_models::synth::{self, CropExport, FieldSpec, SourcePreset};
use reddino_models::taxonomy::DEFAULT_CLASSES;
use reddino_models::weights::{LinearHead, VitWeights};

#[derive(Parser)]
#[command(
    name = "reddino-models",
    version,
    about = "RedDino model contract tools: synthetic smears, ONNX export, signed bundles",
    long_about = "RedDino model contract tools.\n\n\
        Render synthetic blood smears with ground truth, export labelled cell crops, turn \
        timm/DINOv2/RedDino safetensors checkpoints into ONNX, and build, sign, pack and verify \
        the model bundles that reddino-edge installs."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Synthetic smears.
    #[command(subcommand)]
    Synth(SynthCmd),
    /// Export a checkpoint to ONNX (input `pixels`, outputs `embedding` and `logits`).
    Onnx(OnnxArgs),
    /// Model bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Generate a minisign key pair for signing bundles.
    Keygen {
        /// Secret key file to write (unencrypted; keep it off devices).
        #[arg(long)]
        secret: PathBuf,
        /// Public key file to write (install it on devices as a trusted key).
        #[arg(long)]
        public: PathBuf,
    },
}

#[derive(Subcommand)]
enum SynthCmd {
    /// List the acquisition-source presets.
    Sources,
    /// Render one field to an image, with its ground truth as JSON.
    Field {
        #[arg(long, default_value = "wright_100x")]
        source: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1920)]
        width: u32,
        #[arg(long, default_value_t = 1080)]
        height: u32,
        /// Skip blur, noise, vignetting and JPEG.
        #[arg(long)]
        clean: bool,
        /// Image file to write (png, jpg, bmp, tif).
        #[arg(long)]
        out: PathBuf,
        /// Ground truth JSON to write (class, centre, box per cell).
        #[arg(long)]
        truth: Option<PathBuf>,
    },
    /// Export labelled crops: OUT/{source}/{class}/*.png.
    Crops {
        #[arg(long)]
        out: PathBuf,
        /// Crops per class and source.
        #[arg(long, default_value_t = 100)]
        per_class: usize,
        /// Comma-separated source presets (default: all).
        #[arg(long, value_delimiter = ',')]
        sources: Vec<String>,
        /// Crop side in pixels.
        #[arg(long, default_value_t = 96)]
        size: u32,
        #[command(flatten)]
        crop: reddino_models::cli::CropArgs,
        /// Fraction of cells placed touching a neighbour, for every source (default: each
        /// source's own).
        #[arg(long)]
        touching: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint (timm, DINOv2 `teacher.backbone.`, RedDino or reddino-trainer safetensors).
    #[arg(long, conflicts_with = "random")]
    weights: Option<PathBuf>,
    /// Use random weights of a preset instead (tiny, small, base, large) - for tests.
    #[arg(long)]
    random: Option<String>,
    /// Linear head (safetensors with class names) for `logits`.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Input side (multiple of 14); the position embedding is resampled. Default: the checkpoint's.
    #[arg(long)]
    input_size: Option<usize>,
}

impl ModelArgs {
    fn load(&self) -> Result<(VitWeights, Option<LinearHead>)> {
        let mut w = match (&self.weights, &self.random) {
            (Some(p), None) => VitWeights::load(p)?,
            (None, Some(preset)) => {
                let cfg =
                    VitConfig::preset(Preset::parse(preset)?, self.input_size.unwrap_or(224))?;
                VitWeights::random(&cfg, 0, 1e-5)?
            }
            _ => bail!("give --weights FILE or --random PRESET"),
        };
        if let Some(s) = self.input_size {
            w.resize_input(s)?;
        }
        let head = match &self.head {
            Some(p) => {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                Some(LinearHead::from_bytes(&bytes, &p.display().to_string())?)
            }
            None => None,
        };
        Ok((w, head))
    }
}

#[derive(Args)]
struct OnnxArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Build a signed bundle directory from a checkpoint (and head).
    Build {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "0.1.0")]
        version: String,
        #[arg(long, default_value = "")]
        description: String,
        /// minisign secret key.
        #[arg(long)]
        key: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Also write OUT.tar.
        #[arg(long)]
        tar: bool,
    },
    /// Re-sign a bundle directory's manifest.
    Sign {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Pack a bundle directory into a tar.
    Pack { dir: PathBuf, out: PathBuf },
    /// Verify a bundle directory or tar against trusted public keys.
    Verify {
        path: PathBuf,
        /// Trusted minisign public key file(s).
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
        /// Also run the self-test with tract.
        #[arg(long)]
        self_test: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Synth(SynthCmd::Sources) => {
            for p in SourcePreset::all() {
                println!(
                    "{:<12} stain {:<20} RBC radius {:>4.1}-{:<4.1} px  blur {:.1}-{:.1}  noise {:.0}  jpeg {}",
                    p.name,
                    format!("{:?}", p.stain),
                    p.rbc_radius.0,
                    p.rbc_radius.1,
                    p.blur_sigma.0,
                    p.blur_sigma.1,
                    p.noise,
                    p.jpeg_quality.map(|q| q.to_string()).unwrap_or_else(|| "-".into())
                );
            }
        }
        Cmd::Synth(SynthCmd::Field {
            source,
            seed,
            width,
            height,
            clean,
            out,
            truth,
        }) => {
            let mut spec = FieldSpec::new(width, height, seed, SourcePreset::by_name(&source)?);
            spec.artifacts = !clean;
            let t = Instant::now();
            let field = synth::render(&spec)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            field
                .image
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            if let Some(tp) = truth {
                let cells: Vec<_> = field
                    .cells
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "class": DEFAULT_CLASSES[c.class],
                            "class_id": c.class,
                            "center": [c.center.0, c.center.1],
                            "bbox": c.bbox,
                            "radius": c.radius,
                        })
                    })
                    .collect();
                let doc = serde_json::json!({"source": field.source, "seed": seed, "width": width, "height": height, "cells": cells});
                std::fs::write(&tp, serde_json::to_vec_pretty(&doc)?)
                    .with_context(|| format!("writing {}", tp.display()))?;
            }
            println!(
                "{}: {} cells, rendered in {ms:.0} ms",
                out.display(),
                field.cells.len()
            );
        }
        Cmd::Synth(SynthCmd::Crops {
            out,
            per_class,
            sources,
            size,
            crop,
            touching,
            seed,
        }) => {
            let mut cfg = CropExport::new(out.clone(), per_class, seed);
            cfg.crop = crop.policy();
            cfg.touching = touching;
            if !sources.is_empty() {
                cfg.sources = sources
                    .iter()
                    .map(|s| SourcePreset::by_name(s))
                    .collect::<Result<_, _>>()?;
            }
            cfg.size = size;
            let mut last = String::new();
            let summary = synth::export_crops(&cfg, |src, done, total| {
                if src != last {
                    eprintln!();
                    last = src.to_string();
                }
                eprint!("\r{src}: {done}/{total} crops");
            })?;
            eprintln!();
            print!("{}", summary.report(&cfg));
            println!(
                "{} fields rendered; crops in {}",
                summary.fields,
                out.display()
            );
        }
        Cmd::Onnx(args) => {
            let (w, head) = args.model.load()?;
            let bytes = onnx::export(&w, head.as_ref())?;
            std::fs::write(&args.out, &bytes)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!(
                "{}: ViT {}x{} ({} blocks), input {}x{}, {} MB",
                args.out.display(),
                w.config.embed_dim,
                w.config.num_heads,
                w.config.depth,
                w.config.img_size,
                w.config.img_size,
                bytes.len() / 1_000_000
            );
        }
        Cmd::Keygen { secret, public } => {
            if secret.exists() {
                bail!(
                    "{} exists; refusing to overwrite a secret key",
                    secret.display()
                );
            }
            let key = SigningKey::generate()?;
            // Readable by its owner only, from the moment it exists (never written first and
            // restricted after).
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&secret)
                    .with_context(|| format!("creating {}", secret.display()))?;
                f.write_all(
                    key.secret_key_file("reddino bundle signing key")?
                        .as_bytes(),
                )
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", secret.display()))?;
            }
            std::fs::write(&public, key.public_key_file()?)
                .with_context(|| format!("writing {}", public.display()))?;
            println!(
                "secret key: {} (keep it secret)\npublic key: {}",
                secret.display(),
                public.display()
            );
        }
        Cmd::Bundle(BundleCmd::Build {
            model,
            name,
            version,
            description,
            key,
            out,
            tar,
        }) => {
            let (w, head) = model.load()?;
            let key = SigningKey::from_file(&key, None)?;
            let m = bundle::write_dir(
                &NewBundle::new(name, version, description, &w, head.as_ref()),
                &out,
                &key,
            )?;
            println!(
                "{}: {} {} ({} classes)",
                out.display(),
                m.name,
                m.version,
                m.class_names.len()
            );
            if tar {
                let t = out.with_extension("tar");
                bundle::pack(&out, &t)?;
                println!("{}", t.display());
            }
        }
        Cmd::Bundle(BundleCmd::Sign { dir, key }) => {
            bundle::sign_dir(&dir, &SigningKey::from_file(&key, None)?)?;
            println!("signed {}", dir.display());
        }
        Cmd::Bundle(BundleCmd::Pack { dir, out }) => {
            bundle::pack(&dir, &out)?;
            println!("{}", out.display());
        }
        Cmd::Bundle(BundleCmd::Verify {
            path,
            trusted_keys,
            self_test,
        }) => {
            let mut trusted = TrustedKeys::new();
            for k in &trusted_keys {
                trusted.add_file(k)?;
            }
            let b = bundle::open(&path, &trusted, &Limits::default())?;
            let m = b.manifest();
            println!(
                "OK {}: {} {} - ViT {} d, {} blocks, input {}, {} classes",
                path.display(),
                m.name,
                m.version,
                m.embed_dim,
                m.arch.depth,
                m.input_size,
                m.class_names.len()
            );
            if self_test {
                let d = b.self_test()?;
                println!("self-test passed (max difference {d:.2e})");
            }
        }
    }
    Ok(())
}
