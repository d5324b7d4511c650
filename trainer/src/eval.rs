//! Probes on frozen features and their metrics: kNN (Euclidean with uniform votes as RedDino,
//! or cosine with temperature-weighted votes), the linear probe (multinomial logistic
//! regression fitted with L-BFGS), accuracy, balanced accuracy, weighted F1, per-class
//! precision/recall and the confusion matrix, and the protocols (fixed split, stratified k-fold,
//! leave-one-source-out).

use crate::bail;
use crate::error::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use tch::{Kind, Tensor};

/// kNN distance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Knn {
    /// Euclidean distance, one vote per neighbour (RedDino's protocol).
    Euclidean,
    /// Cosine similarity, votes weighted by exp(sim / temperature) (DINO's kNN).
    Cosine { temperature: f64 },
}

/// Share of `test` whose kNN prediction (Euclidean, uniform votes, ties to the smaller label:
/// RedDino's protocol) is its label.
pub fn knn_accuracy(
    train: &Tensor,
    train_y: &[i64],
    test: &Tensor,
    test_y: &[i64],
    k: usize,
) -> f64 {
    let classes = train_y.iter().chain(test_y).copied().max().unwrap_or(0) as usize + 1;
    let pred = knn_predict(train, train_y, test, k, Knn::Euclidean, classes);
    let correct = pred.iter().zip(test_y).filter(|(p, y)| p == y).count();
    correct as f64 / test_y.len().max(1) as f64
}

/// kNN predictions for `test` given labelled `train` features.
pub fn knn_predict(
    train: &Tensor,
    train_y: &[i64],
    test: &Tensor,
    k: usize,
    kind: Knn,
    classes: usize,
) -> Vec<i64> {
    let train = train.to_kind(Kind::Float);
    let test = test.to_kind(Kind::Float);
    let k = k.min(train_y.len()).max(1) as i64;
    let (scores, idx) = match kind {
        Knn::Euclidean => {
            let d = Tensor::cdist(&test, &train, 2.0, None::<i64>);
            let (v, i) = d.topk(k, 1, false, true);
            (v.ones_like(), i)
        }
        Knn::Cosine { temperature } => {
            let n = |x: &Tensor| {
                x / x
                    .norm_scalaropt_dim(2, [1i64].as_slice(), true)
                    .clamp_min(1e-12)
            };
            let sim = n(&test).matmul(&n(&train).transpose(0, 1));
            let (v, i) = sim.topk(k, 1, true, true);
            ((v / temperature).exp(), i)
        }
    };
    let idx = Vec::<i64>::try_from(idx.flatten(0, -1)).expect("indices");
    let w = Vec::<f32>::try_from(scores.flatten(0, -1)).expect("weights");
    let ku = k as usize;
    (0..test.size()[0] as usize)
        .map(|i| {
            let mut votes = vec![0f64; classes];
            for j in 0..ku {
                votes[train_y[idx[i * ku + j] as usize] as usize] += w[i * ku + j] as f64;
            }
            // ties: the smaller class index (a deterministic rule, as sklearn's argmax)
            let mut best = 0;
            for c in 1..classes {
                if votes[c] > votes[best] {
                    best = c;
                }
            }
            best as i64
        })
        .collect()
}

/// A fitted multinomial logistic regression.
#[derive(Debug)]
pub struct LinearProbe {
    /// [C, D]
    pub weight: Tensor,
    /// [C]
    pub bias: Tensor,
    pub iterations: usize,
    pub converged: bool,
}

