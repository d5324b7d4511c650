//! `reddino-models`: the contract between the RedDino trainer and the edge service.
//!
//! - [`arch`]: ViT presets and dimensions.
//! - [`weights`]: safetensors checkpoints in the timm/DINOv2 key layout.
//! - [`onnx`]: the ONNX graph of a ViT (+ linear head).
//! - [`cellsize`]: the cell's measured size as a second input of the head.
//! - [`runtime`]: running that graph on the CPU with tract.
//! - [`preprocess`]: the one function that turns RGB pixels into model input, and the crop
//!   policy.
//! - [`bundle`]: signed model bundles (write, pack, open, verify).
//! - [`synth`]: synthetic blood smears with per-cell ground truth.
//! - [`taxonomy`]: the default cell classes.
//! - [`cli`]: argument groups the binaries share.

pub mod arch;
pub mod bundle;
pub mod cellsize;
pub mod cli;
mod error;
pub mod onnx;
pub mod preprocess;
pub mod runtime;
pub mod synth;
pub mod taxonomy;
pub mod weights;

pub use error::{BundleError, Error};
