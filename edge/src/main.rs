//! `reddino-edge` command line.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use reddino_edge::config::Config;
use reddino_edge::infer::{Backend, TractBackend};
use reddino_edge::model::{model_or_shipped, open_bundle, Shipped};
use reddino_edge::offline::analyze::{analyze_image, AnalyzeConfig};
use reddino_models::cli::CropArgs;

#[derive(Parser)]
#[command(
    name = "reddino-edge",
    version,
    about = "RedDino Edge: finds, classifies and counts blood cells in microscope images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service from a TOML config until the source ends or SIGTERM/SIGINT.
    Run {
        /// Config file (see docs/edge.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// The whole service on embedded defaults: in-process broker, synthetic microscope,
    /// a demo bundle, a live view and a summary.
    Demo(reddino_edge::offline::demo::DemoOptions),
    /// Cell-finder quality against labelled cells: recall (interior and border apart),
    /// cell-sized detections per label on densely labelled fields, merged cells, ms per field.
    /// On a point-labelled data set (DIR/images, DIR/labels: `x y class` per line), on the
    /// synthetic sources, or both.
    FinderQuality {
        /// A point-labelled data set (e.g. Chula RBC-12).
        #[arg(long)]
        points: Option<PathBuf>,
        /// Which of its fields: the development fields, the held-out ones, or all.
        #[arg(long, value_enum, default_value = "dev")]
        fields: reddino_edge::offline::quality::Fields,
        /// Class ids in the data set (labels with a larger id are refused).
        #[arg(long, default_value_t = 13)]
        classes: usize,
        /// Rescale each field by these factors (simulated magnifications), comma-separated.
        #[arg(long, default_value = "1")]
        scales: String,
        /// Synthetic fields per acquisition source (0 = none).
        #[arg(long, default_value_t = 0)]
        synthetic: u64,
        /// Finder profile: `real-smear` or `default` (the synthetic microscope's).
        #[arg(long, default_value = "real-smear")]
        profile: String,
        /// Finder settings over the profile's (`CellFinderConfig` fields in TOML, e.g.
        /// 'split_necks = 0').
        #[arg(long)]
        settings: Option<String>,
        /// Also print one line per field.
        #[arg(long)]
        per_field: bool,
        /// Print the summaries as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Write each scored field with its detections and labels drawn into this folder.
        #[arg(long)]
        overlays: Option<PathBuf>,
    },
    /// Write labelled training crops cut by this service's own cell finder from synthetic
    /// fields: OUT/{source}/{class}/*.png (each detection labelled by the true cell it lands on).
    SynthCrops {
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated acquisition-source presets (`reddino-models synth sources`).
        #[arg(long)]
        sources: String,
        /// Crops per class and source.
        #[arg(long, default_value_t = 100)]
        per_class: usize,
        /// Side of the saved crops in pixels.
        #[arg(long, default_value_t = 96)]
        size: u32,
        #[command(flatten)]
        crop: CropArgs,
        /// Fraction of cells placed touching a neighbour, for every source (default: each
        /// source's own).
        #[arg(long)]
        touching: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Import a labelled data set as training crops cut by this device's own cell finder:
    /// OUT/{split or fold}/{class}/{field}_{n}.png, OUT/crops.csv, OUT/summary.json; prints
    /// what was imported and what was dropped, and why. Exactly one of --points, --voc,
    /// --coco or --crops.
    Import {
        /// Point labels: DIR/images, DIR/labels/*.txt (`x y class` per line, Chula RBC-12).
        #[arg(long)]
        points: Option<PathBuf>,
        /// Pascal VOC boxes: DIR/Annotations/*.xml, DIR/JPEGImages.
        #[arg(long)]
        voc: Option<PathBuf>,
        /// COCO boxes: a JSON file; images in --images (default: the file's folder).
        #[arg(long)]
        coco: Option<PathBuf>,
        /// Folder of a COCO file's images.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Crops already cut, in class folders: DIR/{class}/*.png.
        #[arg(long)]
        crops: Option<PathBuf>,
        /// With --crops: a crop's field is its file name up to the last SEP (crops of one
        /// field then stay on one side of the split); default: each crop its own field.
        #[arg(long)]
        field_sep: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Class names of point labels, one per line (line i names id i); default:
        /// DIR/classes.txt, else the Chula RBC-12 names for 13 ids.
        #[arg(long)]
        class_names: Option<PathBuf>,
        /// Class mapping, `from = to` per line (`to` = `-` drops the class); a class it does
        /// not name is refused.
        #[arg(long)]
        class_map: Option<PathBuf>,
        /// Which fields: the development fields, the held-out ones (split by name), or all.
        #[arg(long, value_enum, default_value = "all")]
        fields: reddino_edge::offline::quality::Fields,
        /// K folds by field (fold0..) instead of train/val/test.
        #[arg(long)]
        folds: Option<u32>,
        /// Finder profile: `real-smear` or `default` (the synthetic microscope's).
        #[arg(long, default_value = "real-smear")]
        profile: String,
        /// Finder settings over the profile's (`CellFinderConfig` fields in TOML).
        #[arg(long)]
        settings: Option<String>,
        #[command(flatten)]
        crop: CropArgs,
        /// Also write the detections that hold no label here (for self-supervised pretraining).
        #[arg(long)]
        unlabelled: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Analyse image files offline: one JSON object per image with counts and cells.
    Analyze {
        /// Model bundle (directory or .tar) with a classification head; default: a shipped
        /// model (--shipped).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Without --model: `chula` (real smears, Chula RBC-12's classes, 1000x) or `demo`
        /// (the synthetic microscope's smears).
        #[arg(long, value_enum, default_value = "chula")]
        shipped: Shipped,
        /// Trusted minisign public key(s) for the bundle signature.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        /// Print one JSON object per line (default: a short summary per image).
        #[arg(long)]
        json: bool,
        /// Images per inference call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Threads for the model's matrix products (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Below this top probability a cell counts as `uncertain`.
        #[arg(long, default_value_t = 0.5)]
        min_confidence: f32,
        /// Image files (png, jpg, bmp, tif).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
}

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,tract_linalg=warn,rumqttd=off,tracing=off"),
    )
    .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let report = reddino_edge::app::run(&cfg, stop)?;
            let f = &report.snapshot.frames;
            log::info!(
                "stopped: {} frames analysed, {} cells, {} dropped, {} bad; {} results acknowledged, {} left in the outbox",
                f.processed,
                f.cells,
                f.dropped,
                f.bad,
                report.publisher.acked,
                report.publisher.left_in_outbox
            );
        }
        Cmd::SynthCrops {
            out,
            sources,
            per_class,
            size,
            crop,
            touching,
            seed,
        } => {
            let mut cfg = reddino_models::synth::CropExport::new(out.clone(), per_class, seed);
            cfg.crop = crop.policy();
            cfg.touching = touching;
            cfg.sources = sources
                .split(',')
                .map(|s| reddino_models::synth::SourcePreset::by_name(s.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            cfg.size = size;
            let summary = reddino_edge::offline::synth_crops::write_detected_crops(
                &cfg,
                &reddino_edge::cells::CellFinderConfig::default(),
                |src, done, total| eprint!("\r{src}: {done}/{total} crops"),
            )?;
            eprintln!();
            for (src, counts) in &summary.counts {
                println!("{src}: {} crops", counts.iter().sum::<usize>());
            }
            for (src, m) in &summary.median_side {
                println!(
                    "{src}: median cell {m:.1} px, crops at least {:.0} px",
                    cfg.min_crop_side(*m)
                );
            }
            println!("crops in {}", out.display());
        }
        Cmd::Import {
            points,
            voc,
            coco,
            images,
            crops,
            field_sep,
            out,
            class_names,
            class_map,
            fields,
            folds,
            profile,
            settings,
            crop,
            unlabelled,
            json,
        } => {
            use reddino_edge::offline::{import, labelled};
            let given = [
                points.is_some(),
                voc.is_some(),
                coco.is_some(),
                crops.is_some(),
            ];
            if given.iter().filter(|&&g| g).count() != 1 {
                bail!("give exactly one of --points, --voc, --coco or --crops");
            }
            let finder = reddino_edge::cells::CellFinderConfig::profile(&profile)
                .map_err(anyhow::Error::msg)?;
            let mut cfg = import::ImportConfig::new(out);
            cfg.finder = match settings {
                Some(s) => finder.with_settings(&s).context("finder settings")?,
                None => finder,
            };
            cfg.crop = crop.policy();
            cfg.unlabelled = unlabelled;
            cfg.scheme = match folds {
                Some(k) if k >= 2 => import::Scheme::Folds(k),
                Some(k) => bail!("--folds {k}: need 2 or more"),
                None => import::Scheme::TrainValTest,
            };
            cfg.class_map = class_map
                .as_deref()
                .map(labelled::ClassMap::read)
                .transpose()?;
            let progress = |d: usize, n: usize| eprint!("\rimporting: {d}/{n}");
            let summary = if let Some(dir) = &crops {
                let all = labelled::read_crop_folders(dir, field_sep.as_deref())?;
                let all: Vec<_> = all.into_iter().filter(|c| fields.holds(&c.1)).collect();
                import::import_crops(&all, &cfg, progress)?
            } else {
                let set = if let Some(dir) = &points {
                    let names_file = class_names
                        .or_else(|| Some(dir.join("classes.txt")).filter(|p| p.is_file()));
                    let names = match names_file {
                        Some(f) => labelled::read_class_names(&f)?,
                        None => labelled::CHULA_CLASSES
                            .iter()
                            .map(|s| s.to_string())
                            .collect(),
                    };
                    cfg.class_order = names.clone();
                    labelled::read_point_set(dir, &names)?
                } else if let Some(dir) = &voc {
                    labelled::read_voc(dir)?
                } else {
                    let file = coco.as_deref().expect("one given");
                    let dir = images.unwrap_or_else(|| {
                        file.parent().map(|p| p.to_path_buf()).unwrap_or_default()
                    });
                    labelled::read_coco(file, &dir)?
                };
                let set: Vec<_> = set.into_iter().filter(|f| fields.holds(&f.name)).collect();
                eprintln!("{} labelled fields checked", set.len());
                import::import_fields(&set, &cfg, progress)?
            };
            eprintln!();
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{}", summary.report());
                println!("crops in {}", cfg.out.display());
            }
        }
        Cmd::FinderQuality {
            points,
            fields,
            classes,
            scales,
            synthetic,
            profile,
            settings,
            per_field,
            json,
            overlays,
        } => {
            use reddino_edge::offline::quality::{self, Summary};
            let cfg = reddino_edge::cells::CellFinderConfig::profile(&profile)
                .map_err(anyhow::Error::msg)?;
            let cfg = match settings {
                Some(s) => cfg.with_settings(&s).context("finder settings")?,
                None => cfg,
            };
            let scales = scales
                .split(',')
                .map(|s| s.trim().parse::<f32>())
                .collect::<Result<Vec<_>, _>>()
                .context("--scales: comma-separated numbers")?;
            if let Some(o) = &overlays {
                std::fs::create_dir_all(o).with_context(|| format!("creating {}", o.display()))?;
            }
            if points.is_none() && synthetic == 0 {
                bail!("nothing to score: give --points DIR and/or --synthetic N");
            }
            let mut rows: Vec<(String, Summary, Vec<quality::FieldScore>)> = Vec::new();
            if let Some(dir) = &points {
                for &scale in &scales {
                    if !(scale > 0.0 && scale <= 8.0) {
                        bail!("--scales: {scale} is not in (0, 8]");
                    }
                    let scores = quality::score_point_set(
                        dir,
                        fields,
                        scale,
                        classes,
                        &cfg,
                        overlays.as_deref(),
                        |d, n| eprint!("\rscale {scale}: {d}/{n} fields"),
                    )?;
                    eprintln!();
                    let name = format!("{} x{scale}", dir.display());
                    rows.push((name, Summary::of(&scores), scores));
                }
            }
            let synthetic = match synthetic {
                0 => vec![],
                n => quality::score_synthetic(n, &cfg),
            };
            for (source, scores) in synthetic {
                rows.push((source, Summary::of(&scores), scores));
            }
            if !json {
                println!("{}", Summary::HEADER);
            }
            for (name, summary, scores) in &rows {
                if json {
                    println!("{}", serde_json::json!({ "set": name, "summary": summary }));
                } else {
                    println!("{}", summary.row(name));
                }
                if per_field {
                    for s in scores {
                        println!("{}", serde_json::to_string(s)?);
                    }
                }
            }
        }
        Cmd::Demo(opts) => {
            let summary = reddino_edge::offline::demo::run(&opts)?;
            print!("{}", summary.render());
            if !summary.complete() {
                bail!("not every result reached the subscriber");
            }
        }
        Cmd::Analyze {
            model,
            shipped,
            trusted_keys,
            json,
            batch,
            threads,
            min_confidence,
            images,
        } => {
            // Without --model: a shipped model, unpacked into a private folder.
            let staging = tempfile::tempdir().context("creating a temporary folder")?;
            let (model, trusted_keys) =
                model_or_shipped(model, trusted_keys, shipped, staging.path())?;
            let b = open_bundle(&model, &trusted_keys)?;
            let mut backend = TractBackend::from_bundle(&b, batch.max(1), threads)?;
            log::info!(
                "model {} {}: {}",
                b.manifest().name,
                b.manifest().version,
                backend.describe()
            );
            let cfg = AnalyzeConfig {
                min_confidence,
                crop: b
                    .manifest()
                    .crop_policy(reddino_models::preprocess::CropPolicy::DEFAULT_MARGIN),
                cells: reddino_edge::cells::CellFinderConfig::for_model(b.manifest())
                    .map_err(anyhow::Error::msg)?,
            };
            let mut failed = 0;
            for path in &images {
                let img = match image::open(path) {
                    Ok(i) => i.to_rgb8(),
                    Err(e) => {
                        eprintln!("error: {}: cannot decode image: {e}", path.display());
                        failed += 1;
                        continue;
                    }
                };
                let report = analyze_image(
                    &path.display().to_string(),
                    &img,
                    &mut backend as &mut dyn Backend,
                    &b.manifest().class_names,
                    &b.manifest().normalization(),
                    &cfg,
                )
                .with_context(|| format!("analysing {}", path.display()))?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    let total: u64 = report.counts.values().sum();
                    let mut parts: Vec<String> = report
                        .counts
                        .iter()
                        .filter(|(_, n)| **n > 0)
                        .map(|(c, n)| format!("{c} {n}"))
                        .collect();
                    parts.sort();
                    println!("{}: {total} cells - {}", report.image, parts.join(", "));
                }
            }
            if failed > 0 {
                bail!("{failed} of {} images could not be read", images.len());
            }
        }
    }
    Ok(())
}
