//! From logits to classes and counts: the head's size term ([`SizeInput`]), softmax, the
//! `uncertain` threshold, per-frame counts, and a session (one slide) that accumulates counts
//! with 95% Wilson intervals.

use reddino_models::bundle::Manifest;
use reddino_models::cellsize::{features, CellSize};
use serde::Serialize;

/// The size term of a bundle's head (a model trained with each cell's measured size as an
/// input, [`reddino_models::cellsize`]) as this device measures it: added to the model's
/// logits from each cell's box, before the softmax.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeInput {
    pub term: CellSize,
    /// Micrometres per pixel of this device's frames.
    pub um_per_px: f32,
}

impl SizeInput {
    /// The size input of `manifest`'s head with boxes measured at `um_per_px` (0 = the scale
    /// the model was trained at: the same microscope and camera); `None` for a head without a
    /// size term.
    pub fn of(manifest: &Manifest, um_per_px: f32) -> Option<SizeInput> {
        manifest.cell_size.clone().map(|term| {
            let (um_per_px, whose) = if um_per_px > 0.0 {
                (um_per_px, "this device's analysis.um_per_px")
            } else {
                (term.um_per_px, "the model's training scale")
            };
            log::info!(
                "{} reads each cell's size too: boxes measured at {um_per_px} um per pixel ({whose})",
                manifest.name
            );
            SizeInput { um_per_px, term }
        })
    }

    /// Adds the term of the cell in `bbox` to its `logits`.
    pub fn add_to(&self, logits: &mut [f32], bbox: [u32; 4]) {
        self.term.add_to(logits, &features(bbox, self.um_per_px));
    }
}

/// Name under which low-confidence cells are counted.
pub const UNCERTAIN: &str = "uncertain";

/// A classified cell: the class index (None = uncertain) and the top probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub class: Option<usize>,
    pub confidence: f32,
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

/// The top class of one cell's logits, or uncertain below `min_confidence` (or on NaN).
pub fn classify(logits: &[f32], min_confidence: f32) -> Prediction {
    let p = softmax(logits);
    let (best, conf) = p
        .iter()
        .copied()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, v)| if v > a.1 { (i, v) } else { a },
        );
    if !conf.is_finite() || conf < min_confidence {
        Prediction {
            class: None,
            confidence: if conf.is_finite() { conf } else { 0.0 },
        }
    } else {
        Prediction {
            class: Some(best),
            confidence: conf,
        }
    }
}

/// Counts per class (by index) plus uncertain cells.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Counts {
    pub per_class: Vec<u64>,
    pub uncertain: u64,
}

impl Counts {
    /// Counts keyed by class name, `uncertain` included.
    pub fn by_name(&self, class_names: &[String]) -> std::collections::BTreeMap<String, u64> {
        let mut m: std::collections::BTreeMap<String, u64> = class_names
            .iter()
            .cloned()
            .zip(self.per_class.iter().copied())
            .collect();
        m.insert(UNCERTAIN.into(), self.uncertain);
        m
    }

    pub fn new(classes: usize) -> Self {
        Counts {
            per_class: vec![0; classes],
            uncertain: 0,
        }
    }

    pub fn add(&mut self, p: &Prediction) {
        match p.class {
            Some(c) if c < self.per_class.len() => self.per_class[c] += 1,
            _ => self.uncertain += 1,
        }
    }

    pub fn merge(&mut self, other: &Counts) {
        for (a, b) in self.per_class.iter_mut().zip(&other.per_class) {
            *a += b;
        }
        self.uncertain += other.uncertain;
    }

    /// All cells, uncertain included.
    pub fn total(&self) -> u64 {
        self.per_class.iter().sum::<u64>() + self.uncertain
    }
}

/// 95% Wilson score interval of a proportion `k / n`.
pub fn wilson95(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = n as f64;
    let p = k as f64 / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One class's share of a session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Proportion {
    pub class: String,
    pub count: u64,
    pub proportion: f64,
    pub ci95: (f64, f64),
}

