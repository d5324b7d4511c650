//! `reddino-trainer pretrain`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Context, Result};

use crate::config::Config;
use crate::data::Dataset;
use crate::distributed::{Launch, ProcessGroup};
use crate::train::Trainer;
use std::time::Duration;

/// Pretrain a RedDino backbone (DINOv2 losses) on a folder of smears or crops. Under torchrun
/// or srun each process is one rank of a data-parallel run (docs/training.md).
#[derive(clap::Args)]
pub struct PretrainArgs {
    /// TOML config (see docs/pretrain.example.toml); `preset` gives every unset key.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest checkpoint in the run's out_dir.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in total (default: epochs x epoch_length).
    #[arg(long)]
    pub steps: Option<usize>,
}

/// Runs `reddino-trainer pretrain`.
pub fn run(args: PretrainArgs) -> Result<()> {
    let PretrainArgs {
        config,
        resume,
        steps,
    } = args;
    let cfg = Config::load(&config)?;
    // torchrun / srun: one process per rank, joined in a process group.
    let group = match Launch::from_env()? {
        Some(launch) => {
            let backend = match cfg.train.dist_backend.as_str() {
                "auto" if cfg.train.device != "cpu" && tch::Cuda::is_available() => "nccl",
                "auto" => "gloo",
                other => other,
            };
            log::info!(
                "rank {} of {} ({}, local rank {}): joining the {backend} group at {}:{}",
                launch.rank,
                launch.world,
                launch.launcher,
                launch.local_rank,
                launch.master_addr,
                launch.master_port
            );
            let timeout = Duration::from_secs(cfg.train.dist_timeout_s);
            Some(ProcessGroup::new(&launch, backend, timeout)?)
        }
        None => None,
    };
    let data = Dataset::scan(&cfg.data.path, cfg.data.kind, cfg.data.patch_size as u32)
        .with_context(|| format!("data.path {}", cfg.data.path.display()))?;
    log::info!(
        "{} training samples from {} files in {}{}",
        data.items.len(),
        data.files.len(),
        cfg.data.path.display(),
        if data.skipped.is_empty() {
            String::new()
        } else {
            format!(" ({} unreadable files skipped)", data.skipped.len())
        }
    );
    let mut trainer = Trainer::with_group(cfg, group)?;
    let (rank, world) = trainer.rank_world();
    log::info!(
        "device {:?}, ViT-{} at {} px, batch {} ({} per process x {world}), {} steps",
        trainer.device,
        trainer.cfg.model.arch.name(),
        trainer.cfg.model.img_size,
        trainer.cfg.train.batch_size,
        trainer.local_batch(),
        trainer.cfg.total_steps()
    );
    if resume {
        if trainer.resume()? {
            log::info!("resumed at step {}", trainer.step);
        } else {
            log::info!(
                "--resume: no checkpoint in {}, starting at step 0",
                trainer.cfg.train.out_dir.display()
            );
        }
    }
    let s = trainer.run(Arc::new(data), steps, std::io::stderr().is_terminal())?;
    if rank != 0 {
        return Ok(());
    }
    println!(
        "{} steps, loss {:.4} -> {:.4}, {:.1} images/s; checkpoint {}",
        s.steps,
        s.first_loss.unwrap_or(f64::NAN),
        s.last_loss.unwrap_or(f64::NAN),
        s.images_per_s,
        s.checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}