impl LinearProbe {
    /// Fits `mean_i CE(W x_i + b, y_i) + l2/2 ||W||^2` (the bias is not penalised) with L-BFGS
    /// (history 10, Armijo backtracking). In scikit-learn's terms this is
    /// `LogisticRegression(C = 1 / (l2 * n))`.
    pub fn fit(x: &Tensor, y: &[i64], classes: usize, l2: f64, max_iter: usize) -> LinearProbe {
        // Centred features: the same optimum (the unpenalised bias absorbs W mu, mapped back
        // below) without the coupling of W and b that a large feature mean causes.
        let x = x.to_kind(Kind::Double);
        let mu = x.mean_dim([0i64].as_slice(), true, Kind::Double);
        let x = &x - &mu;
        let d = x.size()[1];
        let c = classes as i64;
        let yt = Tensor::from_slice(y);
        let f = |theta: &Tensor| -> (f64, Tensor) {
            let t = theta.detach().set_requires_grad(true);
            let w = t.narrow(0, 0, c * d).view([c, d]);
            let b = t.narrow(0, c * d, c);
            let logits = x.matmul(&w.transpose(0, 1)) + b;
            let loss =
                logits.cross_entropy_for_logits(&yt) + w.square().sum(Kind::Double) * (l2 / 2.0);
            loss.backward();
            (loss.double_value(&[]), t.grad().detach())
        };
        let mut theta = Tensor::zeros([c * d + c], (Kind::Double, tch::Device::Cpu));
        let (mut fx, mut g) = f(&theta);
        let mut s_hist: Vec<Tensor> = Vec::new();
        let mut y_hist: Vec<Tensor> = Vec::new();
        let mut converged = false;
        let mut it = 0;
        let dot = |a: &Tensor, b: &Tensor| (a * b).sum(Kind::Double).double_value(&[]);
        while it < max_iter {
            it += 1;
            let gnorm = g.abs().max().double_value(&[]);
            if gnorm < 1e-6 {
                converged = true;
                break;
            }
            // two-loop recursion (q is updated in place: a copy, not a view of g)
            let mut q = g.copy();
            let mut alphas = Vec::with_capacity(s_hist.len());
            for (s, yv) in s_hist.iter().zip(&y_hist).rev() {
                let rho = 1.0 / dot(yv, s);
                let a = rho * dot(s, &q);
                q -= yv * a;
                alphas.push((a, rho));
            }
            let gamma = match (s_hist.last(), y_hist.last()) {
                (Some(s), Some(yv)) => dot(s, yv) / dot(yv, yv),
                _ => 1.0 / g.norm().double_value(&[]).max(1e-12),
            };
            let mut r = q * gamma;
            for ((s, yv), (a, rho)) in s_hist.iter().zip(&y_hist).zip(alphas.into_iter().rev()) {
                let bcoef = rho * dot(yv, &r);
                r += s * (a - bcoef);
            }
            let dir = -r;
            let slope = dot(&g, &dir);
            let dir = if slope >= 0.0 {
                -g.shallow_clone()
            } else {
                dir
            };
            let slope = dot(&g, &dir);
            let mut step = 1.0;
            let (mut new_theta, mut nf, mut ng);
            let accepted = loop {
                new_theta = &theta + &dir * step;
                let r = f(&new_theta);
                nf = r.0;
                ng = r.1;
                if nf <= fx + 1e-4 * step * slope {
                    break true;
                }
                if step < 1e-12 {
                    break false;
                }
                step *= 0.5;
            };
            if !accepted {
                // The quasi-Newton direction failed: restart from steepest descent once; if even
                // that finds no decrease, the optimum is reached to machine precision.
                if s_hist.is_empty() {
                    converged = true;
                    break;
                }
                s_hist.clear();
                y_hist.clear();
                continue;
            }
            let s = &new_theta - &theta;
            let yv = &ng - &g;
            let sy = dot(&s, &yv);
            if sy > 1e-10 * dot(&yv, &yv).sqrt() * dot(&s, &s).sqrt() {
                s_hist.push(s);
                y_hist.push(yv);
                if s_hist.len() > 10 {
                    drop(s_hist.remove(0));
                    drop(y_hist.remove(0));
                }
            }
            theta = new_theta;
            fx = nf;
            g = ng;
        }
        let w = theta.narrow(0, 0, c * d).view([c, d]);
        let b = theta.narrow(0, c * d, c) - w.matmul(&mu.squeeze_dim(0));
        LinearProbe {
            weight: w.to_kind(Kind::Float),
            bias: b.to_kind(Kind::Float),
            iterations: it,
            converged,
        }
    }

    /// Logits [N, C].
    pub fn logits(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float).matmul(&self.weight.transpose(0, 1)) + &self.bias
    }

    pub fn predict(&self, x: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(self.logits(x).argmax(1, false)).expect("predictions")
    }
}

/// RedDino's probe regularisation for [`LinearProbe::fit`]'s mean objective: RedDino fits
/// scikit-learn's `LogisticRegression(C = 1 / l2)` with `l2 = 100 / (dim * classes)`, whose
/// objective is `C * sum CE + |W|^2 / 2`, i.e. `n * (mean CE + l2 / (2 n) |W|^2)`: the weight
/// here is RedDino's `l2` divided by the `n` training samples.
pub fn default_l2(dim: usize, classes: usize, n: usize) -> f64 {
    100.0 / (dim * classes) as f64 / n.max(1) as f64
}

/// Classification metrics.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub weighted_f1: f64,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub support: Vec<usize>,
    /// `confusion[truth][prediction]`.
    pub confusion: Vec<Vec<usize>>,
}

