//! DINOv2's losses: DINO (CLS), iBOT (masked patches), KoLeo, and the two ways of centering the
//! teacher (Sinkhorn-Knopp, running mean). Each is the formula of the DINOv2 code base
//! (`dinov2/loss/*.py`, `dinov2/train/ssl_meta_arch.py`); `tests/reference/dinov2_losses.py`
//! computes the same on fixed tensors with torch and the tests compare.

use crate::distributed::ProcessGroup;
use tch::{Kind, Tensor};

/// Sinkhorn-Knopp centering of teacher scores [B, K] -> assignment probabilities [B, K].
/// `n_samples` is B for the DINO loss and the number of masked patches for iBOT (DINOv2 passes
/// it separately because the patch buffer is padded).
pub fn sinkhorn_knopp(teacher: &Tensor, temp: f64, iterations: usize, n_samples: f64) -> Tensor {
    sinkhorn_knopp_across(teacher, temp, iterations, n_samples, None)
}

/// [`sinkhorn_knopp`] over the rows of every rank of `group`, as DINOv2's distributed version:
/// the total and the per-prototype row sums are summed across ranks; `n_samples` is the count
/// over all ranks.
pub fn sinkhorn_knopp_across(
    teacher: &Tensor,
    temp: f64,
    iterations: usize,
    n_samples: f64,
    group: Option<&ProcessGroup>,
) -> Tensor {
    let reduce = |t: Tensor| {
        if let Some(g) = group {
            g.sum_in_place(&t);
        }
        t
    };
    tch::no_grad(|| {
        let q = (teacher.to_kind(Kind::Float) / temp).exp().transpose(0, 1); // [K, B]
        let k = q.size()[0] as f64;
        let total = reduce(q.sum(Kind::Float));
        let mut q = &q / total;
        for _ in 0..iterations {
            let rows = reduce(q.sum_dim_intlist([1i64].as_slice(), true, Kind::Float));
            q = q / rows / k;
            let cols = q.sum_dim_intlist([0i64].as_slice(), true, Kind::Float);
            q = q / cols / n_samples;
        }
        (q * n_samples).transpose(0, 1)
    })
}

/// Running-mean teacher centering (DINO's original): the centre moves towards each batch's mean
/// teacher score with `momentum`; the update from one step is applied at the next, as DINOv2's
/// asynchronous centre does.
pub struct Center {
    pub center: Tensor,
    pending: Option<Tensor>,
    pub momentum: f64,
}

impl Center {
    pub fn new(dim: i64, momentum: f64, device: tch::Device) -> Center {
        Center {
            center: Tensor::zeros([1, dim], (Kind::Float, device)),
            pending: None,
            momentum,
        }
    }

    /// Applies the pending update, then returns softmax((t - center) / temp).
    pub fn softmax_centered(&mut self, teacher: &Tensor, temp: f64) -> Tensor {
        tch::no_grad(|| {
            if let Some(batch_center) = self.pending.take() {
                self.center = &self.center * self.momentum + batch_center * (1.0 - self.momentum);
            }
            ((teacher.to_kind(Kind::Float) - &self.center) / temp).softmax(-1, Kind::Float)
        })
    }

    /// Records this batch's teacher scores for the next update.
    pub fn update(&mut self, teacher: &Tensor) {
        self.update_across(teacher, None)
    }

    /// [`Center::update`] with the mean taken over the rows of every rank of `group` (the row
    /// counts are summed too: ranks may hold different numbers of masked patches).
    pub fn update_across(&mut self, teacher: &Tensor, group: Option<&ProcessGroup>) {
        tch::no_grad(|| {
            let sum =
                teacher
                    .to_kind(Kind::Float)
                    .sum_dim_intlist([0i64].as_slice(), true, Kind::Float);
            let mut n = teacher.size()[0] as f64;
            if let Some(g) = group {
                g.sum_in_place(&sum);
                let count = Tensor::from_slice(&[n]).to_device(teacher.device());
                g.sum_in_place(&count);
                n = count.double_value(&[0]);
            }
            self.pending = Some(sum / n.max(1.0));
        })
    }
}

/// Cross-entropy between teacher probabilities and the student's tempered log-softmax, per row.
fn cross_entropy_rows(student: &Tensor, teacher_probs: &Tensor, student_temp: f64) -> Tensor {
    let lsm = (student / student_temp).log_softmax(-1, Kind::Float);
    (teacher_probs * lsm).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
}

/// DINO loss: student scores [M, K] against teacher probabilities [M, K] (already matched crop
/// to crop): `-mean_rows(sum_k t * log_softmax(s / temp))`.
pub fn dino_loss(student: &Tensor, teacher_probs: &Tensor, student_temp: f64) -> Tensor {
    -cross_entropy_rows(student, teacher_probs, student_temp).mean(Kind::Float)
}

/// iBOT masked-patch loss: rows are the masked patches of all images; `weights` is
/// 1 / (masked patches of that row's image); `n_images` counts every image, masked or not.
pub fn ibot_loss(
    student: &Tensor,
    teacher_probs: &Tensor,
    weights: &Tensor,
    n_images: i64,
    student_temp: f64,
) -> Tensor {
    let l = cross_entropy_rows(student, teacher_probs, student_temp) * weights;
    -l.sum(Kind::Float) / n_images as f64
}

/// KoLeo regulariser on [B, D] features: `-mean(log(d_nn + eps))` with d_nn the distance of each
/// L2-normalised row to its nearest other row.
pub fn koleo_loss(x: &Tensor) -> Tensor {
    let eps = 1e-8;
    let x = x.to_kind(Kind::Float);
    let norm = x.norm_scalaropt_dim(2, [-1], true).clamp_min(eps);
    let x = &x / norm;
    let nn_idx = tch::no_grad(|| {
        let dots = x.mm(&x.transpose(0, 1));
        let n = dots.size()[0];
        let _ = dots.view([-1]).slice(0, 0, n * n, n + 1).fill_(-1.0);
        dots.argmax(1, false)
    });
    let nearest = x.index_select(0, &nn_idx);
    // nn.PairwiseDistance(p=2, eps=1e-8): ||a - b + eps||.
    let d = (&x - nearest + eps).norm_scalaropt_dim(2, [-1], false);
    -(d + eps).log().mean(Kind::Float)
}

/// Largest absolute element difference (tests and checks).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}
