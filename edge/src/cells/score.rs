//! Scoring detections against labelled or true centres (recall, matches), for tests, the
//! finder-quality command and the examples.

/// Detection quality against ground truth: a detection matches a true cell when its centre is
/// within half the cell's radius; each true cell matches at most one detection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub true_positives: usize,
    pub detections: usize,
    pub truths: usize,
}

impl Match {
    pub fn recall(&self) -> f64 {
        self.true_positives as f64 / self.truths.max(1) as f64
    }
    pub fn precision(&self) -> f64 {
        self.true_positives as f64 / self.detections.max(1) as f64
    }
}

/// Greedy nearest matching of detected centres to true (centre, radius) pairs.
pub fn match_centres(found: &[(f32, f32)], truth: &[((f32, f32), f32)]) -> Match {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, d) in found.iter().enumerate() {
        for (j, (c, r)) in truth.iter().enumerate() {
            let dist = ((d.0 - c.0).powi(2) + (d.1 - c.1).powi(2)).sqrt();
            if dist <= 0.5 * r {
                pairs.push((dist, i, j));
            }
        }
    }
    Match {
        true_positives: greedy_pairs(pairs, found.len(), truth.len()).len(),
        detections: found.len(),
        truths: truth.len(),
    }
}

/// One-to-one matching of `found` detections to `truths` true cells from candidate pairs
/// `(distance, detection, truth)`: nearest first, each side used at most once. Returns the
/// matched (detection, truth) pairs.
pub fn greedy_pairs(
    mut pairs: Vec<(f32, usize, usize)>,
    found: usize,
    truths: usize,
) -> Vec<(usize, usize)> {
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut used_d = vec![false; found];
    let mut used_t = vec![false; truths];
    let mut matched = Vec::new();
    for (_, i, j) in pairs {
        if !used_d[i] && !used_t[j] {
            used_d[i] = true;
            used_t[j] = true;
            matched.push((i, j));
        }
    }
    matched
}
