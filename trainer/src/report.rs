//! Labelled crop folders, their features, and evaluation reports (JSON + Markdown) over the
//! protocols RedDino reports: a fixed split, stratified k-fold and leave-one-source-out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
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

/// The class order of a labelled folder: its `classes.txt` (one name per line, `#` comments;
/// written by `reddino-edge import` in the data set's order), if it has one.
fn class_order(root: &Path) -> Result<Option<Vec<String>>> {
    let path = root.join("classes.txt");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut order: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if order.iter().any(|o| o == name) {
            bail!("{}:{}: class {name:?} listed twice", path.display(), i + 1);
        }
        order.push(name.to_string());
    }
    Ok(Some(order))
}

impl LabelledSet {
    /// The crops of `root` (`{class}/image` or `{source}/{class}/image`): classes in the order
    /// of `root/classes.txt` when there is one (the classes it lists without crops left out),
    /// else by name; sources by name.
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
        // (class, source) folder names of every file, split once.
        let names: Vec<(String, String)> = files
            .iter()
            .map(|f| {
                let parts: Vec<String> = f
                    .strip_prefix(root)
                    .expect("under root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().to_string())
                    .collect();
                let source = if d == 3 {
                    parts[0].clone()
                } else {
                    "all".into()
                };
                (parts[d - 2].clone(), source)
            })
            .collect();
        let index = |pick: fn(&(String, String)) -> &String| -> BTreeMap<String, i64> {
            let mut m: BTreeMap<String, i64> = names.iter().map(|n| (pick(n).clone(), 0)).collect();
            for (i, v) in m.values_mut().enumerate() {
                *v = i as i64;
            }
            m
        };
        let classes = match class_order(root)? {
            Some(order) => {
                let present: std::collections::BTreeSet<&String> =
                    names.iter().map(|n| &n.0).collect();
                if let Some(c) = present.iter().find(|c| !order.contains(c)) {
                    bail!(
                        "{}: class folder {c:?} is not in classes.txt (it lists {})",
                        root.display(),
                        order.join(", ")
                    );
                }
                order
                    .iter()
                    .filter(|c| present.contains(c))
                    .enumerate()
                    .map(|(i, c)| (c.clone(), i as i64))
                    .collect()
            }
            None => index(|n| &n.0),
        };
        let sources = index(|n| &n.1);
        let labels = names.iter().map(|n| classes[&n.0]).collect();
        let srcs = names.iter().map(|n| sources[&n.1]).collect();
        let mut class_names: Vec<(String, i64)> = classes.into_iter().collect();
        class_names.sort_by_key(|c| c.1);
        let class_names = class_names.into_iter().map(|c| c.0).collect();
        let source_names = sources.into_keys().collect();
        Ok(LabelledSet {
            files,
            labels,
            sources: srcs,
            class_names,
            source_names,
        })
    }

    /// The crops whose source `keep` accepts, with every class and source name kept (labels
    /// and sources keep their indices).
    pub fn select(&self, keep: impl Fn(i64) -> bool) -> LabelledSet {
        let idx: Vec<usize> = (0..self.files.len())
            .filter(|&i| keep(self.sources[i]))
            .collect();
        LabelledSet {
            files: idx.iter().map(|&i| self.files[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            sources: idx.iter().map(|&i| self.sources[i]).collect(),
            class_names: self.class_names.clone(),
            source_names: self.source_names.clone(),
        }
    }

    /// The normalised pixels of every image at `size` x `size` (the model's preprocessing),
    /// flattened: the raw-pixel baseline, [N, 3 x size x size].
    pub fn pixels(&self, size: u32) -> Result<Tensor> {
        let norm = reddino_models::preprocess::Normalization::default();
        let mut data = Vec::with_capacity(self.files.len() * 3 * (size * size) as usize);
        for p in &self.files {
            let img = image::open(p)
                .with_context(|| format!("decoding {}", p.display()))?
                .to_rgb8();
            data.extend(reddino_models::preprocess::preprocess(&img, size, &norm));
        }
        Ok(Tensor::from_slice(&data).view([self.files.len() as i64, -1]))
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

/// Distinct colours (Tableau 20) for classes and sources in the plots.
pub const PALETTE: [[u8; 3]; 20] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
    [152, 223, 138],
    [255, 152, 150],
    [197, 176, 213],
    [196, 156, 148],
    [247, 182, 210],
    [199, 199, 199],
    [219, 219, 141],
    [158, 218, 229],
];

/// `#rrggbb` of palette entry `i`.
pub fn colour_hex(i: usize) -> String {
    let c = PALETTE[i % PALETTE.len()];
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Draws `text` in the 8 x 8 bitmap font with its top-left corner at (`x`, `y`), or, when
/// `upward`, rotated to read bottom to top with its bottom-left corner at (`x`, `y`). Pixels
/// outside the image are skipped; characters the font lacks are drawn as `?`.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, colour: Rgb<u8>, upward: bool) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (r, bits) in glyph.iter().enumerate() {
            for c in 0..8 {
                if bits & (1 << c) == 0 {
                    continue;
                }
                let (px, py) = if upward {
                    (x + r as i64, y - 8 * i as i64 - c as i64)
                } else {
                    (x + 8 * i as i64 + c as i64, y + r as i64)
                };
                if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                    img.put_pixel(px as u32, py as u32, colour);
                }
            }
        }
    }
}

