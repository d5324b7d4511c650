//! The Markdown of the evaluation and score reports.

use super::{ProtocolReport, ScoreReport};
use crate::eval::Metrics;
use crate::labelled::LabelledSet;

/// The Markdown summary of pooled predictions: the three headline metrics, then recall,
/// precision and support per class.
pub fn cv_markdown(title: &str, set: &LabelledSet, m: &Metrics) -> String {
    let mut s = format!(
        "# {title}\n\n{} images, {} classes, {} folds.\n\n| accuracy | balanced accuracy | weighted F1 |\n|---:|---:|---:|\n| {:.3} | {:.3} | {:.3} |\n\n| class | recall | precision | support |\n|---|---:|---:|---:|\n",
        set.files.len(),
        set.class_names.len(),
        set.source_names.len(),
        m.accuracy,
        m.balanced_accuracy,
        m.weighted_f1
    );
    for (c, name) in set.class_names.iter().enumerate() {
        s += &format!(
            "| {name} | {:.3} | {:.3} | {} |\n",
            m.recall[c], m.precision[c], m.support[c]
        );
    }
    s
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
            s += &format!("\n## {} per held-out source\n\n| source | linear balanced accuracy | linear F1 | 1-NN F1 | 20-NN F1 |\n|---|---:|---:|---:|---:|\n", r.protocol);
            for (src, m) in &r.per_source {
                s += &format!(
                    "| {src} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                    m["linear_balanced_accuracy"],
                    m["linear_weighted_f1"],
                    m["knn1_weighted_f1"],
                    m["knn20_weighted_f1"]
                );
            }
        }
    }
    if let Some(r) = reports.first() {
        s += &format!(
            "\n## Confusion matrix (linear probe, {}; rows = truth)\n\n",
            r.protocol
        );
        s += &confusion_markdown(&set.class_names, &r.linear.confusion);
    }
    s
}

/// A confusion matrix as a Markdown table (rows = truth, columns = prediction).
pub fn confusion_markdown(names: &[String], confusion: &[Vec<usize>]) -> String {
    let mut s = "|  |".to_string();
    for c in names {
        s += &format!(" {c} |");
    }
    s += "\n|---|";
    s += &"---:|".repeat(names.len());
    s += "\n";
    for (i, row) in confusion.iter().enumerate() {
        s += &format!("| {} |", names[i]);
        for v in row {
            s += &format!(" {v} |");
        }
        s += "\n";
    }
    s
}

/// The Markdown summary of a [`ScoreReport`].
pub fn score_markdown(title: &str, class_names: &[String], r: &ScoreReport) -> String {
    let mut s = format!(
        "# {title}\n\n{} images.\n\n| source | images | accuracy | balanced accuracy | weighted F1 |\n|---|---:|---:|---:|---:|\n",
        r.images
    );
    let row = |name: &str, m: &Metrics| {
        format!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} |\n",
            m.support.iter().sum::<usize>(),
            m.accuracy,
            m.balanced_accuracy,
            m.weighted_f1
        )
    };
    if r.per_source.len() > 1 {
        for (name, m) in &r.per_source {
            s += &row(name, m);
        }
    }
    s += &row("all", &r.overall);
    s += "\n## Per class\n\n| class | support | precision | recall |\n|---|---:|---:|---:|\n";
    for (i, c) in class_names.iter().enumerate() {
        s += &format!(
            "| {c} | {} | {:.3} | {:.3} |\n",
            r.overall.support[i], r.overall.precision[i], r.overall.recall[i]
        );
    }
    s += "\n## Confusion matrix (rows = truth)\n\n";
    s += &confusion_markdown(class_names, &r.overall.confusion);
    s += "\n![confusion](confusion.png)\n";
    s
}
