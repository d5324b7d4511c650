//! `reddino-trainer` command line: parses the arguments and calls the command's one library
//! function (`reddino_trainer::commands`); an error is printed once and exits 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use reddino_trainer::commands;

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
    Pretrain(commands::pretrain::PretrainArgs),
    /// Export a backbone (+ optional linear head) to a signed bundle for reddino-edge; the ONNX
    /// is checked against the tch model (max difference 1e-4) before anything is written.
    Export(commands::export::ExportArgs),
    /// Write CLS features (after the final norm) of a folder of labelled crops
    /// ({class}/image or {source}/{class}/image) to FILE.safetensors (+ FILE.json with names).
    Embed(commands::embed::EmbedArgs),
    /// Evaluate frozen features with the linear probe and kNN (k = 1, 20) under a fixed split,
    /// stratified 5-fold CV and leave-one-source-out; writes report.json and report.md.
    Eval(commands::eval::EvalArgs),
    /// Fine-tune a backbone with a new linear head on labelled crops (cross-entropy, AdamW
    /// with layer-wise lr decay, RedDino's pixel augmentations); writes backbone.safetensors
    /// and head.safetensors for `export`.
    Finetune(commands::finetune::FinetuneArgs),
    /// Score a backbone + linear head on labelled crops: accuracy, balanced accuracy, F1 and
    /// the confusion matrix, overall and per source; writes report.json, report.md and
    /// confusion.png.
    Score(commands::score::ScoreArgs),
    /// Fit the temperature that gives the cross-validation's out-of-fold logits the lowest log
    /// loss and write the head with its logits divided by it (the same classes, a top
    /// probability that says how often it is right).
    Calibrate(commands::calibrate::CalibrateArgs),
    /// Train the linear head the edge uses (multinomial logistic regression on the CLS
    /// features of all crops) and write it with its class names; `export --head` takes it.
    Probe(commands::probe::ProbeArgs),
    /// Print a preset (s, b, l, tiny) as a complete TOML config.
    Preset(commands::preset::PresetArgs),
    /// Write synthetic smear fields (PNG) to try pretraining without real data.
    SynthSmears(commands::synth_smears::SynthSmearsArgs),
}

fn main() -> ExitCode {
    // Before any thread starts: libtorch's workers inherit the mode. REDDINO_KEEP_SUBNORMALS=1
    // keeps the CPU's default (to measure what the flush saves, docs/benchmarks.md).
    if std::env::var_os("REDDINO_KEEP_SUBNORMALS").is_none_or(|v| v != "1") {
        reddino_trainer::cpu::flush_subnormals();
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = match Cli::parse().cmd {
        Cmd::Pretrain(a) => commands::pretrain::run(a),
        Cmd::Export(a) => commands::export::run(a),
        Cmd::Embed(a) => commands::embed::run(a),
        Cmd::Eval(a) => commands::eval::run(a),
        Cmd::Finetune(a) => commands::finetune::run(a),
        Cmd::Score(a) => commands::score::run(a),
        Cmd::Calibrate(a) => commands::calibrate::run(a),
        Cmd::Probe(a) => commands::probe::run(a),
        Cmd::Preset(a) => commands::preset::run(a),
        Cmd::SynthSmears(a) => commands::synth_smears::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
