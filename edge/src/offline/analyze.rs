//! Offline analysis of one image: find cells, crop, preprocess, run the model in batches,
//! classify and count.

use std::collections::BTreeMap;

use image::RgbImage;
use reddino_models::preprocess::Normalization;
use serde::Serialize;

use crate::cells::CellFinderConfig;
use crate::classify::{Counts, UNCERTAIN};
use crate::crop::{find_and_crop, CropPolicy};
use crate::infer::{classify_crops, Backend};

/// Settings of the analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeConfig {
    pub cells: CellFinderConfig,
    /// How cells are cut: the model's policy (`Manifest::crop_policy`) at the device's margin.
    pub crop: CropPolicy,
    /// Below this top probability a cell counts as uncertain.
    pub min_confidence: f32,
}

impl Default for AnalyzeConfig {
    fn default() -> Self {
        AnalyzeConfig {
            cells: CellFinderConfig::default(),
            crop: CropPolicy::default(),
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
    let (found, crops) = find_and_crop(img, &cfg.cells, &cfg.crop);
    let predictions = classify_crops(&crops, backend, class_names, norm, cfg.min_confidence)?;
    let mut counts = Counts::new(class_names.len());
    let reports = found
        .iter()
        .zip(&predictions)
        .map(|(cell, p)| {
            counts.add(p);
            CellReport {
                bbox: cell.bbox,
                class: p
                    .class
                    .map(|c| class_names[c].clone())
                    .unwrap_or_else(|| UNCERTAIN.into()),
                confidence: p.confidence,
            }
        })
        .collect();
    let by_name = counts.by_name(class_names);
    Ok(ImageReport {
        image: name.into(),
        width: img.width(),
        height: img.height(),
        counts: by_name,
        cells: reports,
    })
}
