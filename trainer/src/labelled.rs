//! A folder of labelled crops (`{class}/image` or `{source}/{class}/image`, the layout
//! `reddino-edge import` writes), its raw pixels and its features.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bail;
use crate::error::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::data::image_files;
use crate::probe::embed_images;
use crate::vit::Vit;
use reddino_models::cellsize::FEATURES;

/// A folder of labelled crops: `root/{class}/*.png` or `root/{source}/{class}/*.png`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelledSet {
    pub files: Vec<PathBuf>,
    pub labels: Vec<i64>,
    /// Index into `source_names` (all 0 without a source level).
    pub sources: Vec<i64>,
    pub class_names: Vec<String>,
    pub source_names: Vec<String>,
    /// Each crop's cell box in its field (`[x0, y0, x1, y1]` pixels), from the folder's
    /// `crops.csv` as `reddino-edge import` writes it for labelled fields; `None` for a crop
    /// the table does not list (or without a table).
    #[serde(default)]
    pub boxes: Vec<Option<[u32; 4]>>,
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

/// The cell box of each of `files` from `root/crops.csv` (columns `file`, `x0`, `y0`, `x1`,
/// `y1`; `file` relative to `root`), in order; empty when there is no table or it has no box
/// columns (crops imported as class folders).
fn crop_boxes(root: &Path, files: &[PathBuf]) -> Result<Vec<Option<[u32; 4]>>> {
    let path = root.join("crops.csv");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bad = |line: String, e: csv::Error| {
        crate::error::Error::Invalid(format!("{}:{line}: {e}", path.display()))
    };
    let mut reader = csv::Reader::from_path(&path).map_err(|e| bad("1".into(), e))?;
    let header = reader.headers().map_err(|e| bad("1".into(), e))?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(file), Some(x0), Some(y0), Some(x1), Some(y1)) =
        (col("file"), col("x0"), col("y0"), col("x1"), col("y1"))
    else {
        return Ok(Vec::new());
    };
    let mut by_file = std::collections::HashMap::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| bad(line.to_string(), e))?;
        let mut b = [0u32; 4];
        for (v, c) in b.iter_mut().zip([x0, y0, x1, y1]) {
            let cell = row.get(c).unwrap_or("");
            *v = cell.trim().parse().map_err(|_| {
                crate::error::Error::Invalid(format!(
                    "{}:{line}: box coordinate {cell:?} is not a whole number of pixels",
                    path.display()
                ))
            })?;
        }
        if b[2] <= b[0] || b[3] <= b[1] {
            bail!("{}:{line}: empty box {b:?}", path.display());
        }
        by_file.insert(root.join(row.get(file).unwrap_or("")), b);
    }
    Ok(files.iter().map(|f| by_file.get(f).copied()).collect())
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
        let boxes = crop_boxes(root, &files)?;
        Ok(LabelledSet {
            files,
            labels,
            sources: srcs,
            class_names,
            source_names,
            boxes,
        })
    }

    /// The [`reddino_models::cellsize::features`] of every crop's cell at `um_per_px`, `[N, 2]`;
    /// an error names the first crop whose box is unknown.
    pub fn size_features(&self, um_per_px: f32) -> Result<Tensor> {
        if self.boxes.len() != self.files.len() {
            bail!("no cell boxes for these crops (no crops.csv): the size input needs crops imported from labelled fields by `reddino-edge import`");
        }
        let mut data = Vec::with_capacity(self.files.len() * FEATURES);
        for (i, b) in self.boxes.iter().enumerate() {
            let Some(b) = b else {
                bail!(
                    "{}: the cell's box is unknown (not in the folder's crops.csv): the size input needs crops imported from labelled fields by `reddino-edge import`",
                    self.files[i].display()
                );
            };
            data.extend(reddino_models::cellsize::features(*b, um_per_px));
        }
        Ok(Tensor::from_slice(&data).view([self.files.len() as i64, FEATURES as i64]))
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
            boxes: if self.boxes.is_empty() {
                Vec::new()
            } else {
                idx.iter().map(|&i| self.boxes[i]).collect()
            },
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
            out.push(embed_images(vit, &decode(chunk)?, device, batch));
        }
        Ok(Tensor::cat(&out, 0))
    }
}

/// Decodes crop files to RGB, naming the file that does not decode.
pub fn decode(paths: &[PathBuf]) -> Result<Vec<image::RgbImage>> {
    paths
        .iter()
        .map(|p| {
            Ok(image::open(p)
                .with_context(|| format!("decoding {}", p.display()))?
                .to_rgb8())
        })
        .collect()
}
