//! `reddino-trainer eval`.

use std::path::PathBuf;

use crate::bail;
use crate::error::{Context, Result};

use super::{FeatureKind, ModelArgs};

/// Evaluate frozen features with the linear probe and kNN (k = 1, 20) under a fixed split,
/// stratified 5-fold CV and leave-one-source-out; writes report.json and report.md.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Report folder.
    #[arg(long)]
    pub out: PathBuf,
    /// kNN with cosine similarity and temperature-weighted votes instead of Euclidean.
    #[arg(long)]
    pub cosine: bool,
    /// Features to probe: the checkpoint's, or a baseline (same architecture randomly
    /// initialised, or raw pixels at the input size).
    #[arg(long, value_enum, default_value = "model")]
    pub features: FeatureKind,
    /// Leave-one-source-out only (skips the split and 5-fold protocols).
    #[arg(long)]
    pub loso_only: bool,
}

/// Runs `reddino-trainer eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        model,
        out,
        cosine,
        features,
        loso_only,
    } = args;
    use crate::report::{evaluate, markdown, Protocol};
    let (set, f) = model.features_of(features)?;
    let knn = if cosine {
        crate::eval::Knn::Cosine { temperature: 0.07 }
    } else {
        crate::eval::Knn::Euclidean
    };
    if loso_only && set.source_names.len() < 2 {
        bail!(
            "--loso-only needs crops from two or more sources ({{source}}/{{class}}/image); {} has one",
            model.data.display()
        );
    }
    let mut reports = Vec::new();
    if !loso_only {
        reports.push(evaluate(&f, &set, &Protocol::REDDINO_SPLIT, knn)?);
        reports.push(evaluate(&f, &set, &Protocol::REDDINO_KFOLD, knn)?);
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
    md += &crate::report::write_plots(&out, &f, &set, &reports[0])?;
    std::fs::write(out.join("report.md"), &md)?;
    print!("{md}");
    Ok(())
}
