//! Labelled training crops cut the way the service cuts them: synthetic fields go through the
//! service's own cell finder, each detection is cropped as `analyze` crops it, and it takes
//! the class of the true cell whose centre it lands on (within half that cell's radius;
//! detections matching no cell, e.g. a cluster found as one blob, are left out). A classifier
//! trained on these sees in training what it will see on the device, including the boxes of
//! cells touching a neighbour or carrying a platelet.

use std::path::PathBuf;

use image::imageops::FilterType;
use reddino_models::preprocess::square_crop;
use reddino_models::synth::{render, ClassMix, FieldSpec, SourcePreset, NUM_CLASSES};
use reddino_models::taxonomy::DEFAULT_CLASSES;

use crate::cells::{self, CellFinderConfig};

/// What to write.
#[derive(Debug, Clone)]
pub struct DetectedCrops {
    pub out_dir: PathBuf,
    pub sources: Vec<SourcePreset>,
    /// Crops per class and source.
    pub per_class: usize,
    /// Side of the saved crops in pixels.
    pub size: u32,
    /// Crop side as a multiple of the detection's box (the service's `analysis.margin`).
    pub margin: f32,
    pub seed: u64,
    pub field_size: (u32, u32),
    pub finder: CellFinderConfig,
}

impl DetectedCrops {
    /// Defaults: 96 px crops, margin 1.3, 1280x960 fields, the service's finder settings.
    pub fn new(out_dir: PathBuf, sources: Vec<SourcePreset>, per_class: usize, seed: u64) -> Self {
        DetectedCrops {
            out_dir,
            sources,
            per_class,
            size: 96,
            margin: 1.3,
            seed,
            field_size: (1280, 960),
            finder: CellFinderConfig::default(),
        }
    }
}

/// Index of the true cell each detection lands on (centre within half its radius, nearest
/// first, each true cell at most once).
pub fn label_detections(
    found: &[cells::Cell],
    truth: &[reddino_models::synth::CellTruth],
) -> Vec<Option<usize>> {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, d) in found.iter().enumerate() {
        for (j, t) in truth.iter().enumerate() {
            let dist =
                ((d.center.0 - t.center.0).powi(2) + (d.center.1 - t.center.1).powi(2)).sqrt();
            if dist <= 0.5 * t.radius {
                pairs.push((dist, i, j));
            }
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut label = vec![None; found.len()];
    let mut used = vec![false; truth.len()];
    for (_, i, j) in pairs {
        if label[i].is_none() && !used[j] {
            label[i] = Some(j);
            used[j] = true;
        }
    }
    label
}

/// Renders fields (uniform class mix) per source until every class has `per_class` crops and
/// writes `{out}/{source}/{class}/*.png`; returns the crops written per source and class.
/// `progress(source, done, total)` is called per field.
pub fn write_detected_crops(
    cfg: &DetectedCrops,
    mut progress: impl FnMut(&str, usize, usize),
) -> anyhow::Result<Vec<(String, [usize; NUM_CLASSES])>> {
    anyhow::ensure!(
        cfg.size > 0 && cfg.margin >= 1.0,
        "crop size must be positive and margin at least 1.0"
    );
    let total = cfg.per_class * NUM_CLASSES;
    let mut summary = Vec::new();
    for (si, source) in cfg.sources.iter().enumerate() {
        for class in DEFAULT_CLASSES {
            let d = cfg.out_dir.join(&source.name).join(class);
            std::fs::create_dir_all(&d)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
        }
        let mut counts = [0usize; NUM_CLASSES];
        let mut field_idx = 0u64;
        while counts.iter().any(|&c| c < cfg.per_class) {
            anyhow::ensure!(
                field_idx <= 10_000,
                "source `{}`: could not collect {} crops per class",
                source.name,
                cfg.per_class
            );
            let mut spec = FieldSpec::new(
                cfg.field_size.0,
                cfg.field_size.1,
                cfg.seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((si as u64) << 32 | field_idx),
                source.clone(),
            );
            // Favour classes still short of their quota.
            let mut mix = ClassMix::uniform();
            for (w, &c) in mix.0.iter_mut().zip(&counts) {
                if c >= cfg.per_class {
                    *w = 0.02;
                }
            }
            spec.mix = mix;
            let field = render(&spec)?;
            let found = cells::find(&field.image, &cfg.finder);
            let labels = label_detections(&found, &field.cells);
            for (ci, (cell, label)) in found.iter().zip(&labels).enumerate() {
                let Some(j) = label else { continue };
                let class = field.cells[*j].class;
                if counts[class] >= cfg.per_class {
                    continue;
                }
                let crop = square_crop(&field.image, cell.bbox, cfg.margin);
                let crop = image::imageops::resize(&crop, cfg.size, cfg.size, FilterType::Triangle);
                let path = cfg
                    .out_dir
                    .join(&source.name)
                    .join(DEFAULT_CLASSES[class])
                    .join(format!("{}_{field_idx:05}_{ci:04}.png", source.name));
                crop.save(&path)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
                counts[class] += 1;
            }
            field_idx += 1;
            progress(
                &source.name,
                counts.iter().map(|&c| c.min(cfg.per_class)).sum(),
                total,
            );
        }
        summary.push((source.name.clone(), counts));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detections_take_the_class_of_the_cell_they_land_on() {
        let tmp = tempfile::tempdir().unwrap();
        let source = SourcePreset::by_name("wright_100x").unwrap();
        let mut cfg = DetectedCrops::new(tmp.path().to_path_buf(), vec![source.clone()], 2, 5);
        cfg.size = 32;
        cfg.field_size = (640, 480);
        let s = write_detected_crops(&cfg, |_, _, _| {}).unwrap();
        assert!(s[0].1.iter().all(|&n| n == 2), "{s:?}");
        for class in DEFAULT_CLASSES {
            let n = std::fs::read_dir(tmp.path().join(&source.name).join(class))
                .unwrap()
                .count();
            assert_eq!(n, 2, "{class}");
        }
        // Labels follow the truth: every matched detection's centre is inside its cell.
        let field = render(&FieldSpec::new(640, 480, 77, source)).unwrap();
        let found = cells::find(&field.image, &CellFinderConfig::default());
        let labels = label_detections(&found, &field.cells);
        let matched = labels.iter().flatten().count();
        assert!(
            matched as f64 >= 0.9 * found.len() as f64,
            "{matched} of {}",
            found.len()
        );
        for (d, l) in found.iter().zip(&labels) {
            if let Some(j) = l {
                let t = &field.cells[*j];
                let dist =
                    ((d.center.0 - t.center.0).powi(2) + (d.center.1 - t.center.1).powi(2)).sqrt();
                assert!(dist <= 0.5 * t.radius);
            }
        }
    }
}
