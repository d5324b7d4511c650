//! One module per `reddino-trainer` command, each with its clap arguments and the one function
//! the binary calls; the argument groups they share ([`ModelArgs`]) are here.

pub mod calibrate;
pub mod embed;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod preset;
pub mod pretrain;
pub mod probe;
pub mod score;
pub mod synth_smears;

use std::path::PathBuf;

use crate::error::Result;

use crate::labelled::LabelledSet;

/// The backbone to take features from, and the labelled crops to take them of.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Backbone safetensors (this trainer's, timm's, DINOv2's or RedDino's).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Folder of labelled crops ({class}/image or {source}/{class}/image, as `reddino-edge
    /// import` writes them).
    #[arg(long)]
    pub data: PathBuf,
    /// Input size the crops are resized to (position embedding resampled); default: the
    /// checkpoint's.
    #[arg(long)]
    pub input_size: Option<usize>,
    /// auto, cpu, cuda, cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

impl ModelArgs {
    /// CLS features of the checkpoint for every crop of `data`.
    pub fn features(&self) -> Result<(LabelledSet, tch::Tensor)> {
        self.features_of(FeatureKind::Model)
    }

    /// The backbone (with the checkpoint's weights, or freshly initialised) at the input size.
    pub fn vit(&self, random_init: bool) -> Result<(tch::nn::VarStore, crate::vit::Vit)> {
        let w = reddino_models::weights::VitWeights::load(&self.checkpoint)?;
        let size = self.input_size.unwrap_or(w.config.img_size);
        let device = crate::train::device_from(&self.device)?;
        let vs = tch::nn::VarStore::new(device);
        let vit = if random_init {
            tch::manual_seed(0);
            let mut cfg = w.config.clone();
            cfg.img_size = size;
            crate::vit::Vit::random_baseline(&vs.root(), &cfg, w.pos_prefix())?
        } else {
            crate::vit::Vit::from_weights(&vs.root(), &w, size)?
        };
        Ok((vs, vit))
    }

    /// The features `kind` names for every crop of `data`.
    pub fn features_of(&self, kind: FeatureKind) -> Result<(LabelledSet, tch::Tensor)> {
        let set = LabelledSet::scan(&self.data)?;
        let (vs, vit) = self.vit(kind == FeatureKind::RandomInit)?;
        let size = vit.config.img_size;
        log::info!(
            "{} images, {} classes, {} sources; {} at {size} px on {:?}",
            set.files.len(),
            set.class_names.len(),
            set.source_names.len(),
            match kind {
                FeatureKind::Model => format!("ViT {}-d", vit.config.embed_dim),
                FeatureKind::RandomInit =>
                    format!("randomly initialised ViT {}-d", vit.config.embed_dim),
                FeatureKind::Pixels => "raw pixels".to_string(),
            },
            vs.device()
        );
        let f = match kind {
            FeatureKind::Pixels => set.pixels(size as u32)?,
            _ => set.embed(&vit, vs.device(), self.batch)?,
        };
        Ok((set, f))
    }
}

/// What `eval` probes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FeatureKind {
    /// CLS features of the checkpoint.
    Model,
    /// CLS features of the same architecture, freshly initialised (a baseline).
    RandomInit,
    /// The normalised pixels of the crop at the input size (a baseline).
    Pixels,
}

/// A progress bar on a terminal; hidden otherwise (progress then goes to the log).
pub fn progress_bar(terminal: bool) -> indicatif::ProgressBar {
    if !terminal {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("template"),
    );
    pb
}
