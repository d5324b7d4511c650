//! Labelled cell crops in class-folder layout: `{out}/{source}/{class}/{file}.png`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use image::imageops::FilterType;

use super::{render, ClassMix, Field, FieldSpec, SourcePreset, NUM_CLASSES};
use crate::preprocess::{
    blanked_crop, median_box_side, square_crop_at_least, CropPolicy, OwnerMap,
};
use crate::taxonomy::DEFAULT_CLASSES;
use crate::Error;

/// What to export.
#[derive(Debug, Clone)]
pub struct CropExport {
    pub out_dir: PathBuf,
    pub sources: Vec<SourcePreset>,
    /// Crops per class and source.
    pub per_class: usize,
    /// Side of the saved crops in pixels.
    pub size: u32,
    pub seed: u64,
    /// Size of the fields the crops are cut from.
    pub field_size: (u32, u32),
    /// How the crops are cut, as the edge cuts them for a model with this policy. With
    /// `min_side` > 0 the median is taken, per source, over the boxes of a field with the
    /// default (clinical) class mix, the kind of frame the edge takes its median from; the crop
    /// fields themselves have a skewed mix (classes still short of their quota).
    pub crop: CropPolicy,
    /// Fraction of cells placed touching a neighbour, for every source (crowded training
    /// smears); `None` = each source's own.
    pub touching: Option<f32>,
}

impl CropExport {
    /// Defaults: all sources, 96 px crops, the default crop policy, 1280x960 fields.
    pub fn new(out_dir: PathBuf, per_class: usize, seed: u64) -> Self {
        CropExport {
            out_dir,
            sources: SourcePreset::all(),
            per_class,
            size: 96,
            seed,
            field_size: (1280, 960),
            touching: None,
            crop: CropPolicy::default(),
        }
    }
}

/// Crops written per source and class.
#[derive(Debug, Clone, Default)]
pub struct CropSummary {
    pub counts: BTreeMap<String, [usize; NUM_CLASSES]>,
    pub fields: usize,
    /// Per source: the median cell side (pixels) the crops' minimum side is taken from; only
    /// with `min_side` > 0.
    pub median_side: BTreeMap<String, f32>,
}

impl CropSummary {
    /// One line per source with its crops, then one per source with its median cell and the
    /// crops' minimum side (with `min_side` > 0).
    pub fn report(&self, cfg: &CropExport) -> String {
        let mut s = String::new();
        for (src, counts) in &self.counts {
            s += &format!("{src}: {} crops\n", counts.iter().sum::<usize>());
        }
        for (src, m) in &self.median_side {
            s += &format!(
                "{src}: median cell {m:.1} px, crops at least {:.0} px\n",
                cfg.crop.min_crop_side(*m)
            );
        }
        s
    }
}

/// The boxes to cut in one field.
#[derive(Debug, Clone)]
pub struct Cuts {
    /// `(class, bbox)`; a box without a class is not cut (but still owns its pixels).
    pub boxes: Vec<(Option<usize>, [u32; 4])>,
    /// Which box owns each pixel (indices into `boxes`), for blanked crops.
    pub owners: Option<OwnerMap>,
}

/// Renders fields (uniform class mix) for every source until each class has `per_class`
/// crops, and writes them as PNG: one crop around every true cell (with blanked neighbours,
/// each cell's footprint is its own; see [`Field::owner_map`]). `progress(source, done,
/// total)` is called per field.
pub fn export_crops(
    cfg: &CropExport,
    progress: impl FnMut(&str, usize, usize),
) -> Result<CropSummary, Error> {
    export_crops_by(
        cfg,
        |field| Cuts {
            boxes: field
                .cells
                .iter()
                .map(|c| (Some(c.class), c.bbox))
                .collect(),
            owners: cfg.crop.blank_neighbours.then(|| field.owner_map()),
        },
        progress,
    )
}