pub fn metrics(truth: &[i64], pred: &[i64], classes: usize) -> Metrics {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&t, &p) in truth.iter().zip(pred) {
        confusion[t as usize][p as usize] += 1;
    }
    let support: Vec<usize> = confusion.iter().map(|r| r.iter().sum()).collect();
    let predicted: Vec<usize> = (0..classes)
        .map(|c| confusion.iter().map(|r| r[c]).sum())
        .collect();
    let tp: Vec<usize> = (0..classes).map(|c| confusion[c][c]).collect();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let precision: Vec<f64> = (0..classes).map(|c| ratio(tp[c], predicted[c])).collect();
    let recall: Vec<f64> = (0..classes).map(|c| ratio(tp[c], support[c])).collect();
    let n = truth.len().max(1) as f64;
    let present: Vec<usize> = (0..classes).filter(|&c| support[c] > 0).collect();
    let balanced = present.iter().map(|&c| recall[c]).sum::<f64>() / present.len().max(1) as f64;
    let weighted_f1 = (0..classes)
        .map(|c| {
            let (p, r) = (precision[c], recall[c]);
            let f1 = if p + r > 0.0 {
                2.0 * p * r / (p + r)
            } else {
                0.0
            };
            f1 * support[c] as f64 / n
        })
        .sum();
    Metrics {
        accuracy: tp.iter().sum::<usize>() as f64 / n,
        balanced_accuracy: balanced,
        weighted_f1,
        precision,
        recall,
        support,
        confusion,
    }
}

/// scikit-learn's `StratifiedKFold(n_splits = k, shuffle = False)`, RedDino's cross-validation:
/// the test-fold index of every sample, identical to `test_folds` of sklearn's
/// `_make_test_folds` (classes numbered by first appearance; the sorted labels dealt round
/// the folds give each fold's count per class; each class's samples, in order, fill fold 0
/// first). A class with fewer than k samples is allowed, as sklearn allows it with a warning.
pub fn stratified_kfold(y: &[i64], k: usize) -> Result<Vec<usize>> {
    if k < 2 {
        bail!("k-fold needs k >= 2, got {k}");
    }
    if y.len() < k {
        bail!("{k}-fold needs at least {k} samples, got {}", y.len());
    }
    // Classes in order of first appearance (sklearn's y_encoded).
    let mut first: Vec<i64> = Vec::new();
    let enc: Vec<usize> = y
        .iter()
        .map(|v| match first.iter().position(|f| f == v) {
            Some(i) => i,
            None => {
                first.push(*v);
                first.len() - 1
            }
        })
        .collect();
    // sklearn numbers classes by sorted label, then renumbers by first appearance: the
    // sorted order that `y_order` deals is the order of first appearance.
    let classes = first.len();
    let mut sorted = enc.clone();
    sorted.sort_unstable();
    // allocation[c][f]: how many of class c fold f tests.
    let mut allocation = vec![vec![0usize; k]; classes];
    for (i, &c) in sorted.iter().enumerate() {
        allocation[c][i % k] += 1;
    }
    let mut fold = vec![0usize; y.len()];
    for (c, per_fold) in allocation.iter().enumerate() {
        let folds_for_class = per_fold
            .iter()
            .enumerate()
            .flat_map(|(f, &n)| std::iter::repeat_n(f, n));
        let members = (0..y.len()).filter(|&i| enc[i] == c);
        for (i, f) in members.zip(folds_for_class) {
            fold[i] = f;
        }
    }
    Ok(fold)
}

