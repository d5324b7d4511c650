//! Cutting a frame's cells out for the model: the finder's boxes (and, for a model that blanks
//! its neighbours, the finder's owner map) cut by the model's [`CropPolicy`], which is built
//! once from the manifest and the config's margin ([`Manifest::crop_policy`]).
//!
//! [`Manifest::crop_policy`]: reddino_models::bundle::Manifest::crop_policy

use image::RgbImage;
pub use reddino_models::preprocess::CropPolicy;

use crate::cells::{self, Cell, CellFinderConfig};

/// The cells of a frame and their crops, one per cell in order, as a model with this crop
/// policy takes them.
pub fn find_and_crop(
    img: &RgbImage,
    finder: &CellFinderConfig,
    policy: &CropPolicy,
) -> (Vec<Cell>, Vec<RgbImage>) {
    let (found, owners) = cells::find_maybe_owners(img, finder, policy.blank_neighbours);
    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
    let crops = policy.cut(img, &boxes, owners.as_ref());
    (found, crops)
}