/// [`export_crops`] with the boxes to cut chosen by `cuts(field)` (e.g. a cell finder's
/// detections labelled from the field's truth). With `blank_neighbours` the cuts must come
/// with their owner map.
pub fn export_crops_by(
    cfg: &CropExport,
    mut cuts: impl FnMut(&Field) -> Cuts,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<CropSummary, Error> {
    if cfg.size == 0 || cfg.crop.margin < 1.0 {
        return Err(Error::Config(
            "crop size must be positive and margin at least 1.0".into(),
        ));
    }
    crate::bundle::check_crop_min_side(cfg.crop.min_side).map_err(Error::Config)?;
    let mut sources = cfg.sources.clone();
    if let Some(t) = cfg.touching {
        super::set_touching(&mut sources, t)?;
    }
    let mut summary = CropSummary::default();
    let total = cfg.per_class * NUM_CLASSES;
    for (si, source) in sources.iter().enumerate() {
        let mut counts = [0usize; NUM_CLASSES];
        for class in DEFAULT_CLASSES {
            let d = cfg.out_dir.join(&source.name).join(class);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        let floor = if cfg.crop.min_side > 0.0 {
            let reference = render(&FieldSpec::new(
                cfg.field_size.0,
                cfg.field_size.1,
                cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED_F1E1D ^ (si as u64) << 48,
                source.clone(),
            ))?;
            let sides: Vec<[u32; 4]> = cuts(&reference)
                .boxes
                .into_iter()
                .filter_map(|(class, b)| class.map(|_| b))
                .collect();
            let median = median_box_side(&sides);
            summary.median_side.insert(source.name.clone(), median);
            cfg.crop.min_side * median
        } else {
            0.0
        };
        let mut field_idx = 0u64;
        while counts.iter().any(|&c| c < cfg.per_class) {
            if field_idx > 10_000 {
                return Err(Error::Config(format!(
                    "source `{}`: could not collect {} crops per class",
                    source.name, cfg.per_class
                )));
            }
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
            let cut = cuts(&field);
            if cfg.crop.blank_neighbours && cut.owners.is_none() {
                return Err(Error::Config(
                    "blanked neighbours need the field's owner map".into(),
                ));
            }
            for (ci, &(class, bbox)) in cut.boxes.iter().enumerate() {
                let Some(class) = class else { continue };
                if counts[class] >= cfg.per_class {
                    continue;
                }
                let crop = match (&cut.owners, cfg.crop.blank_neighbours) {
                    (Some(owners), true) => blanked_crop(
                        &field.image,
                        owners,
                        ci as u32,
                        bbox,
                        cfg.crop.margin,
                        floor,
                    ),
                    _ => square_crop_at_least(&field.image, bbox, cfg.crop.margin, floor),
                };
                let crop = image::imageops::resize(&crop, cfg.size, cfg.size, FilterType::Triangle);
                let path = cfg
                    .out_dir
                    .join(&source.name)
                    .join(DEFAULT_CLASSES[class])
                    .join(format!("{}_{field_idx:05}_{ci:04}.png", source.name));
                crop.save(&path)
                    .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
                counts[class] += 1;
            }
            field_idx += 1;
            summary.fields += 1;
            progress(
                &source.name,
                counts.iter().map(|&c| c.min(cfg.per_class)).sum(),
                total,
            );
        }
        summary.counts.insert(source.name.clone(), counts);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_class_folder_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = CropExport::new(tmp.path().to_path_buf(), 3, 9);
        cfg.sources.truncate(2);
        cfg.size = 32;
        cfg.field_size = (640, 480);
        let s = export_crops(&cfg, |_, _, _| {}).unwrap();
        for src in &cfg.sources {
            assert!(s.counts[&src.name].iter().all(|&c| c == 3));
            for class in DEFAULT_CLASSES {
                let files: Vec<_> = std::fs::read_dir(tmp.path().join(&src.name).join(class))
                    .unwrap()
                    .collect();
                assert_eq!(files.len(), 3, "{}/{class}", src.name);
                let img = image::open(files[0].as_ref().unwrap().path()).unwrap();
                assert_eq!((img.width(), img.height()), (32, 32));
            }
        }
        assert!(s.median_side.is_empty());
    }

    #[test]
    fn small_cells_are_cut_with_the_context_of_the_median_cell() {
        let tmp = tempfile::tempdir().unwrap();
        let source = SourcePreset::by_name("wright_100x").unwrap();
        let platelets = |min_side: f32| -> f32 {
            let dir = tmp.path().join(format!("m{min_side}"));
            let mut cfg = CropExport::new(dir.clone(), 4, 9);
            cfg.sources = vec![source.clone()];
            cfg.size = 48;
            cfg.field_size = (640, 480);
            cfg.crop.min_side = min_side;
            let s = export_crops(&cfg, |_, _, _| {}).unwrap();
            if min_side > 0.0 {
                // The median cell is a red cell: about its diameter.
                let m = s.median_side[&source.name];
                let d = 2.0 * source.rbc_radius.0;
                assert!(
                    (0.8 * d..1.4 * 2.0 * source.rbc_radius.1).contains(&m),
                    "{m}"
                );
            }
            // Share of dark (stained) pixels in the platelet crops.
            let mut dark = 0usize;
            let mut all = 0usize;
            for f in std::fs::read_dir(dir.join(&source.name).join("platelet")).unwrap() {
                let img = image::open(f.unwrap().path()).unwrap().to_rgb8();
                for p in img.pixels() {
                    all += 1;
                    if (p.0[0] as u32 + p.0[1] as u32 + p.0[2] as u32) < 3 * 150 {
                        dark += 1;
                    }
                }
            }
            dark as f32 / all as f32
        };
        let scaled = platelets(0.0);
        let sized = platelets(1.0);
        // A platelet fills its own crop; in a crop the size of a red cell's it is a small dot.
        assert!(sized < 0.5 * scaled, "dark share {sized} vs {scaled}");
        // Out-of-range settings are refused.
        let mut cfg = CropExport::new(tmp.path().join("bad"), 1, 0);
        cfg.crop.min_side = 9.0;
        assert!(export_crops(&cfg, |_, _, _| {}).is_err());
    }

    #[test]
    fn blanked_crops_are_the_same_crops_with_the_neighbours_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let source = SourcePreset::by_name("wright_100x").unwrap();
        let export = |blank: bool| {
            let dir = tmp.path().join(format!("b{blank}"));
            let mut cfg = CropExport::new(dir.clone(), 3, 5);
            cfg.sources = vec![source.clone()];
            cfg.size = 48;
            cfg.field_size = (640, 480);
            cfg.touching = Some(0.6);
            cfg.crop.blank_neighbours = blank;
            export_crops(&cfg, |_, _, _| {}).unwrap();
            let mut files: Vec<_> = walk(&dir);
            files.sort();
            (dir, files)
        };
        let (plain_dir, plain) = export(false);
        let (blank_dir, blanked) = export(true);
        let rel =
            |d: &std::path::Path, f: &std::path::PathBuf| f.strip_prefix(d).unwrap().to_owned();
        let names: Vec<_> = plain.iter().map(|f| rel(&plain_dir, f)).collect();
        assert_eq!(
            names,
            blanked
                .iter()
                .map(|f| rel(&blank_dir, f))
                .collect::<Vec<_>>()
        );
        let (mut same, mut changed) = (0, 0);
        for (a, b) in plain.iter().zip(&blanked) {
            let (a, b) = (
                image::open(a).unwrap().to_rgb8(),
                image::open(b).unwrap().to_rgb8(),
            );
            assert_eq!(a.dimensions(), b.dimensions());
            // The centre (the cell itself) is the same.
            let c = a.width() / 2;
            assert_eq!(a.get_pixel(c, c), b.get_pixel(c, c));
            if a == b {
                same += 1;
            } else {
                changed += 1;
            }
        }
        // Crowded fields: many crops had a neighbour, and cells on their own are untouched.
        assert!(
            changed >= 5 && same >= 1,
            "{changed} changed, {same} the same"
        );
        // Cuts without an owner map cannot be blanked.
        let mut cfg = CropExport::new(tmp.path().join("none"), 1, 0);
        cfg.sources = vec![source.clone()];
        cfg.field_size = (640, 480);
        cfg.crop.blank_neighbours = true;
        let e = export_crops_by(
            &cfg,
            |f| Cuts {
                boxes: f.cells.iter().map(|c| (Some(c.class), c.bbox)).collect(),
                owners: None,
            },
            |_, _, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("owner map"), "{e}");
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
