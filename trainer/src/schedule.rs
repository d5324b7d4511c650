//! DINOv2's `CosineScheduler`: `freeze` iterations at 0, a linear warmup from `start` to `base`
//! (`np.linspace`, both ends included), then a half cosine from `base` to `final_value`; past
//! `total` it stays at `final_value`.

/// A per-iteration schedule, materialised like DINOv2's numpy array.
#[derive(Debug, Clone)]
pub struct Cosine {
    values: Vec<f64>,
    final_value: f64,
}

impl Cosine {
    pub fn new(
        base: f64,
        final_value: f64,
        total: usize,
        warmup: usize,
        start: f64,
        freeze: usize,
    ) -> Cosine {
        let mut values = vec![0.0; freeze.min(total)];
        let warmup = warmup.min(total - values.len());
        for i in 0..warmup {
            values.push(if warmup == 1 {
                start
            } else {
                start + (base - start) * i as f64 / (warmup - 1) as f64
            });
        }
        let rest = total - values.len();
        for i in 0..rest {
            let c = (std::f64::consts::PI * i as f64 / rest as f64).cos();
            values.push(final_value + 0.5 * (base - final_value) * (1.0 + c));
        }
        Cosine {
            values,
            final_value,
        }
    }

    /// Value at iteration `it`.
    pub fn at(&self, it: usize) -> f64 {
        self.values.get(it).copied().unwrap_or(self.final_value)
    }
}

/// DINOv2's square-root learning-rate scaling: `base_lr * sqrt(batch / 1024)`.
pub fn scaled_lr(base_lr: f64, global_batch: usize) -> f64 {
    base_lr * (global_batch as f64 / 1024.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        // np.linspace(0, 1, 3) = [0, .5, 1]; cos part over 4 iters: 1 + .5(1-0)... hand values.
        let s = Cosine::new(1.0, 0.0, 7, 3, 0.0, 0);
        let want = [
            0.0,
            0.5,
            1.0,
            1.0,
            0.853_553_390_593_273_8,
            0.5,
            0.146_446_609_406_726_2,
        ];
        for (i, w) in want.iter().enumerate() {
            assert!((s.at(i) - w).abs() < 1e-12, "it {i}: {} vs {w}", s.at(i));
        }
        assert_eq!(s.at(7), 0.0);
        assert_eq!(s.at(1000), 0.0);
    }

    #[test]
    fn freeze_and_momentum() {
        let s = Cosine::new(2.0, 1.0, 6, 2, 0.5, 2);
        assert_eq!([s.at(0), s.at(1)], [0.0, 0.0]);
        assert_eq!([s.at(2), s.at(3)], [0.5, 2.0]);
        assert!((s.at(4) - 2.0).abs() < 1e-12);
        assert!((s.at(5) - 1.5).abs() < 1e-12);
        // EMA momentum 0.994 -> 1: monotone, starts at base, ends below 1.
        let m = Cosine::new(0.994, 1.0, 100, 0, 0.0, 0);
        assert_eq!(m.at(0), 0.994);
        assert!((1..100).all(|i| m.at(i) >= m.at(i - 1)));
        assert_eq!(m.at(100), 1.0);
    }

    #[test]
    fn sqrt_scaling() {
        assert!((scaled_lr(2e-4, 256) - 1e-4).abs() < 1e-15);
        assert!((scaled_lr(2e-4, 1024) - 2e-4).abs() < 1e-15);
    }
}
