//! Evaluation reports over the protocols RedDino reports (a fixed split, stratified k-fold and
//! leave-one-source-out) and a classifier's scores: the runs here, their Markdown in
//! [`markdown`], their pictures in [`plots`].

mod markdown;
mod plots;

use std::collections::BTreeMap;

use crate::bail;
use crate::error::Result;
use serde::Serialize;
use tch::Tensor;

use crate::eval::{
    default_l2, knn_predict, metrics, stratified_holdout, stratified_kfold, Knn, LinearProbe,
    Metrics,
};
use crate::labelled::LabelledSet;

pub use markdown::{confusion_markdown, cv_markdown, markdown, score_markdown};
pub use plots::{colour_hex, confusion_png, heat_colour, pca2, scatter_png, write_plots, PALETTE};

/// Results of one protocol.
#[derive(Debug, Clone, Serialize)]
pub struct ProtocolReport {
    pub protocol: String,
    pub linear: Metrics,
    pub knn1: Metrics,
    pub knn20: Metrics,
    /// Per held-out source (leave-one-source-out only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub per_source: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Which samples train and which test, per fold.
pub enum Protocol {
    /// A stratified hold-out of `test_fraction` of the samples ([`stratified_holdout`];
    /// RedDino: 0.2, seed 42).
    Split {
        test_fraction: f64,
        seed: u64,
    },
    /// scikit-learn's unshuffled `StratifiedKFold(k)` ([`stratified_kfold`]), RedDino's.
    KFold {
        k: usize,
    },
    LeaveOneSourceOut,
}

impl Protocol {
    /// RedDino's hold-out: 20% of each class, seed 42.
    pub const REDDINO_SPLIT: Protocol = Protocol::Split {
        test_fraction: 0.2,
        seed: 42,
    };
    /// RedDino's cross-validation: 5 unshuffled stratified folds.
    pub const REDDINO_KFOLD: Protocol = Protocol::KFold { k: 5 };
}

fn select(x: &Tensor, idx: &[usize]) -> Tensor {
    x.index_select(
        0,
        &Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>()),
    )
}

/// Runs the three probes (linear, 1-NN, 20-NN) under `protocol`, pooling the predictions of
/// every fold into one set of metrics.
pub fn evaluate(
    features: &Tensor,
    set: &LabelledSet,
    protocol: &Protocol,
    knn: Knn,
) -> Result<ProtocolReport> {
    let n = set.labels.len();
    let classes = set.class_names.len();
    let folds: Vec<usize> = match protocol {
        Protocol::Split {
            test_fraction,
            seed,
        } => stratified_holdout(&set.labels, *test_fraction, *seed)?
            .into_iter()
            .map(usize::from)
            .collect(),
        Protocol::KFold { k } => stratified_kfold(&set.labels, *k)?,
        Protocol::LeaveOneSourceOut => {
            if set.source_names.len() < 2 {
                bail!("leave-one-source-out needs at least two sources ({{source}}/{{class}}/image folders)");
            }
            set.sources.iter().map(|&s| s as usize).collect()
        }
    };
    let n_folds = folds.iter().copied().max().unwrap_or(0) + 1;
    let test_folds: Vec<usize> = match protocol {
        Protocol::Split { .. } => vec![1],
        _ => (0..n_folds).collect(),
    };
    let (mut truth, mut lin, mut k1, mut k20) = (vec![], vec![], vec![], vec![]);
    let mut per_source = BTreeMap::new();
    let d = features.size()[1] as usize;
    for f in test_folds {
        let tr: Vec<usize> = (0..n).filter(|&i| folds[i] != f).collect();
        let te: Vec<usize> = (0..n).filter(|&i| folds[i] == f).collect();
        if tr.is_empty() || te.is_empty() {
            continue;
        }
        let (xtr, xte) = (select(features, &tr), select(features, &te));
        let ytr: Vec<i64> = tr.iter().map(|&i| set.labels[i]).collect();
        let yte: Vec<i64> = te.iter().map(|&i| set.labels[i]).collect();
        let probe = LinearProbe::fit(&xtr, &ytr, classes, default_l2(d, classes, tr.len()), 2000);
        let p_lin = probe.predict(&xte);
        let p1 = knn_predict(&xtr, &ytr, &xte, 1, knn, classes);
        let p20 = knn_predict(&xtr, &ytr, &xte, 20, knn, classes);
        if matches!(protocol, Protocol::LeaveOneSourceOut) {
            let mut m = BTreeMap::new();
            m.insert(
                "linear_weighted_f1".into(),
                metrics(&yte, &p_lin, classes).weighted_f1,
            );
            m.insert(
                "knn1_weighted_f1".into(),
                metrics(&yte, &p1, classes).weighted_f1,
            );
            m.insert(
                "knn20_weighted_f1".into(),
                metrics(&yte, &p20, classes).weighted_f1,
            );
            m.insert(
                "linear_balanced_accuracy".into(),
                metrics(&yte, &p_lin, classes).balanced_accuracy,
            );
            per_source.insert(set.source_names[f].clone(), m);
        }
        truth.extend(yte);
        lin.extend(p_lin);
        k1.extend(p1);
        k20.extend(p20);
    }
    if truth.is_empty() {
        bail!("the protocol left no test samples");
    }
    Ok(ProtocolReport {
        protocol: match protocol {
            Protocol::Split {
                test_fraction,
                seed,
            } => format!(
                "split ({:.0}% of each class held out, seed {seed})",
                test_fraction * 100.0
            ),
            Protocol::KFold { k } => format!("stratified {k}-fold (unshuffled)"),
            Protocol::LeaveOneSourceOut => "leave-one-source-out".into(),
        },
        linear: metrics(&truth, &lin, classes),
        knn1: metrics(&truth, &k1, classes),
        knn20: metrics(&truth, &k20, classes),
        per_source,
    })
}

/// A classifier's scores on a labelled set, overall and per source.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub images: usize,
    pub overall: Metrics,
    pub per_source: BTreeMap<String, Metrics>,
}

/// Scores predictions `pred` against `truth` (both indices into `class_names`).
pub fn score_report(
    set: &LabelledSet,
    class_names: &[String],
    truth: &[i64],
    pred: &[i64],
) -> ScoreReport {
    let classes = class_names.len();
    let mut per_source = BTreeMap::new();
    for (si, name) in set.source_names.iter().enumerate() {
        let idx: Vec<usize> = (0..truth.len())
            .filter(|&i| set.sources[i] == si as i64)
            .collect();
        let t: Vec<i64> = idx.iter().map(|&i| truth[i]).collect();
        let p: Vec<i64> = idx.iter().map(|&i| pred[i]).collect();
        per_source.insert(name.clone(), metrics(&t, &p, classes));
    }
    ScoreReport {
        images: truth.len(),
        overall: metrics(truth, pred, classes),
        per_source,
    }
}
