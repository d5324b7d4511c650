//! `reddino-trainer finetune`.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::bail;
use crate::error::{Context, Result};

use super::{progress_bar, ModelArgs};
use crate::labelled::LabelledSet;

/// Fine-tune a backbone with a new linear head on labelled crops (cross-entropy, AdamW
/// with layer-wise lr decay, RedDino's pixel augmentations); writes backbone.safetensors
/// and head.safetensors for `export`.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Peak learning rate (head and last block; earlier blocks decay by --layer-decay).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.75)]
    pub layer_decay: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Smallest area of the random crop taken from each training crop, as a fraction of
    /// it (the largest is 1): the cells are framed between sqrt(this) and 1 times the
    /// margin the crops were cut at.
    #[arg(long, default_value_t = 0.6)]
    pub crop_scale: f64,
    /// Pixel transforms applied to each training crop, drawn from RedDino's 33 (blurs,
    /// colour, noise, inversion ...); flips and quarter turns are applied either way.
    #[arg(long, default_value_t = 3)]
    pub pixel_ops: usize,
    /// Which transforms `--pixel-ops` draws from: `finetune` (stain, colour, exposure,
    /// noise, a mild blur) or `colour` (colour and exposure alone, the cell's outline and
    /// texture untouched).
    #[arg(long, value_enum, default_value = "finetune")]
    pub pixel_pool: crate::finetune::PixelPool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads for libtorch (0 = its default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Weigh the cross-entropy by inverse class frequency (imbalanced classes).
    #[arg(long)]
    pub balanced: bool,
    /// Logit adjustment for imbalanced classes, instead of --balanced: the training loss
    /// sees each class's logit plus TAU x ln(its share of the crops), the model's logits
    /// stay without it (0 = off; 1 is the usual choice).
    #[arg(long, default_value_t = 0.0, value_name = "TAU")]
    pub logit_adjust: f64,
    /// Keep a moving average of the weights over the steps, decaying by this factor per
    /// step (e.g. 0.999), instead of the last step's weights; 0 = off.
    #[arg(long, default_value_t = 0.0, value_name = "DECAY")]
    pub ema: f64,
    /// Stochastic depth in training: each block's branches are dropped for a crop with this
    /// probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub drop_path: f64,
    /// Mixup in training: each batch blended with a shuffled copy of itself (crops, sizes
    /// and losses) by a weight drawn from Beta(ALPHA, ALPHA); 0 = off (0.2-1 are usual).
    #[arg(long, default_value_t = 0.0, value_name = "ALPHA")]
    pub mixup: f64,
    /// Give the head each cell's measured size too, at this many micrometres per pixel of
    /// the training fields (the crops must come from `reddino-edge import` of labelled
    /// fields, whose crops.csv has the cells' boxes). The exported bundle carries the term
    /// and its scale; the edge measures each cell's box the same way.
    #[arg(long, value_name = "UM_PER_PX")]
    pub cell_size: Option<f32>,
    /// Cross-validation scores each crop by its logits averaged over this many turned and
    /// mirrored copies (1, 4 or 8), as a model exported with `export --test-time-views` does
    /// (the crop alone is logged beside it).
    #[arg(long, default_value_t = 1)]
    pub test_time_views: usize,
    /// Cross-validate first: one fine-tune per source folder of the data, tested on that
    /// folder (with `reddino-edge import --folds K`, K-fold cross-validation by field);
    /// writes OUT/cv/report.json and report.md, then fine-tunes on everything.
    #[arg(long)]
    pub cross_validate: bool,
    /// With --cross-validate: stop after the cross-validation.
    #[arg(long)]
    pub cv_only: bool,
}

