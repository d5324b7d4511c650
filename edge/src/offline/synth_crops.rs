//! Labelled training crops cut the way the service cuts them: synthetic fields go through the
//! service's own cell finder, each detection is cropped as `analyze` crops it, and it takes
//! the class of the true cell whose centre it lands on (within half that cell's radius;
//! detections matching no cell, e.g. a cluster found as one blob, are left out). A classifier
//! trained on these sees in training what it will see on the device, including the boxes of
//! cells touching a neighbour or carrying a platelet.

use std::path::PathBuf;

use reddino_models::synth::{export_crops_by, CropExport, CropSummary, Cuts, SourcePreset};

use crate::cells::{self, CellFinderConfig};
use crate::error::Result;

/// `reddino-edge synth-crops`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct SynthCropsArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Comma-separated acquisition-source presets (`reddino-models synth sources`).
    #[arg(long)]
    pub sources: String,
    /// Crops per class and source.
    #[arg(long, default_value_t = 100)]
    pub per_class: usize,
    /// Side of the saved crops in pixels.
    #[arg(long, default_value_t = 96)]
    pub size: u32,
    #[command(flatten)]
    pub crop: reddino_models::cli::CropArgs,
    /// Fraction of cells placed touching a neighbour, for every source (default: each
    /// source's own).
    #[arg(long)]
    pub touching: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `reddino-edge synth-crops`: writes the crops and prints how many per source.
pub fn command(args: &SynthCropsArgs) -> Result<()> {
    let mut cfg = CropExport::new(args.out.clone(), args.per_class, args.seed);
    cfg.crop = args.crop.policy();
    cfg.touching = args.touching;
    cfg.sources = args
        .sources
        .split(',')
        .map(|s| SourcePreset::by_name(s.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    cfg.size = args.size;
    let summary = write_detected_crops(&cfg, &CellFinderConfig::default(), |src, done, total| {
        eprint!("\r{src}: {done}/{total} crops")
    })?;
    eprintln!();
    print!("{}", summary.report(&cfg));
    println!("crops in {}", args.out.display());
    Ok(())
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

/// Writes `{out}/{source}/{class}/*.png` as `reddino-models synth crops` does (same fields,
/// seeds and crop geometry), but cutting the boxes `finder` detects, each labelled by the true
/// cell it lands on.
pub fn write_detected_crops(
    cfg: &CropExport,
    finder: &CellFinderConfig,
    progress: impl FnMut(&str, usize, usize),
) -> Result<CropSummary, reddino_models::Error> {
    export_crops_by(
        cfg,
        |field| {
            let (found, owners) =
                cells::find_maybe_owners(&field.image, finder, cfg.crop.blank_neighbours);
            let labels = label_detections(&found, &field.cells);
            Cuts {
                boxes: found
                    .iter()
                    .zip(labels)
                    .map(|(d, l)| (l.map(|j| field.cells[j].class), d.bbox))
                    .collect(),
                owners,
            }
        },
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reddino_models::synth::{render, FieldSpec, SourcePreset};
    use reddino_models::taxonomy::DEFAULT_CLASSES;

    #[test]
    fn detections_take_the_class_of_the_cell_they_land_on() {
        let tmp = tempfile::tempdir().unwrap();
        let source = SourcePreset::by_name("wright_100x").unwrap();
        let mut cfg = CropExport::new(tmp.path().to_path_buf(), 2, 5);
        cfg.sources = vec![source.clone()];
        cfg.size = 32;
        cfg.field_size = (640, 480);
        let s = write_detected_crops(&cfg, &CellFinderConfig::default(), |_, _, _| {}).unwrap();
        assert!(s.counts[&source.name].iter().all(|&n| n == 2), "{s:?}");
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
