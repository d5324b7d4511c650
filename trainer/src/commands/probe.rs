//! `reddino-trainer probe`.

use std::path::PathBuf;

use crate::error::{Context, Result};

use super::ModelArgs;

/// Train the linear head the edge uses (multinomial logistic regression on the CLS
/// features of all crops) and write it with its class names; `export --head` takes it.
#[derive(clap::Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Head safetensors to write.
    #[arg(long)]
    pub out: PathBuf,
    /// L2 weight (objective: mean cross-entropy + l2/2 |W|^2); default RedDino's,
    /// 100 / (dim x classes x samples) (scikit-learn's C = dim x classes / 100).
    #[arg(long)]
    l2: Option<f64>,
}

/// Runs `reddino-trainer probe`.
pub fn run(args: ProbeArgs) -> Result<()> {
    let ProbeArgs { model, out, l2 } = args;
    use crate::eval::{default_l2, metrics, LinearProbe};
    let (set, f) = model.features()?;
    let classes = set.class_names.len();
    let l2 = l2.unwrap_or_else(|| default_l2(f.size()[1] as usize, classes, f.size()[0] as usize));
    let probe = LinearProbe::fit(&f, &set.labels, classes, l2, 5000);
    if !probe.converged {
        log::warn!(
            "L-BFGS stopped after {} iterations without converging",
            probe.iterations
        );
    }
    let train = metrics(&set.labels, &probe.predict(&f), classes);
    let tensor = |t: &tch::Tensor| -> Result<reddino_models::weights::Tensor> {
        let shape = t.size().iter().map(|&s| s as usize).collect();
        Ok(reddino_models::weights::Tensor::new(
            shape,
            Vec::<f32>::try_from(t.flatten(0, -1))?,
        ))
    };
    let head = reddino_models::weights::LinearHead {
        class_names: set.class_names.clone(),
        weight: tensor(&probe.weight)?,
        bias: tensor(&probe.bias)?,
        size: None,
    };
    head.validate(f.size()[1] as usize)?;
    std::fs::write(&out, head.to_bytes()?).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "linear head ({classes} classes, l2 {l2:.3e}, {} L-BFGS iterations): training accuracy {:.3}, balanced {:.3} -> {}",
        probe.iterations,
        train.accuracy,
        train.balanced_accuracy,
        out.display()
    );
    Ok(())
}
