//! What runs on files rather than a camera: [`analyze`] (image files to counts), the data-set
//! tools ([`labelled`] readers, [`import`] to training crops, [`quality`] of the finder,
//! [`synth_crops`] from the synthetic microscope) and the [`demo`].

pub mod analyze;
pub mod demo;
pub mod import;
pub mod labelled;
pub mod quality;
pub mod synth_crops;
