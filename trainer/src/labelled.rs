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