/// A slide: counts accumulated over its fields.
#[derive(Debug, Clone)]
pub struct Session {
    pub class_names: Vec<String>,
    pub counts: Counts,
    pub frames: u64,
}

impl Session {
    pub fn new(class_names: Vec<String>) -> Self {
        let n = class_names.len();
        Session {
            class_names,
            counts: Counts::new(n),
            frames: 0,
        }
    }

    pub fn add_frame(&mut self, counts: &Counts) {
        self.counts.merge(counts);
        self.frames += 1;
    }

    /// Each class's proportion of all classified cells (uncertain excluded), with its interval.
    pub fn proportions(&self) -> Vec<Proportion> {
        let n: u64 = self.counts.per_class.iter().sum();
        self.class_names
            .iter()
            .zip(&self.counts.per_class)
            .map(|(name, &k)| Proportion {
                class: name.clone(),
                count: k,
                proportion: if n == 0 { 0.0 } else { k as f64 / n as f64 },
                ci95: wilson95(k, n),
            })
            .collect()
    }

    /// Parasitized / all red cells x 100 with its 95% interval, when the class list has
    /// `parasitized` and names the red-cell classes (everything but `wbc` and `platelet`).
    pub fn parasitemia_pct(&self) -> Option<(f64, (f64, f64))> {
        let para = self.class_names.iter().position(|n| n == "parasitized")?;
        let rbc: u64 = self
            .class_names
            .iter()
            .zip(&self.counts.per_class)
            .filter(|(n, _)| n.as_str() != "wbc" && n.as_str() != "platelet")
            .map(|(_, k)| *k)
            .sum();
        let k = self.counts.per_class[para];
        let (lo, hi) = wilson95(k, rbc);
        let pct = if rbc == 0 {
            0.0
        } else {
            100.0 * k as f64 / rbc as f64
        };
        Some((pct, (100.0 * lo, 100.0 * hi)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_threshold() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_240_9).abs() < 1e-5);
        assert_eq!(classify(&[1.0, 2.0, 3.0], 0.5).class, Some(2));
        assert_eq!(classify(&[1.0, 2.0, 3.0], 0.7).class, None);
        assert_eq!(classify(&[f32::NAN, 1.0], 0.1).class, None);
        // Large logits do not overflow.
        assert_eq!(classify(&[1000.0, 0.0], 0.9).class, Some(0));
    }

    #[test]
    fn wilson_matches_hand_computed_values() {
        // k=10, n=100: (0.0552, 0.1744) to 4 decimals.
        let (lo, hi) = wilson95(10, 100);
        assert!(
            (lo - 0.05523).abs() < 1e-4 && (hi - 0.17437).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson95(0, 20);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.16113).abs() < 1e-4, "{hi}");
        assert_eq!(wilson95(0, 0), (0.0, 1.0));
    }

    #[test]
    fn session_proportions_and_parasitemia() {
        let names: Vec<String> = ["discocyte", "parasitized", "wbc", "platelet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut s = Session::new(names);
        let mut c = Counts::new(4);
        for (class, n) in [(0, 90), (1, 10), (2, 5), (3, 20)] {
            for _ in 0..n {
                c.add(&Prediction {
                    class: Some(class),
                    confidence: 0.9,
                });
            }
        }
        c.add(&Prediction {
            class: None,
            confidence: 0.2,
        });
        s.add_frame(&c);
        s.add_frame(&c);
        assert_eq!(s.counts.total(), 2 * 126);
        let p = s.proportions();
        assert!((p[0].proportion - 90.0 / 125.0).abs() < 1e-12);
        let (pct, (lo, hi)) = s.parasitemia_pct().unwrap();
        assert!((pct - 10.0).abs() < 1e-9);
        assert!(lo < 10.0 && hi > 10.0);
    }
}
