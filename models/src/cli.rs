//! Command-line argument groups the binaries share, so a flag means the same everywhere.

use clap::Args;

use crate::preprocess::CropPolicy;

/// How training crops are cut (`reddino-models synth crops`, `reddino-edge synth-crops`,
/// `reddino-edge import`): the flags of a [`CropPolicy`].
#[derive(Args, Debug, Clone)]
pub struct CropArgs {
    /// Crop side as a multiple of the cell's box. The edge cuts at 1.3 (`analysis.margin`)
    /// unless the model's manifest gives its own (`crop_margin`; `reddino-trainer export
    /// --crop-margin`); training crops cut wider let the fine-tuning's random crops frame the
    /// cells on either side of it.
    #[arg(long, default_value_t = CropPolicy::DEFAULT_MARGIN)]
    pub margin: f32,
    /// No crop smaller than this multiple of the frame's median cell (the model's
    /// `crop_min_side`; `reddino-trainer export --crop-min-side`); 0 = each crop scaled to its
    /// own cell.
    #[arg(long, default_value_t = 0.0)]
    pub min_side: f32,
    /// Blank out the neighbours in each crop (the model's `blank_neighbours`;
    /// `reddino-trainer export --blank-neighbours`).
    #[arg(long)]
    pub blank_neighbours: bool,
}

impl CropArgs {
    pub fn policy(&self) -> CropPolicy {
        CropPolicy {
            margin: self.margin,
            min_side: self.min_side,
            blank_neighbours: self.blank_neighbours,
        }
    }
}
