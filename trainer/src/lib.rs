//! RedDino trainer: DINOv2 self-supervised pretraining of the RedDino ViT with tch (libtorch),
//! on CUDA when present and on the CPU otherwise.

pub mod augment;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod head;
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
