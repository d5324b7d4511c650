//! `reddino-trainer score`.

use std::path::PathBuf;

use crate::error::{Context, Result};

use super::ModelArgs;
use crate::labelled::LabelledSet;

/// Score a backbone + linear head on labelled crops: accuracy, balanced accuracy, F1 and
/// the confusion matrix, overall and per source; writes report.json, report.md and
/// confusion.png.
#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Linear head safetensors (its class names must include every class of the data).
    #[arg(long)]
    pub head: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Average each crop's logits over this many turned and mirrored copies (1, 4 or 8), as a
    /// model exported with `export --test-time-views` does.
    #[arg(long, default_value_t = 1)]
    pub test_time_views: usize,
}

/// Runs `reddino-trainer score`.
pub fn run(args: ScoreArgs) -> Result<()> {
    let ScoreArgs {
        model,
        head,
        out,
        test_time_views,
    } = args;
    let data = model.data.clone();
    let bytes = std::fs::read(&head).with_context(|| format!("reading {}", head.display()))?;
    let head_name = head.display().to_string();
    let head = reddino_models::weights::LinearHead::from_bytes(&bytes, &head_name)?;
    let set = LabelledSet::scan(&data)?;
    let (vs, vit) = model.vit(false)?;
    head.validate(vit.config.embed_dim)?;
    let (truth, pred) = crate::finetune::classify_set(
        &vit,
        &head,
        &set,
        vs.device(),
        model.batch,
        test_time_views,
    )?;
    let report = crate::report::score_report(&set, &head.class_names, &truth, &pred);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    crate::report::confusion_png(&report.overall.confusion, &head.class_names)?
        .save(out.join("confusion.png"))
        .context("writing confusion.png")?;
    let md = crate::report::score_markdown(
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
