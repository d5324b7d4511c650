//! RedDino trainer: DINOv2 self-supervised pretraining of the RedDino ViT with tch (libtorch),
//! on CUDA when present and on the CPU otherwise, then evaluation, fine-tuning and export.
//!
//! - Pretraining: [`config`] (TOML runs from presets), [`data`] (smear patches or crops),
//!   [`augment`] (RedDino's transforms), [`masking`] (iBOT masks), [`vit`] (the backbone in
//!   timm's names), [`head`] (the DINO head), [`loss`], [`ssl`] (one student/teacher step),
//!   [`optim`], [`schedule`], [`train`] (the loop and checkpoints), [`synth`] (synthetic smears),
//!   [`cpu`] (the floating-point mode CPU training runs in).
//! - Labelled crops: [`labelled`] (a crop folder and its features), [`probe`] (features with
//!   the shared preprocessing), [`eval`] (kNN, the linear probe, metrics, folds), [`report`]
//!   (the protocols' runs, their Markdown and plots), [`finetune`] (backbone + head),
//!   [`calibrate`] (the temperature that makes the head's probabilities mean what they say).
//! - Out: [`export`] (signed bundles for the edge); [`commands`] (one function per
//!   `reddino-trainer` command); [`error`] (the one error type every function returns).

pub mod augment;
pub mod calibrate;
pub mod commands;
pub mod config;
pub mod cpu;
pub mod data;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod head;
pub mod labelled;
pub mod loss;
pub mod masking;
pub mod optim;
pub mod probe;
pub mod report;
pub mod schedule;
pub mod ssl;
pub mod synth;
pub mod train;
pub mod vit;
