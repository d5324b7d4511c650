//! Cutting a frame's cells out for the model: the finder's boxes (and, for a model that blanks
//! its neighbours, the finder's owner map) cut by the model's [`CropPolicy`], which is built
//! once from the manifest and the config's margin ([`Manifest::crop_policy`]).
//!
//! [`Manifest::crop_policy`]: reddino_models::bundle::Manifest::crop_policy

use image::RgbImage;
pub use reddino_models::preprocess::CropPolicy;
use reddino_models::preprocess::OwnerMap;

use crate::cells::{self, Cell, CellFinderConfig};

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
