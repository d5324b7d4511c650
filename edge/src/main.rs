//! `reddino-edge` command line: parses the arguments, calls the command's one library
//! function, and turns its error into the exit status (2: fix the config or arguments; 1:
//! anything else).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use reddino_edge::model::store;
use reddino_edge::offline::{analyze, demo, import, quality, synth_crops};

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
    Demo(demo::DemoOptions),
    /// Cell-finder quality against labelled cells: recall (interior and border apart),
    /// cell-sized detections per label on densely labelled fields, merged cells, ms per field.
    /// On a point-labelled data set (DIR/images, DIR/labels: `x y class` per line), on the
    /// synthetic sources, or both.
    FinderQuality(quality::QualityArgs),
    /// Write labelled training crops cut by this service's own cell finder from synthetic
    /// fields: OUT/{source}/{class}/*.png (each detection labelled by the true cell it lands on).
    SynthCrops(synth_crops::SynthCropsArgs),
    /// Import a labelled data set as training crops cut by this device's own cell finder:
    /// OUT/{split or fold}/{class}/{field}_{n}.png, OUT/crops.csv, OUT/summary.json; prints
    /// what was imported and what was dropped, and why. Exactly one of --points, --voc,
    /// --coco or --crops.
    Import(import::ImportArgs),
    /// Analyse image files offline: one JSON object per image with counts and cells.
    Analyze(analyze::AnalyzeArgs),
    /// Installed model versions: install (verified first), list, activate, rollback, verify,
    /// remove. `run` serves the active one.
    Model(store::ModelArgs),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,tract_linalg=warn,rumqttd=off,tracing=off"),
    )
    .init();
    reddino_edge::memory::reuse_frame_buffers();
    let result = match Cli::parse().cmd {
        Cmd::Run { config } => reddino_edge::app::command(&config),
        Cmd::Demo(o) => demo::command(&o),
        Cmd::FinderQuality(o) => quality::command(&o),
        Cmd::SynthCrops(o) => synth_crops::command(&o),
        Cmd::Import(o) => import::command(&o),
        Cmd::Analyze(o) => analyze::command(&o),
        Cmd::Model(o) => store::command(&o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