/// Width in pixels of `text` in the 8 x 8 font.
fn text_width(text: &str) -> u32 {
    8 * text.chars().count() as u32
}

/// Where [`confusion_png`] puts its grid: the top-left pixel of the matrix and the side of one
/// cell, for `names` and the largest count in the matrix.
pub fn confusion_layout(names: &[String], max_count: usize) -> (u32, u32, u32) {
    let label = names.iter().map(|n| text_width(n)).max().unwrap_or(0);
    let cell = 32u32.max(text_width(&max_count.to_string()) + 6);
    // Left: "truth" written upward, then the row names; top: the title, "prediction", then
    // the column names written upward.
    (12 + label + 8, 12 + 12 + label + 8, cell)
}

/// The confusion matrix as a labelled heat map: rows = truth, columns = prediction, in the
/// order of `names`; row-normalised shading, white (0) to dark blue (1), with the count in
/// every non-empty cell.
pub fn confusion_png(confusion: &[Vec<usize>], names: &[String]) -> RgbImage {
    let n = confusion.len() as u32;
    let max_count = confusion.iter().flatten().copied().max().unwrap_or(0);
    let (ox, oy, cell) = confusion_layout(names, max_count);
    let (w, h) = (ox + n * cell + 9, oy + n * cell + 9);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let black = Rgb([0, 0, 0]);
    draw_text(&mut img, ox as i64, 4, "prediction", black, false);
    draw_text(
        &mut img,
        2,
        (oy + n * cell / 2 + text_width("truth") / 2) as i64,
        "truth",
        black,
        true,
    );
    let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| i.to_string());
    for i in 0..n as usize {
        let label = name(i);
        let centre = (i as u32 * cell + cell / 2) as i64;
        // Row names right-aligned against the grid; column names upward above it.
        let x = ox as i64 - 6 - text_width(&label) as i64;
        draw_text(&mut img, x, oy as i64 + centre - 4, &label, black, false);
        draw_text(
            &mut img,
            ox as i64 + centre - 4,
            oy as i64 - 6,
            &label,
            black,
            true,
        );
    }
    // Grid lines, then the cells.
    for y in oy..=oy + n * cell {
        for x in ox..=ox + n * cell {
            img.put_pixel(x, y, Rgb([200, 200, 200]));
        }
    }
    for (i, row) in confusion.iter().enumerate() {
        let total: usize = row.iter().sum();
        for (j, &v) in row.iter().enumerate() {
            let f = if total == 0 {
                0.0
            } else {
                v as f32 / total as f32
            };
            let c = Rgb([
                (255.0 * (1.0 - f) + 8.0 * f) as u8,
                (255.0 * (1.0 - f) + 48.0 * f) as u8,
                (255.0 * (1.0 - f) + 107.0 * f) as u8,
            ]);
            let (x0, y0) = (ox + j as u32 * cell, oy + i as u32 * cell);
            for y in 1..cell {
                for x in 1..cell {
                    img.put_pixel(x0 + x, y0 + y, c);
                }
            }
            if v > 0 {
                let text = v.to_string();
                let ink = if f > 0.5 { Rgb([255, 255, 255]) } else { black };
                let tx = x0 + (cell - text_width(&text)) / 2;
                draw_text(
                    &mut img,
                    tx as i64,
                    (y0 + cell / 2 - 4) as i64,
                    &text,
                    ink,
                    false,
                );
            }
        }
    }
    img
}

