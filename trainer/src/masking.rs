//! iBOT block masking (DINOv2's `MaskingGenerator` and the mask part of
//! `collate_data_and_cast`): half of the images get masks whose target ratios are spread evenly
//! over [min_ratio, max_ratio]; each mask is grown from random rectangles of aspect 0.3-3.3.

use rand::seq::SliceRandom;
use rand::Rng;

/// Block-mask generator on a `height x width` patch grid.
#[derive(Debug, Clone)]
pub struct MaskGenerator {
    pub height: usize,
    pub width: usize,
    pub min_patches: usize,
    pub max_patches: usize,
    log_aspect: (f64, f64),
}

impl MaskGenerator {
    /// DINOv2's settings: at least 4 patches per block, at most half the grid, aspect 0.3-1/0.3.
    pub fn new(grid: usize) -> MaskGenerator {
        let min_aspect: f64 = 0.3;
        MaskGenerator {
            height: grid,
            width: grid,
            min_patches: 4,
            max_patches: grid * grid / 2,
            log_aspect: (min_aspect.ln(), (1.0 / min_aspect).ln()),
        }
    }

    fn grow(&self, mask: &mut [bool], max_mask: usize, rng: &mut impl Rng) -> usize {
        let mut delta = 0;
        for _ in 0..10 {
            // random.uniform(min_patches, max_mask): either order.
            let (a, b) = (self.min_patches as f64, max_mask as f64);
            let target = rng.gen_range(a.min(b)..=a.max(b));
            let aspect = rng.gen_range(self.log_aspect.0..self.log_aspect.1).exp();
            let h = (target * aspect).sqrt().round() as usize;
            let w = (target / aspect).sqrt().round() as usize;
            if w < self.width && h < self.height {
                let top = rng.gen_range(0..=self.height - h);
                let left = rng.gen_range(0..=self.width - w);
                let masked: usize = (top..top + h)
                    .map(|i| {
                        (left..left + w)
                            .filter(|&j| mask[i * self.width + j])
                            .count()
                    })
                    .sum();
                let new = h * w - masked;
                if new > 0 && new <= max_mask {
                    for i in top..top + h {
                        for j in left..left + w {
                            let m = &mut mask[i * self.width + j];
                            if !*m {
                                *m = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// A mask with about `n` patches set (fewer if the blocks cannot be placed).
    pub fn generate(&self, n: usize, rng: &mut impl Rng) -> Vec<bool> {
        let mut mask = vec![false; self.height * self.width];
        let mut count = 0;
        while count < n {
            let max_mask = (n - count).min(self.max_patches);
            let delta = self.grow(&mut mask, max_mask, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }

    /// Masks for a batch of `b` images: `int(b * probability)` of them masked with ratios spread
    /// over `ratio`, the rest empty, shuffled. Returns [b][grid*grid].
    pub fn batch(
        &self,
        b: usize,
        probability: f64,
        ratio: (f64, f64),
        rng: &mut impl Rng,
    ) -> Vec<Vec<bool>> {
        let n = self.height * self.width;
        let masked = (b as f64 * probability) as usize;
        let mut out = Vec::with_capacity(b);
        for i in 0..masked {
            let lo = ratio.0 + (ratio.1 - ratio.0) * i as f64 / masked as f64;
            let hi = ratio.0 + (ratio.1 - ratio.0) * (i + 1) as f64 / masked as f64;
            let r = if hi > lo { rng.gen_range(lo..hi) } else { lo };
            out.push(self.generate((n as f64 * r) as usize, rng));
        }
        for _ in masked..b {
            out.push(vec![false; n]);
        }
        out.shuffle(rng);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ratios_of_a_batch() {
        let g = MaskGenerator::new(16);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut masked_imgs = 0;
        let mut fractions = vec![];
        for _ in 0..50 {
            let masks = g.batch(64, 0.5, (0.1, 0.5), &mut rng);
            assert_eq!(masks.len(), 64);
            for m in &masks {
                let c = m.iter().filter(|&&x| x).count();
                if c > 0 {
                    masked_imgs += 1;
                    fractions.push(c as f64 / 256.0);
                }
            }
        }
        // Exactly half of the images are masked (an empty mask only if no block fits: never here).
        assert_eq!(masked_imgs, 50 * 32);
        // The ratio of each masked image lies in [0.1, 0.5] (a little under 0.1 when the last block
        // does not fit, as in
        // DINOv2: the last block adds at most what is still missing, so never above the target).
        let lo = fractions.iter().cloned().fold(1.0, f64::min);
        let hi = fractions.iter().cloned().fold(0.0, f64::max);
        assert!(lo >= 0.08 && hi <= 0.5, "ratios in [{lo}, {hi}]");
        // Spread evenly: the mean is near 0.3.
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        assert!((mean - 0.3).abs() < 0.03, "mean ratio {mean}");
    }

    #[test]
    fn masks_are_blocks() {
        let g = MaskGenerator::new(16);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let m = g.generate(30, &mut rng);
        let c = m.iter().filter(|&&x| x).count();
        assert!((4..=30).contains(&c), "{c}");
        // Every masked patch has a masked 4-neighbour (rectangles of >= 4 patches, h,w >= 1).
        let isolated = (0..256).filter(|&k| m[k]).filter(|&k| {
            let (i, j) = (k / 16, k % 16);
            let n = |a: isize, b: isize| {
                let (y, x) = (i as isize + a, j as isize + b);
                (0..16).contains(&y) && (0..16).contains(&x) && m[(y * 16 + x) as usize]
            };
            !(n(-1, 0) || n(1, 0) || n(0, -1) || n(0, 1))
        });
        assert_eq!(isolated.count(), 0);
        assert_eq!(g.generate(0, &mut rng).iter().filter(|&&x| x).count(), 0);
    }
}