/// A stratified hold-out of `test_fraction` of the samples (RedDino's
/// `train_test_split(test_size = 0.2, stratify = y, random_state = 42)`): `true` for the test
/// side. The test size is `ceil(fraction * n)` as in scikit-learn, spread over the classes in
/// proportion (largest remainders); which samples of a class go is drawn with `seed` (this
/// generator, not numpy's, so the chosen samples differ from scikit-learn's).
pub fn stratified_holdout(y: &[i64], test_fraction: f64, seed: u64) -> Result<Vec<bool>> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        bail!("the test fraction must be in (0, 1), got {test_fraction}");
    }
    let n = y.len();
    let n_test = (test_fraction * n as f64).ceil() as usize;
    if n_test == 0 || n_test >= n {
        bail!("a {test_fraction} hold-out of {n} samples leaves a side empty");
    }
    let mut classes: Vec<i64> = y.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let members: Vec<Vec<usize>> = classes
        .iter()
        .map(|c| (0..n).filter(|&i| y[i] == *c).collect())
        .collect();
    let exact: Vec<f64> = members
        .iter()
        .map(|m| m.len() as f64 * n_test as f64 / n as f64)
        .collect();
    let mut take: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..classes.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let short = n_test - take.iter().sum::<usize>();
    for &c in order.iter().take(short) {
        take[c] += 1;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut test = vec![false; n];
    for (m, t) in members.into_iter().zip(take) {
        let mut m = m;
        m.shuffle(&mut rng);
        for &i in m.iter().take(t) {
            test[i] = true;
        }
    }
    Ok(test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        // truth 0,0,1,1,2 ; pred 0,1,1,1,0
        let m = metrics(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 3);
        assert_eq!(
            m.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]
        );
        assert!((m.accuracy - 0.6).abs() < 1e-12);
        assert!((m.balanced_accuracy - (0.5 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        // F1: class0 p=.5 r=.5 f=.5 (w .4); class1 p=2/3 r=1 f=.8 (w .4); class2 0
        assert!((m.weighted_f1 - (0.5 * 0.4 + 0.8 * 0.4)).abs() < 1e-12);
    }

    #[test]
    fn logistic_regression_separates_and_converges() {
        tch::manual_seed(1);
        let a = Tensor::randn([50, 2], (Kind::Float, tch::Device::Cpu)) + 3.0;
        let b = Tensor::randn([50, 2], (Kind::Float, tch::Device::Cpu)) - 3.0;
        let x = Tensor::cat(&[a, b], 0);
        let y: Vec<i64> = (0..100).map(|i| (i >= 50) as i64).collect();
        let p = LinearProbe::fit(&x, &y, 2, 1e-3, 200);
        assert!(p.converged, "{} iterations", p.iterations);
        let m = metrics(&y, &p.predict(&x), 2);
        assert!(m.accuracy > 0.97);
        // The gradient of the objective vanishes at the optimum (checked numerically).
        let w = p.weight.to_kind(Kind::Double).set_requires_grad(true);
        let bb = p.bias.to_kind(Kind::Double).set_requires_grad(true);
        let logits = x.to_kind(Kind::Double).matmul(&w.transpose(0, 1)) + &bb;
        let loss = logits.cross_entropy_for_logits(&Tensor::from_slice(&y))
            + w.square().sum(Kind::Double) * 5e-4;
        loss.backward();
        assert!(w.grad().abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn folds_are_sklearns_unshuffled_stratified_kfold() {
        // By hand from sklearn's _make_test_folds: classes 2 (first seen), 0, 1 with 4, 3
        // and 3 samples; sorted codes 0 0 0 0 1 1 1 2 2 2 dealt round 3 folds give
        // allocation fold0: [2,1,1], fold1: [1,1,1], fold2: [1,1,1].
        let y = [2, 0, 2, 1, 0, 2, 1, 0, 2, 1];
        let f = stratified_kfold(&y, 3).unwrap();
        assert_eq!(f, vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
        let y: Vec<i64> = (0..100).map(|i| (i % 4) as i64).collect();
        let f = stratified_kfold(&y, 5).unwrap();
        for k in 0..5 {
            for c in 0..4 {
                let n = (0..100).filter(|&i| f[i] == k && y[i] == c).count();
                assert_eq!(n, 5, "fold {k} class {c}");
            }
        }
        // Unshuffled: each class fills the folds in sample order.
        assert_eq!(&f[..8], &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(stratified_kfold(&y, 1).is_err());
    }

    #[test]
    fn holdout_is_stratified_and_seeded() {
        let y: Vec<i64> = (0..103)
            .map(|i| {
                if i < 80 {
                    0
                } else if i < 100 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let t = stratified_holdout(&y, 0.2, 42).unwrap();
        let count = |c: i64| (0..103).filter(|&i| t[i] && y[i] == c).count();
        assert_eq!(t.iter().filter(|&&b| b).count(), 21); // ceil(0.2 x 103)
        assert_eq!((count(0), count(1)), (16, 4));
        assert_eq!(t, stratified_holdout(&y, 0.2, 42).unwrap());
        assert_ne!(t, stratified_holdout(&y, 0.2, 7).unwrap());
        assert!(stratified_holdout(&y, 1.0, 42).is_err());
    }

    #[test]
    fn knn_on_separable_points() {
        let train = Tensor::from_slice(&[0.0f32, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0]).view([4, 2]);
        let test = Tensor::from_slice(&[0.05f32, 0.1, 4.9, 5.2, 0.2, 0.0]).view([3, 2]);
        assert_eq!(
            knn_accuracy(&train, &[0, 0, 1, 1], &test, &[0, 1, 0], 1),
            1.0
        );
        assert_eq!(
            knn_accuracy(&train, &[0, 0, 1, 1], &test, &[1, 1, 0], 1),
            2.0 / 3.0
        );
        // k = 3: two votes of the near class beat one of the far class.
        assert_eq!(
            knn_accuracy(&train, &[0, 0, 1, 1], &test, &[0, 1, 0], 3),
            1.0
        );
    }

    #[test]
    fn cosine_knn_weights_votes() {
        let train = Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, 0.0, 1.0]).view([3, 2]);
        let test = Tensor::from_slice(&[1.0f32, 0.05]).view([1, 2]);
        assert_eq!(
            knn_predict(
                &train,
                &[0, 0, 1],
                &test,
                3,
                Knn::Cosine { temperature: 0.07 },
                2
            ),
            vec![0]
        );
        assert_eq!(
            knn_predict(&train, &[1, 0, 0], &test, 1, Knn::Euclidean, 2),
            vec![1]
        );
    }
}
