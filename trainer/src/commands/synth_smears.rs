//! `reddino-trainer synth-smears`.

use std::path::PathBuf;

use crate::error::Result;

/// Write synthetic smear fields (PNG) to try pretraining without real data.
#[derive(clap::Args)]
pub struct SynthSmearsArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Fields per acquisition source.
    #[arg(long, default_value_t = 4)]
    pub per_source: usize,
    #[arg(long, default_value_t = 896)]
    pub width: u32,
    #[arg(long, default_value_t = 672)]
    pub height: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `reddino-trainer synth-smears`.
pub fn run(args: SynthSmearsArgs) -> Result<()> {
    let SynthSmearsArgs {
        out,
        per_source,
        width,
        height,
        seed,
    } = args;
    let n = crate::synth::write_smears(&out, per_source, width, height, seed)?;
    println!("{n} fields written to {}", out.display());
    Ok(())
}
