//! Labelled crop folders, their features, and evaluation reports (JSON + Markdown) over the
//! protocols RedDino reports: a fixed split, stratified k-fold and leave-one-source-out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::data::image_files;
use crate::eval::{default_l2, knn_predict, metrics, stratified_folds, Knn, LinearProbe, Metrics};
use crate::probe::embed_images;
use crate::vit::Vit;

/// A folder of labelled crops: `root/{class}/*.png` or `root/{source}/{class}/*.png`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelledSet {
    pub files: Vec<PathBuf>,
    pub labels: Vec<i64>,
    /// Index into `source_names` (all 0 without a source level).
    pub sources: Vec<i64>,
    pub class_names: Vec<String>,
    pub source_names: Vec<String>,
}

impl LabelledSet {
    pub fn scan(root: &Path) -> Result<LabelledSet> {
        let files = image_files(root)?;
        if files.is_empty() {
            bail!("no images under {}", root.display());
        }
        let depth = |f: &Path| {
            f.strip_prefix(root)
                .map(|r| r.components().count())
                .unwrap_or(0)
        };
        let d = depth(&files[0]);
        if !(2..=3).contains(&d) || files.iter().any(|f| depth(f) != d) {
            bail!(
                "{}: expected {{class}}/image or {{source}}/{{class}}/image everywhere (found images at different depths)",
                root.display()
            );
        }
        let mut classes = BTreeMap::new();
        let mut sources = BTreeMap::new();
        for f in &files {
            let parts: Vec<String> = f
                .strip_prefix(root)
                .expect("under root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            classes.entry(parts[d - 2].clone()).or_insert(0);
            if d == 3 {
                sources.entry(parts[0].clone()).or_insert(0);
            }
        }
        let class_names: Vec<String> = classes.keys().cloned().collect();
        let source_names: Vec<String> = if d == 3 {
            sources.keys().cloned().collect()
        } else {
            vec!["all".into()]
        };
        let mut labels = Vec::new();
        let mut srcs = Vec::new();
        for f in &files {
            let parts: Vec<String> = f
                .strip_prefix(root)
                .expect("under root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            labels.push(
                class_names
                    .iter()
                    .position(|c| *c == parts[d - 2])
                    .expect("class") as i64,
            );
            srcs.push(if d == 3 {
                source_names
                    .iter()
                    .position(|s| *s == parts[0])
                    .expect("source") as i64
            } else {
                0
            });
        }
        Ok(LabelledSet {
            files,
            labels,
            sources: srcs,
            class_names,
            source_names,
        })
    }

    /// CLS features of every image, decoded and embedded `batch` at a time.
    pub fn embed(&self, vit: &Vit, device: Device, batch: usize) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in self.files.chunks(batch.max(1)) {
            let imgs = chunk
                .iter()
                .map(|p| {
                    Ok(image::open(p)
                        .with_context(|| format!("decoding {}", p.display()))?
                        .to_rgb8())
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(embed_images(vit, &imgs, device, batch));
        }
        Ok(Tensor::cat(&out, 0))
    }
}

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
    /// Every `test_every`-th sample of each class is held out.
    Split {
        test_every: usize,
    },
    KFold {
        k: usize,
        seed: u64,
    },
    LeaveOneSourceOut,
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
        Protocol::Split { test_every } => {
            let mut seen = vec![0usize; classes];
            set.labels
                .iter()
                .map(|&y| {
                    seen[y as usize] += 1;
                    usize::from(seen[y as usize] % test_every.max(&2) == 0)
                })
                .collect()
        }
        Protocol::KFold { k, seed } => stratified_folds(&set.labels, *k, *seed)?,
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
        let probe = LinearProbe::fit(&xtr, &ytr, classes, default_l2(d, classes), 2000);
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
            Protocol::Split { test_every } => {
                format!("split (every {test_every}th sample of each class held out)")
            }
            Protocol::KFold { k, .. } => format!("stratified {k}-fold"),
            Protocol::LeaveOneSourceOut => "leave-one-source-out".into(),
        },
        linear: metrics(&truth, &lin, classes),
        knn1: metrics(&truth, &k1, classes),
        knn20: metrics(&truth, &k20, classes),
        per_source,
    })
}

/// The Markdown summary of a report.
pub fn markdown(title: &str, set: &LabelledSet, reports: &[ProtocolReport]) -> String {
    let mut s = format!(
        "# {title}\n\n{} images, {} classes, {} sources.\n\n| protocol | probe | accuracy | balanced accuracy | weighted F1 |\n|---|---|---:|---:|---:|\n",
        set.files.len(),
        set.class_names.len(),
        set.source_names.len()
    );
    for r in reports {
        for (name, m) in [
            ("linear", &r.linear),
            ("1-NN", &r.knn1),
            ("20-NN", &r.knn20),
        ] {
            s += &format!(
                "| {} | {name} | {:.3} | {:.3} | {:.3} |\n",
                r.protocol, m.accuracy, m.balanced_accuracy, m.weighted_f1
            );
        }
    }
    for r in reports {
        if !r.per_source.is_empty() {
            s += &format!("\n## {} per held-out source\n\n| source | linear F1 | 1-NN F1 | 20-NN F1 |\n|---|---:|---:|---:|\n", r.protocol);
            for (src, m) in &r.per_source {
                s += &format!(
                    "| {src} | {:.3} | {:.3} | {:.3} |\n",
                    m["linear_weighted_f1"], m["knn1_weighted_f1"], m["knn20_weighted_f1"]
                );
            }
        }
    }
    if let Some(r) = reports.first() {
        s += &format!(
            "\n## Confusion matrix (linear probe, {}; rows = truth)\n\n|  |",
            r.protocol
        );
        for c in &set.class_names {
            s += &format!(" {c} |");
        }
        s += "\n|---|";
        s += &"---:|".repeat(set.class_names.len());
        s += "\n";
        for (i, row) in r.linear.confusion.iter().enumerate() {
            s += &format!("| {} |", set.class_names[i]);
            for v in row {
                s += &format!(" {v} |");
            }
            s += "\n";
        }
    }
    s
}