/// First two principal components of `features` ([N, D]).
pub fn pca2(features: &Tensor) -> Vec<[f32; 2]> {
    let x = features.to_kind(tch::Kind::Double).to_device(Device::Cpu);
    let x = &x - x.mean_dim([0i64].as_slice(), true, tch::Kind::Double);
    let (_, _, v) = x.svd(true, true); // v: [D, min(N, D)], columns = principal axes
    let k = v.size()[1].min(2);
    let p = x.matmul(&v.narrow(1, 0, k));
    let v = Vec::<f64>::try_from(p.flatten(0, -1)).expect("projection");
    (0..x.size()[0] as usize)
        .map(|i| {
            let a = v[i * k as usize] as f32;
            let b = if k > 1 {
                v[i * k as usize + 1] as f32
            } else {
                0.0
            };
            [a, b]
        })
        .collect()
}

/// A scatter plot of 2-D points coloured by `group` (palette index into `names`), 512 x 512,
/// with a colour key of `names` on its right.
pub fn scatter_png(points: &[[f32; 2]], group: &[i64], names: &[String]) -> RgbImage {
    let size = 512u32;
    let margin = 16.0;
    let key_width = 28 + names.iter().map(|n| text_width(n)).max().unwrap_or(0);
    let height = size.max(16 + 14 * names.len() as u32);
    let mut img = RgbImage::from_pixel(size + key_width, height, Rgb([255, 255, 255]));
    let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
    for p in points {
        for a in 0..2 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a]);
        }
    }
    let span = |a: usize| (hi[a] - lo[a]).max(1e-12);
    for (p, &g) in points.iter().zip(group) {
        let x = margin + (p[0] - lo[0]) / span(0) * (size as f32 - 2.0 * margin);
        let y = size as f32 - margin - (p[1] - lo[1]) / span(1) * (size as f32 - 2.0 * margin);
        let c = Rgb(PALETTE[g as usize % PALETTE.len()]);
        for dy in -2i32..=2 {
            for dx in -2i32..=2 {
                if dx * dx + dy * dy <= 5 {
                    let (px, py) = (x as i32 + dx, y as i32 + dy);
                    if px >= 0 && py >= 0 && (px as u32) < size && (py as u32) < size {
                        img.put_pixel(px as u32, py as u32, c);
                    }
                }
            }
        }
    }
    for (i, name) in names.iter().enumerate() {
        let y = 12 + 14 * i as u32;
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        for dy in 0..8 {
            for dx in 0..8 {
                img.put_pixel(size + 4 + dx, y + dy, c);
            }
        }
        draw_text(
            &mut img,
            (size + 16) as i64,
            y as i64,
            name,
            Rgb([0, 0, 0]),
            false,
        );
    }
    img
}

/// Writes confusion.png, pca_class.png and pca_source.png into `dir` and returns the Markdown
/// that shows them with their colour keys.
pub fn write_plots(
    dir: &Path,
    features: &Tensor,
    set: &LabelledSet,
    report: &ProtocolReport,
) -> Result<String> {
    confusion_png(&report.linear.confusion, &set.class_names).save(dir.join("confusion.png"))?;
    let pts = pca2(features);
    scatter_png(&pts, &set.labels, &set.class_names).save(dir.join("pca_class.png"))?;
    scatter_png(&pts, &set.sources, &set.source_names).save(dir.join("pca_source.png"))?;
    let key = |names: &[String]| {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n} `{}`", colour_hex(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "\n## Plots\n\nConfusion matrix of the linear probe ({}; rows = truth, columns = \
         prediction, counts in the cells, shading row-normalised from white 0 to dark blue 1):\n\n![confusion](confusion.png)\n\n\
         Features projected on their first two principal components, coloured by class \
         ({}):\n\n![pca by class](pca_class.png)\n\nand by source ({}):\n\n![pca by source](pca_source.png)\n",
        report.protocol,
        key(&set.class_names),
        key(&set.source_names)
    ))
}
