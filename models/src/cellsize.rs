//! The cell's measured size as a second input of a model's head.
//!
//! Each crop is scaled to its own cell, so the pixels the ViT sees no longer tell a macrocyte
//! from a normal cell or a microcyte. The finder's box, measured in micrometres, gives that
//! back: a head with a size term computes `logits = W · cls + U · features(box) + b`. The ONNX
//! graph computes `W · cls + b` (the image part, checked by the bundle's self-test); `U` and the
//! scale the model was trained at travel in the signed manifest ([`CellSize`]), and the edge adds
//! `U · features` per cell. [`features`] is the one definition the trainer and the edge share.

use serde::{Deserialize, Serialize};

/// Number of size features per cell.
pub const FEATURES: usize = 2;

/// The length the features are measured against, micrometres (a normal red cell's diameter).
pub const REFERENCE_UM: f32 = 7.5;

/// Units of the features per natural-log unit of size: about one per 10% of a cell's side,
/// so that they span a few units (as the normalised embedding does) and a head's weights
/// need not be large.
pub const LOG_SCALE: f32 = 10.0;

/// The size features of a cell's box (`[x0, y0, x1, y1]` in pixels, end exclusive) at
/// `um_per_px` micrometres per pixel: the natural logarithm of its long and of its short side
/// over [`REFERENCE_UM`], times [`LOG_SCALE`] (0 for a normal cell's diameter, +2.9 for one a
/// third larger).
pub fn features(bbox: [u32; 4], um_per_px: f32) -> [f32; FEATURES] {
    let w = bbox[2].saturating_sub(bbox[0]).max(1) as f32;
    let h = bbox[3].saturating_sub(bbox[1]).max(1) as f32;
    let ln = |side: f32| LOG_SCALE * (side * um_per_px / REFERENCE_UM).ln();
    [ln(w.max(h)), ln(w.min(h))]
}

/// The size term of a head: what the manifest carries and the edge adds to the logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSize {
    /// Micrometres per pixel of the fields the model was trained on: the scale the edge
    /// measures boxes at unless its camera's scale is configured (`analysis.um_per_px`).
    pub um_per_px: f32,
    /// Per class, in the head's order, the weights of the [`features`].
    pub weight: Vec<[f32; FEATURES]>,
}

impl CellSize {
    /// Checks the scale and that there is one finite weight row per class.
    pub fn validate(&self, classes: usize) -> Result<(), String> {
        if !(self.um_per_px.is_finite() && self.um_per_px > 0.0) {
            return Err(format!(
                "`cell_size.um_per_px` must be a positive number of micrometres, got {}",
                self.um_per_px
            ));
        }
        if self.weight.len() != classes {
            return Err(format!(
                "`cell_size.weight` has {} rows for {classes} classes",
                self.weight.len()
            ));
        }
        if self.weight.iter().flatten().any(|w| !w.is_finite()) {
            return Err("`cell_size.weight` holds a value that is not finite".into());
        }
        Ok(())
    }

    /// A term from its weights as a row-major `[classes, FEATURES]` array (a tensor's data);
    /// a trailing partial row is dropped ([`CellSize::validate`] then counts the rows).
    pub fn from_flat(um_per_px: f32, weight: &[f32]) -> CellSize {
        CellSize {
            um_per_px,
            weight: weight
                .chunks_exact(FEATURES)
                .map(|r| r.try_into().expect("a row of FEATURES"))
                .collect(),
        }
    }

    /// The weights as a row-major `[classes, FEATURES]` array.
    pub fn flat_weight(&self) -> Vec<f32> {
        self.weight.iter().flatten().copied().collect()
    }

    /// Adds the size term of a cell with these `features` to its `logits` (one per class).
    pub fn add_to(&self, logits: &mut [f32], features: &[f32; FEATURES]) {
        for (l, w) in logits.iter_mut().zip(&self.weight) {
            *l += w.iter().zip(features).map(|(w, f)| w * f).sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_log_sides_in_micrometres_and_ignore_orientation() {
        // 40 x 30 px at 0.1875 um/px: 7.5 um by 5.625 um.
        let f = features([10, 20, 50, 50], 0.1875);
        assert!(f[0].abs() < 1e-6, "{f:?}");
        assert!((f[1] - 10.0 * (0.75f32).ln()).abs() < 1e-5, "{f:?}");
        assert_eq!(features([10, 20, 40, 60], 0.1875), f);
        // Twice the magnification, twice the pixels: the same cell.
        assert!((features([0, 0, 80, 60], 0.09375)[1] - f[1]).abs() < 1e-5);
        // A degenerate box stays finite.
        assert!(features([5, 5, 5, 5], 0.2).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn the_term_moves_each_class_by_its_weights() {
        let s = CellSize {
            um_per_px: 0.2,
            weight: vec![[1.0, 0.0], [-1.0, 2.0]],
        };
        s.validate(2).unwrap();
        let mut logits = [0.5, 0.5];
        s.add_to(&mut logits, &[0.5, 0.25]);
        assert_eq!(logits, [1.0, 0.5]);
        assert!(s.validate(3).unwrap_err().contains("2 rows for 3 classes"));
        let bad = CellSize {
            um_per_px: 0.0,
            ..s.clone()
        };
        assert!(bad.validate(2).unwrap_err().contains("um_per_px"));
        let nan = CellSize {
            weight: vec![[f32::NAN, 0.0], [0.0, 0.0]],
            ..s
        };
        assert!(nan.validate(2).unwrap_err().contains("not finite"));
    }
}
