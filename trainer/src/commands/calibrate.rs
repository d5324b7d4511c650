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

#[cfg(test)]
mod tests {
    use super::*;
    use reddino_models::weights::Tensor;

    fn head(names: &[&str]) -> LinearHead {
        let n = names.len();
        LinearHead {
            class_names: names.iter().map(|s| s.to_string()).collect(),
            weight: Tensor::new(vec![n, 4], vec![0.5; n * 4]),
            bias: Tensor::new(vec![n], vec![0.25; n]),
            size: None,
        }
    }

    #[test]
    fn a_head_of_other_classes_is_refused_and_the_right_one_is_divided_by_the_temperature() {
        let dir = tempfile::tempdir().unwrap();
        let logits = dir.path().join("logits.csv");
        std::fs::write(
            &logits,
            "file,fold,truth,view,a,b\nx/1,0,1,0,1.0,3.0\nx/2,0,0,0,2.0,0.0\nx/3,1,1,0,1.0,0.0\n",
        )
        .unwrap();
        let args = |h: &str| CalibrateArgs {
            logits: logits.clone(),
            head: dir.path().join(h),
            test_time_views: 1,
            out: dir.path().join("cal/head.safetensors"),
        };
        let write = |name: &str, h: LinearHead| {
            std::fs::write(dir.path().join(name), h.to_bytes().unwrap()).unwrap()
        };
        write("other.safetensors", head(&["a", "c"]));
        let err = run(args("other.safetensors")).unwrap_err().to_string();
        assert!(err.contains("not the same run"), "{err}");
        assert!(!dir.path().join("cal").exists(), "nothing written");

        write("head.safetensors", head(&["a", "b"]));
        run(args("head.safetensors")).unwrap();
        let bytes = std::fs::read(dir.path().join("cal/head.safetensors")).unwrap();
        let cal = LinearHead::from_bytes(&bytes, "cal").unwrap();
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("cal/calibration.json")).unwrap(),
        )
        .unwrap();
        let t = report["calibration"]["temperature"].as_f64().unwrap();
        assert!(t > 0.0 && t.is_finite(), "{t}");
        assert_eq!(cal.class_names, vec!["a", "b"]);
        for (x, y) in cal.weight.data.iter().zip(&head(&["a", "b"]).weight.data) {
            assert!((*x as f64 - *y as f64 / t).abs() < 1e-4 * (1.0 + y.abs() as f64 / t));
        }
        assert!((cal.bias.data[0] as f64 - 0.25 / t).abs() < 1e-4 * (1.0 + 0.25 / t));
    }
}
