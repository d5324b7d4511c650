//! `reddino-trainer embed`.

use std::path::PathBuf;

use crate::error::Result;

use super::ModelArgs;

/// Write CLS features (after the final norm) of a folder of labelled crops
/// ({class}/image or {source}/{class}/image) to FILE.safetensors (+ FILE.json with names).
#[derive(clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `reddino-trainer embed`.
pub fn run(args: EmbedArgs) -> Result<()> {
    let EmbedArgs { model, out } = args;
    let (set, f) = model.features()?;
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
