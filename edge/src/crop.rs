//! Cutting a frame's cells out for the model: the finder's boxes (and, for a model that blanks
//! its neighbours, the finder's owner map) cut by the model's [`CropPolicy`], which is built
//! once from the manifest and the config's margin ([`Manifest::crop_policy`]).
//!
//! [`Manifest::crop_policy`]: reddino_models::bundle::Manifest::crop_policy

use image::RgbImage;
pub use reddino_models::preprocess::CropPolicy;
use reddino_models::preprocess::{Normalization, OwnerMap};

use crate::cells::{self, Cell, CellFinderConfig};

/// A frame's cells and their model inputs: each cell cut by the crop policy, resized to the
/// model's `size` and normalised into one `3 x size x size` block of `inputs`, in order (what
/// [`find_and_crop`] then preprocessing gives, with no image per crop). Finding and cutting
/// run on the current rayon pool: the same result on any number of threads.
pub struct FrameInputs {
    pub cells: Vec<Cell>,
    /// Each cell's box, in order (what the crops were cut from, and a size term measures).
    pub boxes: Vec<[u32; 4]>,
    pub inputs: Vec<f32>,
}

/// [`FrameInputs`] of `img` for a model of input `size` and normalisation `norm`.
pub fn find_and_cut_into(
    img: &RgbImage,
    finder: &CellFinderConfig,
    policy: &CropPolicy,
    size: u32,
    norm: &Normalization,
) -> FrameInputs {
    let (cells, owners) = cells::find_maybe_owners(img, finder, policy.blank_neighbours);
    let boxes: Vec<[u32; 4]> = cells.iter().map(|c| c.bbox).collect();
    let mut inputs = vec![0f32; boxes.len() * 3 * (size * size) as usize];
    policy.cut_into(img, &boxes, owners.as_ref(), size, norm, &mut inputs);
    FrameInputs {
        cells,
        boxes,
        inputs,
    }
}

/// The cells of a frame and their crops, one per cell in order, as a model with this crop
/// policy takes them.
pub fn find_and_crop(
    img: &RgbImage,
    finder: &CellFinderConfig,
    policy: &CropPolicy,
) -> (Vec<Cell>, Vec<RgbImage>) {
    let (found, owners) = cells::find_maybe_owners(img, finder, policy.blank_neighbours);
    let crops = cut(img, &found, owners.as_ref(), policy);
    (found, crops)
}

/// The crops of cells already found, one per cell in order; `owners` (the finder's map) is
/// needed when the policy blanks neighbours.
pub fn cut(
    img: &RgbImage,
    found: &[Cell],
    owners: Option<&OwnerMap>,
    policy: &CropPolicy,
) -> Vec<RgbImage> {
    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
    policy.cut(img, &boxes, owners)
}
