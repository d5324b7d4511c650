//! Offline analysis of one image: find cells, crop, preprocess, run the model in batches,
//! classify and count.

use std::collections::BTreeMap;

use image::RgbImage;
use reddino_models::preprocess::{preprocess_into, square_crop, Normalization};
use serde::Serialize;

use crate::cells::{self, CellFinderConfig};
use crate::classify::{classify, Counts, UNCERTAIN};
use crate::infer::Backend;

/// Settings of the analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeConfig {
    pub cells: CellFinderConfig,
    /// Crop side as a multiple of the cell's box.
    pub margin: f32,
    /// Below this top probability a cell counts as uncertain.
    pub min_confidence: f32,
}

impl Default for AnalyzeConfig {
    fn default() -> Self {
        AnalyzeConfig {
            cells: CellFinderConfig::default(),
            margin: 1.3,
            min_confidence: 0.5,
        }
    }
}

/// One classified cell in the report.
#[derive(Debug, Clone, Serialize)]
pub struct CellReport {
    pub bbox: [u32; 4],
    pub class: String,
    pub confidence: f32,
}

/// Result for one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub image: String,
    pub width: u32,
    pub height: u32,
    /// Cells per class name (and `uncertain`).
    pub counts: BTreeMap<String, u64>,
    pub cells: Vec<CellReport>,
}

/// Analyses one image with a backend whose head has `class_names`.
pub fn analyze_image(
    name: &str,
    img: &RgbImage,
    backend: &mut dyn Backend,
    class_names: &[String],
    norm: &Normalization,
    cfg: &AnalyzeConfig,
) -> Result<ImageReport, reddino_models::Error> {
    let found = cells::find(img, &cfg.cells);
    let size = backend.input_size();
    let per = 3 * size * size;
    let batch = backend.batch_size().max(1);
    let mut counts = Counts::new(class_names.len());
    let mut reports = Vec::with_capacity(found.len());
    let mut pixels = vec![0f32; batch * per];
    for chunk in found.chunks(batch) {
        for (i, cell) in chunk.iter().enumerate() {
            let crop = square_crop(img, cell.bbox, cfg.margin);
            preprocess_into(
                &crop,
                size as u32,
                norm,
                &mut pixels[i * per..(i + 1) * per],
            );
        }
        let out = backend.run(&pixels[..chunk.len() * per], chunk.len())?;
        let logits = out.logits.ok_or_else(|| {
            reddino_models::Error::Inference(
                "the model has no classification head (`logits` output)".into(),
            )
        })?;
        if out.classes != class_names.len() {
            return Err(reddino_models::Error::Inference(format!(
                "the model gives {} logits, the bundle lists {} classes",
                out.classes,
                class_names.len()
            )));
        }
        for (i, cell) in chunk.iter().enumerate() {
            let p = classify(
                &logits[i * out.classes..(i + 1) * out.classes],
                cfg.min_confidence,
            );
            counts.add(&p);
            reports.push(CellReport {
                bbox: cell.bbox,
                class: p
                    .class
                    .map(|c| class_names[c].clone())
                    .unwrap_or_else(|| UNCERTAIN.into()),
                confidence: p.confidence,
            });
        }
    }
    let mut by_name: BTreeMap<String, u64> = class_names
        .iter()
        .cloned()
        .zip(counts.per_class.iter().copied())
        .collect();
    by_name.insert(UNCERTAIN.into(), counts.uncertain);
    Ok(ImageReport {
        image: name.into(),
        width: img.width(),
        height: img.height(),
        counts: by_name,
        cells: reports,
    })
}