/// Runs `reddino-trainer finetune`.
pub fn run(args: FinetuneArgs) -> Result<()> {
    let FinetuneArgs {
        model,
        out,
        epochs,
        lr,
        layer_decay,
        weight_decay,
        label_smoothing,
        crop_scale,
        pixel_ops,
        pixel_pool,
        seed,
        threads,
        balanced,
        logit_adjust,
        ema,
        drop_path,
        mixup,
        cell_size,
        test_time_views,
        cross_validate,
        cv_only,
    } = args;
    let data = model.data.clone();
    use crate::finetune::{finetune, FinetuneConfig};
    if cv_only && !cross_validate {
        bail!("--cv-only needs --cross-validate");
    }
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
    let init = reddino_models::weights::VitWeights::load(&model.checkpoint)?;
    let set = LabelledSet::scan(&data)?;
    let device = crate::train::device_from(&model.device)?;
    let defaults = FinetuneConfig::default();
    let cfg = FinetuneConfig {
        input_size: model.input_size.unwrap_or(init.config.img_size),
        epochs,
        batch_size: model.batch,
        lr,
        layer_decay,
        weight_decay,
        label_smoothing,
        augment: crate::augment::AugmentConfig {
            crop_scale: (crop_scale, 1.0),
            ops_per_image: pixel_ops,
            ..defaults.augment
        },
        pixel_pool,
        seed,
        balanced,
        logit_adjust,
        ema,
        drop_path,
        mixup,
        cell_size,
        test_time_views,
        ..defaults
    };
    // Refused before any work: bad settings, crops without boxes for the size input.
    cfg.validate()?;
    if let Some(um) = cfg.cell_size {
        let _ = set.size_features(um)?;
    }
    if cross_validate {
        let cv = crate::finetune::cross_validate(&init, &set, &cfg, device, |f, s| {
            log::info!(
                "fold {}: step {}/{}: loss {:.4}",
                f + 1,
                s.step,
                s.total,
                s.loss
            )
        })
        .with_context(|| format!("cross-validating on {}", data.display()))?;
        let folds = set.source_names.len();
        let dir = out.join("cv");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "protocol": format!("{folds}-fold by source folder, fine-tuned per fold"),
                "test_time_views": test_time_views,
                "class_names": set.class_names,
                "pooled": cv.pooled,
                "folds": cv.folds,
                "seconds": cv.seconds,
            }))?,
        )?;
        let views = match test_time_views {
            1 => String::new(),
            v => format!(", logits averaged over {v} turned views of each crop"),
        };
        let md = crate::report::cv_markdown(
            &format!("Fine-tuning, {folds}-fold cross-validation by source folder{views}"),
            &set,
            &cv.pooled,
        );
        std::fs::write(dir.join("report.md"), &md)?;
        let logits = (0..cv.logits.size()[0])
            .map(|v| Vec::<Vec<f32>>::try_from(cv.logits.get(v)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let truth: Vec<usize> = cv.truth.iter().map(|&y| y as usize).collect();
        crate::calibrate::write_cv_logits(
            &dir.join("logits.csv"),
            &set.class_names,
            &cv.files,
            &cv.fold_of,
            &truth,
            &logits,
        )?;
        print!("{md}");
        if cv_only {
            return Ok(());
        }
    }
    log::info!(
        "fine-tuning ViT {}-d x {} at {} px on {device:?}: {} crops, {} classes, {} sources, {epochs} epochs of batch {}",
        init.config.embed_dim,
        init.config.depth,
        cfg.input_size,
        set.files.len(),
        set.class_names.len(),
        set.source_names.len(),
        cfg.batch_size
    );
    let bar = progress_bar(std::io::stderr().is_terminal());
    let t0 = std::time::Instant::now();
    let r = finetune(&init, &set, &cfg, device, 10, |s| {
        bar.set_length(s.total as u64);
        bar.set_position(s.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e}", s.loss, s.lr));
        if bar.is_hidden() {
            log::info!(
                "step {}/{}: loss {:.4}, lr {:.2e}",
                s.step,
                s.total,
                s.loss,
                s.lr
            );
        }
    })?;
    bar.finish_and_clear();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    r.backbone.save(&out.join("backbone.safetensors"))?;
    std::fs::write(out.join("head.safetensors"), r.head.to_bytes()?)?;
    let summary = serde_json::json!({
        "data": data,
        "init": model.checkpoint,
        "input_size": cfg.input_size,
        "epochs": epochs,
        "batch_size": cfg.batch_size,
        "lr": lr,
        "layer_decay": layer_decay,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "crop_scale": crop_scale,
        "pixel_ops": pixel_ops,
        "pixel_pool": pixel_pool,
        "seed": seed,
        "balanced": balanced,
        "logit_adjust": logit_adjust,
        "ema": ema,
        "drop_path": drop_path,
        "mixup": mixup,
        "cell_size_um_per_px": cell_size,
        "test_time_views": test_time_views,
        "first_loss": r.first_loss,
        "last_loss": r.last_loss,
        "seconds": t0.elapsed().as_secs_f64(),
        "train": r.train,
    });
    std::fs::write(
        out.join("finetune.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!(
        "fine-tuned in {:.0} s: loss {:.4} -> {:.4}, training accuracy {:.3} (balanced {:.3}) -> {}/backbone.safetensors, {}/head.safetensors",
        t0.elapsed().as_secs_f64(),
        r.first_loss,
        r.last_loss,
        r.train.accuracy,
        r.train.balanced_accuracy,
        out.display(),
        out.display()
    );
    Ok(())
}
