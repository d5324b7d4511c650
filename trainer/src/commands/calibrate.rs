//! `reddino-trainer calibrate`.

use std::path::PathBuf;

use crate::bail;
use crate::calibrate::{calibrate, read_cv_logits};
use crate::error::{Context, Result};
use reddino_models::weights::LinearHead;

/// Fit the temperature that gives the cross-validation's out-of-fold logits (`finetune
/// --cross-validate`'s cv/logits.csv) the lowest log loss, and write the head with its logits
/// divided by it: the same class for every crop, a top probability that says how often it is
/// right (what the edge's `min_confidence` compares). Writes OUT and OUT's calibration.json.
#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The out-of-fold logits: cv/logits.csv of `finetune --cross-validate`.
    #[arg(long)]
    pub logits: PathBuf,
    /// The head to calibrate (head.safetensors of the same `finetune` run).
    #[arg(long)]
    pub head: PathBuf,
    /// Average each crop's logits over this many views first, as the exported model does
    /// (`export --test-time-views`): 1, 4 or 8.
    #[arg(long, default_value_t = 1)]
    pub test_time_views: usize,
    /// The calibrated head (safetensors); calibration.json is written beside it.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `reddino-trainer calibrate`.
pub fn run(args: CalibrateArgs) -> Result<()> {
    reddino_models::onnx::check_views(args.test_time_views)?;
    let bytes =
        std::fs::read(&args.head).with_context(|| format!("reading {}", args.head.display()))?;
    let head = LinearHead::from_bytes(&bytes, &args.head.display().to_string())?;
    let set = read_cv_logits(&args.logits, args.test_time_views)?;
    if set.class_names != head.class_names {
        bail!(
            "{} holds the logits of classes {:?}, {} is a head over {:?}: not the same run",
            args.logits.display(),
            set.class_names,
            args.head.display(),
            head.class_names
        );
    }
    let c = calibrate(&set)?;
    log::info!(
        "temperature {:.4} on {} crops: log loss {:.4} -> {:.4}, calibration error {:.4} -> {:.4}, top probability under 0.5 for {:.1}% -> {:.1}% of the crops (accuracy {:.3}, unchanged)",
        c.temperature,
        c.crops,
        c.log_loss[0],
        c.log_loss[1],
        c.calibration_error[0],
        c.calibration_error[1],
        100.0 * c.under_half[0],
        100.0 * c.under_half[1],
        c.accuracy
    );
    let calibrated = head.scaled((1.0 / c.temperature) as f32);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, calibrated.to_bytes()?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let report = args.out.with_file_name("calibration.json");
    std::fs::write(
        &report,
        serde_json::to_vec_pretty(&serde_json::json!({
            "logits": args.logits,
            "head": args.head,
            "test_time_views": args.test_time_views,
            "calibration": c,
        }))?,
    )
    .with_context(|| format!("writing {}", report.display()))?;
    println!(
        "temperature {:.4}: {} and {}",
        c.temperature,
        args.out.display(),
        report.display()
    );
    Ok(())
}
