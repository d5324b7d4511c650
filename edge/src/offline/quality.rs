//! Cell-finder quality against labelled cells (point labels of real fields, or the true centres
//! of synthetic ones): recall of labelled cells in the interior and at the frame's border apart,
//! the ratio of cell-sized detections to labelled cells on densely labelled fields, merged
//! detections (one cell's pixels holding two labelled centres), and time per field.
//!
//! A label is found when a detection owns its pixel (or, for a centre marked just off its
//! cell, a pixel within two of it); each detection finds at most one label, nearest centre
//! first, so a merged pair counts one cell found and one missed. Border cells are scored too:
//! the finder runs with `drop_border` off here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use reddino_models::preprocess::OwnerMap;
use serde::Serialize;

use super::labelled::{self, LabelError, PointLabel, Split};
use super::FinderArgs;
use crate::cells::{self, greedy_pairs, CellFinderConfig};
use crate::error::{Error, Result};

/// `reddino-edge finder-quality`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct QualityArgs {
    /// A point-labelled data set (e.g. Chula RBC-12).
    #[arg(long)]
    pub points: Option<PathBuf>,
    /// Which of its fields: the development fields, the held-out ones, or all.
    #[arg(long, value_enum, default_value = "dev")]
    pub fields: Fields,
    /// Class ids in the data set (labels with a larger id are refused).
    #[arg(long, default_value_t = 13)]
    pub classes: usize,
    /// Rescale each field by these factors (simulated magnifications), comma-separated.
    #[arg(long, default_value = "1")]
    pub scales: String,
    /// Scale each field's stain by these factors (0.5: each pixel's optical density against
    /// the field's background halved, a paler smear), comma-separated.
    #[arg(long, default_value = "1")]
    pub stains: String,
    /// Darken each field towards its corners by these fractions (0.3: the corners get 70% of
    /// the centre's light, falling off with the square of the distance), comma-separated.
    #[arg(long, default_value = "0")]
    pub vignettes: String,
    /// Draw an eyepiece pointer and a scale bar into each field (labels under them dropped)
    /// and count the detections lying on them.
    #[arg(long)]
    pub marks: bool,
    /// Synthetic fields per acquisition source (0 = none).
    #[arg(long, default_value_t = 0)]
    pub synthetic: u64,
    #[command(flatten)]
    pub finder: FinderArgs,
    /// Also print one line per field.
    #[arg(long)]
    pub per_field: bool,
    /// Print the summaries as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write each scored field with its detections and labels drawn into this folder.
    #[arg(long)]
    pub overlays: Option<PathBuf>,
}

/// `reddino-edge finder-quality`: scores the finder on a point-labelled data set at each
/// scale and/or on the synthetic sources; one row (or JSON line) per set.
pub fn command(args: &QualityArgs) -> Result<()> {
    let cfg = args.finder.config()?;
    // A comma-separated list of numbers, each inside `range` (a half-open or closed interval:
    // `(0, 8]`).
    let factors = |flag: &str, list: &str, range: &str, ok: fn(f32) -> bool| -> Result<Vec<f32>> {
        let v = list
            .split(',')
            .map(|s| s.trim().parse::<f32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::Usage(format!("--{flag} {list}: comma-separated numbers")))?;
        match v.iter().find(|&&s| !ok(s)) {
            Some(bad) => Err(Error::Usage(format!("--{flag}: {bad} is not in {range}"))),
            None => Ok(v),
        }
    };
    let scales = factors("scales", &args.scales, "(0, 8]", |s| s > 0.0 && s <= 8.0)?;
    let stains = factors("stains", &args.stains, "(0, 4]", |s| s > 0.0 && s <= 4.0)?;
    let vignettes = factors("vignettes", &args.vignettes, "[0, 0.9]", |s| {
        (0.0..=0.9).contains(&s)
    })?;
    if args.points.is_none() && args.synthetic == 0 {
        return Err(Error::Usage(
            "nothing to score: give --points DIR and/or --synthetic N".into(),
        ));
    }
    if let Some(o) = &args.overlays {
        std::fs::create_dir_all(o).map_err(|e| Error::file("creating", o, e))?;
    }
    let mut rows: Vec<(String, Summary, Vec<FieldScore>)> = Vec::new();
    if let Some(dir) = &args.points {
        let mut looks = Vec::new();
        for &vignette in &vignettes {
            for &stain in &stains {
                for &scale in &scales {
                    looks.push(Look {
                        scale,
                        stain,
                        vignette,
                        marks: args.marks,
                    });
                }
            }
        }
        for look in looks {
            let scores = score_point_set(
                dir,
                args.fields,
                look,
                args.classes,
                &cfg,
                args.overlays.as_deref(),
                |d, n| eprint!("\r{}: {d}/{n} fields", look.name()),
            )?;
            eprintln!();
            let name = format!("{} {}", dir.display(), look.name());
            rows.push((name, Summary::of(&scores), scores));
        }
    }
    if args.synthetic > 0 {
        for (source, scores) in score_synthetic(args.synthetic, &cfg) {
            rows.push((source, Summary::of(&scores), scores));
        }
    }
    if !args.json {
        println!("{}", Summary::HEADER);
    }
    for (name, summary, scores) in &rows {
        if args.json {
            println!("{}", serde_json::json!({ "set": name, "summary": summary }));
        } else {
            println!("{}", summary.row(name));
        }
        if args.per_field {
            for s in scores {
                println!("{}", serde_json::to_string(s).expect("serialisable"));
            }
        }
    }
    if args.marks && !args.json {
        println!();
        for (name, summary, _) in &rows {
            println!(
                "{name}: {} detection(s) on the drawn marks",
                summary.on_marks
            );
        }
    }
    Ok(())
}

/// Fields with at least this many labels are taken as labelled in full (count ratios and
/// merges are scored on them only).
pub const DENSE_LABELS: usize = 60;

/// A detection is cell-sized when its area is at least this fraction of the frame's median
/// detection area (smaller ones are fragments or debris).
pub const CELL_SIZED: f32 = 0.3;

/// The score of one field.
#[derive(Debug, Clone, Serialize)]
pub struct FieldScore {
    pub name: String,
    pub labels: usize,
    pub interior: usize,
    pub interior_found: usize,
    pub border: usize,
    pub border_found: usize,
    /// Every detection, border cells included.
    pub detections: usize,
    /// Detections of at least [`CELL_SIZED`] of the median area.
    pub cell_sized: usize,
    /// Typical cell radius in pixels (from the median detection area).
    pub radius: f32,
    /// Cell-sized detections whose centre lies in the interior (as for labels).
    pub interior_cell_sized: usize,
    /// Detections owning two or more labelled centres.
    pub merged: usize,
    /// Labels in merged detections beyond the first.
    pub merged_labels: usize,
    /// Detections lying mostly on drawn marks (a pointer, a scale bar) that the device would
    /// count (not touching the frame's edge); 0 without marks.
    pub on_marks: usize,
    pub ms: f64,
}

impl FieldScore {
    pub fn dense(&self) -> bool {
        self.labels >= DENSE_LABELS
    }
    /// Cell-sized detections per labelled cell.
    pub fn ratio(&self) -> f64 {
        self.cell_sized as f64 / self.labels.max(1) as f64
    }
    /// [`FieldScore::ratio`] over the interior alone (cells cut by the frame's edge are the
    /// ones labelled least consistently).
    pub fn interior_ratio(&self) -> f64 {
        self.interior_cell_sized as f64 / self.interior.max(1) as f64
    }
}

/// Runs the finder on `img` (border cells kept) and scores it against `points` (x, y).
pub fn score_field(
    name: &str,
    img: &RgbImage,
    points: &[(f32, f32)],
    cfg: &CellFinderConfig,
) -> FieldScore {
    let t = Instant::now();
    let (found, owners) = find_all(img, cfg);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    score_detections(name, img.width(), img.height(), &found, &owners, points, ms)
}

/// Scores detections `found` (with their owner map) against labelled centres `points`.
pub fn score_detections(
    name: &str,
    width: u32,
    height: u32,
    found: &[cells::Cell],
    owners: &OwnerMap,
    points: &[(f32, f32)],
    ms: f64,
) -> FieldScore {
    let mut areas: Vec<u32> = found.iter().map(|c| c.area).collect();
    areas.sort_unstable();
    let median = areas.get(areas.len() / 2).copied().unwrap_or(0) as f32;
    // A label is at the border when its cell may be cut by the frame: within a typical
    // radius (from the median area) of an edge.
    let radius = (median / std::f32::consts::PI).sqrt().max(1.0);
    let at_border = |&(x, y): &(f32, f32)| {
        x < radius || y < radius || x >= width as f32 - radius || y >= height as f32 - radius
    };
    let sized: Vec<&cells::Cell> = found
        .iter()
        .filter(|c| c.area as f32 >= CELL_SIZED * median)
        .collect();
    let cell_sized = sized.len();
    let interior_cell_sized = sized.iter().filter(|c| !at_border(&c.center)).count();
    let mut pairs = Vec::new();
    let mut holders: Vec<Vec<usize>> = vec![Vec::new(); found.len()];
    for (j, p) in points.iter().enumerate() {
        if let Some(i) = owner_near(owners, p.0, p.1) {
            let c = found[i].center;
            pairs.push(((c.0 - p.0).hypot(c.1 - p.1), i, j));
            holders[i].push(j);
        }
    }
    let matched = greedy_pairs(pairs, found.len(), points.len());
    let mut hit = vec![false; points.len()];
    for (_, j) in matched {
        hit[j] = true;
    }
    let (mut interior, mut interior_found, mut border, mut border_found) = (0, 0, 0, 0);
    for (p, &h) in points.iter().zip(&hit) {
        if at_border(p) {
            border += 1;
            border_found += h as usize;
        } else {
            interior += 1;
            interior_found += h as usize;
        }
    }
    let merged = holders.iter().filter(|h| h.len() >= 2).count();
    let merged_labels = holders.iter().map(|h| h.len().saturating_sub(1)).sum();
    FieldScore {
        name: name.to_string(),
        labels: points.len(),
        interior,
        interior_found,
        border,
        border_found,
        detections: found.len(),
        cell_sized,
        radius,
        interior_cell_sized,
        merged,
        merged_labels,
        on_marks: 0,
        ms,
    }
}

/// The detection owning pixel (x, y), or the nearest pixel within two that one owns.
pub(crate) fn owner_near(owners: &OwnerMap, x: f32, y: f32) -> Option<usize> {
    let (w, h) = (owners.width as i64, owners.height as i64);
    let (cx, cy) = (x as i64, y as i64);
    let mut best: Option<(i64, usize)> = None;
    for dy in -2i64..=2 {
        for dx in -2i64..=2 {
            let (px, py) = (cx + dx, cy + dy);
            let d = dx * dx + dy * dy;
            if px < 0 || py < 0 || px >= w || py >= h || d > 4 {
                continue;
            }
            let id = owners.ids[(py * w + px) as usize];
            if id < OwnerMap::OTHER && best.is_none_or(|(bd, _)| d < bd) {
                best = Some((d, id as usize));
            }
        }
    }
    best.map(|(_, i)| i)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// The figures over many fields.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub fields: usize,
    pub labels: usize,
    pub interior_recall: f64,
    pub border_recall: f64,
    pub dense_fields: usize,
    /// Median of the dense fields' cell-sized detections per label.
    pub median_ratio: f64,
    /// Dense fields whose ratio is off by more than 30%.
    pub dense_off: usize,
    /// The median ratio and the fields off by more than 30%, over the interior alone.
    pub median_interior_ratio: f64,
    pub dense_off_interior: usize,
    /// Merged detections per labelled cell on dense fields.
    pub merged_share: f64,
    /// Detections on drawn marks over all fields ([`FieldScore::on_marks`]).
    pub on_marks: usize,
    pub ms_per_field: f64,
}

impl Summary {
    pub fn of(scores: &[FieldScore]) -> Summary {
        let sum = |f: fn(&FieldScore) -> usize| scores.iter().map(f).sum::<usize>();
        let ratio = |a: usize, b: usize| a as f64 / b.max(1) as f64;
        let dense: Vec<&FieldScore> = scores.iter().filter(|s| s.dense()).collect();
        let ratios: Vec<f64> = dense.iter().map(|s| s.ratio()).collect();
        let inner: Vec<f64> = dense.iter().map(|s| s.interior_ratio()).collect();
        let off = |r: &[f64]| r.iter().filter(|r| (**r - 1.0).abs() > 0.3).count();
        let dense_labels: usize = dense.iter().map(|s| s.labels).sum();
        let dense_merged: usize = dense.iter().map(|s| s.merged).sum();
        Summary {
            fields: scores.len(),
            labels: sum(|s| s.labels),
            interior_recall: ratio(sum(|s| s.interior_found), sum(|s| s.interior)),
            border_recall: ratio(sum(|s| s.border_found), sum(|s| s.border)),
            dense_fields: dense.len(),
            median_ratio: median(ratios.clone()),
            dense_off: off(&ratios),
            median_interior_ratio: median(inner.clone()),
            dense_off_interior: off(&inner),
            merged_share: ratio(dense_merged, dense_labels),
            on_marks: sum(|s| s.on_marks),
            ms_per_field: scores.iter().map(|s| s.ms).sum::<f64>() / scores.len().max(1) as f64,
        }
    }

    /// The markdown table header matching [`Summary::row`].
    pub const HEADER: &'static str = "| set | fields | labels | interior recall | border recall | dense fields | median ratio (interior) | dense off >30% (interior) | merged | ms/field |\n|---|---|---|---|---|---|---|---|---|---|";

    /// One markdown table row named `set`.
    pub fn row(&self, set: &str) -> String {
        format!(
            "| {set} | {} | {} | {:.4} | {:.4} | {} | {:.3} ({:.3}) | {} ({}) | {:.2}% | {:.1} |",
            self.fields,
            self.labels,
            self.interior_recall,
            self.border_recall,
            self.dense_fields,
            self.median_ratio,
            self.median_interior_ratio,
            self.dense_off,
            self.dense_off_interior,
            100.0 * self.merged_share,
            self.ms_per_field
        )
    }
}

/// `img` with the finder's detections drawn as boxes (green: holds a label, yellow: holds two
/// or more, grey: holds none) and the labels as dots (blue: found, red: missed), for looking at
/// what the finder does on a field.
pub fn overlay(img: &RgbImage, points: &[(f32, f32)], cfg: &CellFinderConfig) -> RgbImage {
    let (found, owners) = find_all(img, cfg);
    draw_detections(img, &found, &owners, points)
}

/// The finder's detections and owner map with border cells kept (they are labelled too).
fn find_all(img: &RgbImage, cfg: &CellFinderConfig) -> (Vec<cells::Cell>, OwnerMap) {
    let cfg = CellFinderConfig {
        drop_border: false,
        ..cfg.clone()
    };
    cells::find_with_owners(img, &cfg)
}

/// [`overlay`] of detections already found.
fn draw_detections(
    img: &RgbImage,
    found: &[cells::Cell],
    owners: &OwnerMap,
    points: &[(f32, f32)],
) -> RgbImage {
    use image::Rgb;
    use imageproc::drawing::{draw_filled_circle_mut, draw_hollow_rect_mut};
    use imageproc::rect::Rect;
    let mut holds = vec![0usize; found.len()];
    let owner: Vec<Option<usize>> = points
        .iter()
        .map(|p| owner_near(owners, p.0, p.1))
        .collect();
    for i in owner.iter().flatten() {
        holds[*i] += 1;
    }
    let mut out = img.clone();
    // Merged detections' pixels tinted yellow.
    for (px, &id) in out.pixels_mut().zip(&owners.ids) {
        if id < OwnerMap::OTHER && holds[id as usize] >= 2 {
            px.0 = [px.0[0] / 2 + 127, px.0[1] / 2 + 110, px.0[2] / 2];
        }
    }
    for (c, n) in found.iter().zip(&holds) {
        let colour = match n {
            0 => Rgb([128, 128, 128]),
            1 => Rgb([0, 200, 0]),
            _ => Rgb([255, 220, 0]),
        };
        let [x0, y0, x1, y1] = c.bbox;
        let r = Rect::at(x0 as i32, y0 as i32).of_size((x1 - x0).max(1), (y1 - y0).max(1));
        draw_hollow_rect_mut(&mut out, r, colour);
    }
    for (p, o) in points.iter().zip(&owner) {
        let colour = if o.is_some() {
            Rgb([0, 0, 255])
        } else {
            Rgb([255, 0, 0])
        };
        draw_filled_circle_mut(&mut out, (p.0 as i32, p.1 as i32), 2, colour);
    }
    out
}

/// Which fields of a labelled data set to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fields {
    /// Every field.
    All,
    /// The development fields (train and val of [`labelled::split_of`]).
    Dev,
    /// The held-out fields (test of [`labelled::split_of`]).
    Test,
}

impl Fields {
    pub fn holds(self, name: &str) -> bool {
        match self {
            Fields::All => true,
            Fields::Dev => labelled::split_of(name) != Split::Test,
            Fields::Test => labelled::split_of(name) == Split::Test,
        }
    }
}

/// Scores the finder on the labelled fields of a point-labelled data set (`dir/images`,
/// `dir/labels`), each image and its labels rescaled by `scale` (a simulated magnification).
/// Fields without labels are skipped. `progress(done, total)` after each field.
pub fn score_point_set(
    dir: &Path,
    which: Fields,
    look: Look,
    classes: usize,
    cfg: &CellFinderConfig,
    overlays: Option<&Path>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<FieldScore>, LabelError> {
    let fields: Vec<labelled::Field> = labelled::point_fields(dir)?
        .into_iter()
        .filter(|f| f.labels_file.is_some() && which.holds(&f.name))
        .collect();
    let mut out = Vec::with_capacity(fields.len());
    for (k, f) in fields.iter().enumerate() {
        let img = labelled::open_image(&f.image)?;
        let points = f.points(img.width(), img.height(), classes)?;
        let img = vignette(restain(img, look.stain), look.vignette);
        let (mut img, mut points) = rescale(img, &points, look.scale);
        let (w, h) = img.dimensions();
        let marks = look.marks.then(|| draw_marks(&mut img));
        if let Some(m) = &marks {
            // Cells under the marks are hidden: nobody can count them.
            points.retain(|&(x, y)| !m[y as usize * w as usize + x as usize]);
        }
        let t = Instant::now();
        let (found, owners) = find_all(&img, cfg);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let mut score = score_detections(&f.name, w, h, &found, &owners, &points, ms);
        if let Some(m) = &marks {
            score.on_marks = on_marks(&found, &owners, m);
        }
        out.push(score);
        if let Some(dir) = overlays {
            let path = dir.join(format!("{}_{}.png", f.name, look.name().replace(' ', "_")));
            draw_detections(&img, &found, &owners, &points)
                .save(&path)
                .map_err(|e| LabelError::Image {
                    path,
                    why: e.to_string(),
                })?;
        }
        progress(k + 1, fields.len());
    }
    Ok(out)
}

/// How a field is shown to the finder: rescaled (a simulated magnification), its stain made
/// paler or stronger, its light falling off towards the corners.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Look {
    /// Factor on the field's size (1 = as it is).
    pub scale: f32,
    /// Factor on each pixel's optical density against the field's background (1 = as it is).
    pub stain: f32,
    /// Light lost at the corners (0 = as it is; see [`vignette`]).
    pub vignette: f32,
    /// An eyepiece pointer and a scale bar with its legend drawn into the field (see
    /// [`draw_marks`]).
    pub marks: bool,
}

impl Look {
    /// The field as it is.
    pub const AS_IS: Look = Look {
        scale: 1.0,
        stain: 1.0,
        vignette: 0.0,
        marks: false,
    };

    /// `x2`, with ` stain 0.5` and ` vignette 0.3` when they are changed.
    pub fn name(&self) -> String {
        let mut name = format!("x{}", self.scale);
        if (self.stain - 1.0).abs() > 1e-6 {
            name += &format!(" stain {}", self.stain);
        }
        if self.vignette != 0.0 {
            name += &format!(" vignette {}", self.vignette);
        }
        if self.marks {
            name += " marks";
        }
        name
    }
}

/// `img` with its stain `stain` times as strong (1 = unchanged): each pixel's optical density
/// against the field's background light (each channel's 95th percentile) scaled, as a paler
/// (`stain` < 1) or stronger smear of the same field would read.
pub fn restain(mut img: RgbImage, stain: f32) -> RgbImage {
    if (stain - 1.0).abs() < 1e-6 {
        return img;
    }
    let mut hist = [[0u32; 256]; 3];
    for px in img.pixels() {
        for c in 0..3 {
            hist[c][px[c] as usize] += 1;
        }
    }
    let n = img.width() as u64 * img.height() as u64;
    let luts: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let mut acc = 0u64;
        let bg = hist[c]
            .iter()
            .position(|&k| {
                acc += k as u64;
                20 * acc >= 19 * n
            })
            .unwrap_or(255)
            .max(1) as f32;
        std::array::from_fn(|v| {
            let v = (v.max(1) as f32 / bg).powf(stain) * bg;
            v.round().clamp(0.0, 255.0) as u8
        })
    });
    for px in img.pixels_mut() {
        for c in 0..3 {
            px[c] = luts[c][px[c] as usize];
        }
    }
    img
}

/// `img` darkened towards its corners: each pixel times `1 - loss * d^2`, `d` its distance
/// from the centre over the corners' (0 = unchanged), as a camera whose optics vignette sees it.
pub fn vignette(mut img: RgbImage, loss: f32) -> RgbImage {
    if loss == 0.0 {
        return img;
    }
    let (cx, cy) = (
        (img.width() as f32 - 1.0) / 2.0,
        (img.height() as f32 - 1.0) / 2.0,
    );
    let corner = (cx * cx + cy * cy).max(1.0);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let d2 = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) / corner;
        let gain = 1.0 - loss * d2;
        for c in 0..3 {
            px[c] = (px[c] as f32 * gain).round().clamp(0.0, 255.0) as u8;
        }
    }
    img
}

/// Draws into `img` the marks a microscope or its software leaves in a field: an eyepiece
/// pointer (a near-black needle from the left edge to four tenths of the width, 3% of the
/// height wide where it enters) and a black scale bar in the lower right corner (15% of the
/// width long) under its legend, "10 um" in block letters. Returns which pixels the marks
/// cover, row by row.
pub fn draw_marks(img: &mut RgbImage) -> Vec<bool> {
    let (w, h) = img.dimensions();
    let (wf, hf) = (w as f32, h as f32);
    let mut mask = vec![false; (w * h) as usize];
    let mut paint = |x: u32, y: u32, rgb: [u8; 3]| {
        if x < w && y < h {
            img.put_pixel(x, y, image::Rgb(rgb));
            mask[(y * w + x) as usize] = true;
        }
    };
    // The pointer: from (0, 0.35 h) to its tip at (0.4 w, 0.45 h), tapering to a point.
    let (ax, ay, bx, by) = (0.0, 0.35 * hf, 0.4 * wf, 0.45 * hf);
    let (dx, dy) = (bx - ax, by - ay);
    let len2 = dx * dx + dy * dy;
    let base = 0.015 * hf;
    for y in (ay - base).floor().max(0.0) as u32..(by + base).ceil() as u32 {
        for x in 0..bx.ceil() as u32 {
            let (px, py) = (x as f32 + 0.5 - ax, y as f32 + 0.5 - ay);
            let t = (px * dx + py * dy) / len2;
            let off = (px * dy - py * dx).abs() / len2.sqrt();
            // Full width where it enters (`t` below 0 at the frame's edge of a slanted needle).
            if t <= 1.0 && off <= (base * (1.0 - t.max(0.0))).max(0.5) {
                paint(x, y, [22, 22, 28]);
            }
        }
    }
    // The scale bar and its legend above it, left-aligned.
    let mut rect = |x0: f32, y0: f32, x1: f32, y1: f32| {
        for y in y0.round() as u32..y1.round() as u32 {
            for x in x0.round() as u32..x1.round() as u32 {
                paint(x, y, [0, 0, 0]);
            }
        }
    };
    let (x1, y1) = (0.95 * wf, 0.94 * hf);
    let x0 = x1 - 0.15 * wf;
    rect(x0, y1 - 0.0125 * hf, x1, y1);
    let g = 0.04 * hf; // glyph height
    let s = (g / 7.0).max(2.0); // stroke
    let top = y1 - 0.0125 * hf - 0.4 * g - g;
    // Strokes of each glyph in a unit box (x0, y0, x1, y1), the stroke's width added.
    let glyphs: [&[[f32; 4]]; 4] = [
        &[[0.5, 0.0, 0.5, 1.0]], // 1
        &[
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 1.0, 1.0],
        ], // 0
        &[
            [0.0, 0.3, 0.0, 1.0],
            [1.0, 0.3, 1.0, 1.0],
            [0.0, 1.0, 1.0, 1.0],
        ], // u
        &[
            [0.0, 0.3, 1.0, 0.3],
            [0.0, 0.3, 0.0, 1.0],
            [0.5, 0.3, 0.5, 1.0],
            [1.0, 0.3, 1.0, 1.0],
        ], // m
    ];
    let gw = 0.6 * g;
    let mut left = x0;
    for (k, strokes) in glyphs.iter().enumerate() {
        for [u0, v0, u1, v1] in strokes.iter() {
            let (sx, sy) = (left + u0 * (gw - s), top + v0 * (g - s));
            rect(sx, sy, left + u1 * (gw - s) + s, top + v1 * (g - s) + s);
        }
        left += gw + if k == 1 { gw } else { 0.4 * gw };
    }
    mask
}

/// Detections with at least half their pixels on `marks` (from [`draw_marks`]) that the device
/// would count: those whose box does not touch the frame's edge.
fn on_marks(found: &[cells::Cell], owners: &OwnerMap, marks: &[bool]) -> usize {
    let mut on = vec![0u32; found.len()];
    for (&id, &m) in owners.ids.iter().zip(marks) {
        if m && id < OwnerMap::OTHER {
            on[id as usize] += 1;
        }
    }
    let (w, h) = (owners.width, owners.height);
    found
        .iter()
        .zip(&on)
        .filter(|(c, &n)| {
            let [x0, y0, x1, y1] = c.bbox;
            2 * n >= c.area && x0 > 0 && y0 > 0 && x1 < w && y1 < h
        })
        .count()
}

/// `img` and the centres of `points` rescaled by `scale` (1 = unchanged).
pub fn rescale(img: RgbImage, points: &[PointLabel], scale: f32) -> (RgbImage, Vec<(f32, f32)>) {
    if (scale - 1.0).abs() < 1e-6 {
        return (img, points.iter().map(|p| (p.x, p.y)).collect());
    }
    let (w, h) = (
        ((img.width() as f32 * scale).round() as u32).max(1),
        ((img.height() as f32 * scale).round() as u32).max(1),
    );
    let img = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
    let at = |v: f32| (v + 0.5) * scale - 0.5;
    let points = points
        .iter()
        .map(|p| (at(p.x).max(0.0), at(p.y).max(0.0)))
        .collect();
    (img, points)
}

/// Scores the finder on `fields` synthetic fields of 1280x960 per acquisition source, their
/// true centres as labels. Returns the scores per source.
pub fn score_synthetic(fields: u64, cfg: &CellFinderConfig) -> Vec<(String, Vec<FieldScore>)> {
    use reddino_models::synth::{render, FieldSpec, SourcePreset};
    SourcePreset::all()
        .into_iter()
        .map(|source| {
            let scores = (0..fields)
                .map(|seed| {
                    let field = render(&FieldSpec::new(1280, 960, 1000 + seed, source.clone()))
                        .expect("synthetic field");
                    let points: Vec<(f32, f32)> = field.cells.iter().map(|c| c.center).collect();
                    score_field(&seed.to_string(), &field.image, &points, cfg)
                })
                .collect();
            (source.name.clone(), scores)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc_field(centres: &[(f32, f32)], r: f32) -> RgbImage {
        RgbImage::from_fn(200, 120, |x, y| {
            let inside = centres
                .iter()
                .any(|c| (x as f32 - c.0).hypot(y as f32 - c.1) <= r);
            if inside {
                image::Rgb([170, 90, 110])
            } else {
                image::Rgb([235, 235, 230])
            }
        })
    }

    #[test]
    fn scores_found_missed_and_merged_cells() {
        let centres = [(40.0, 40.0), (120.0, 40.0), (60.0, 90.0)];
        let img = disc_field(&centres, 14.0);
        let cfg = CellFinderConfig::default();
        // Every disc labelled, plus one label on empty background: 3 of 4 found.
        let mut points = centres.to_vec();
        points.push((170.0, 100.0));
        let s = score_field("f", &img, &points, &cfg);
        assert_eq!(s.labels, 4);
        assert_eq!(s.interior_found + s.border_found, 3);
        assert_eq!(s.detections, 3);
        assert_eq!(s.merged, 0);
        // Two labels in one disc: one found, one merged.
        let s = score_field("f", &img, &[(36.0, 40.0), (44.0, 40.0)], &cfg);
        assert_eq!(s.interior_found, 1);
        assert_eq!(s.merged, 1);
        assert_eq!(s.merged_labels, 1);
    }

    #[test]
    fn border_cells_are_scored_apart() {
        let img = disc_field(&[(5.0, 60.0), (100.0, 60.0)], 14.0);
        let s = score_field(
            "f",
            &img,
            &[(5.0, 60.0), (100.0, 60.0)],
            &CellFinderConfig::default(),
        );
        assert_eq!((s.border, s.border_found), (1, 1));
        assert_eq!((s.interior, s.interior_found), (1, 1));
    }

    #[test]
    fn summary_medians_and_counts_dense_fields() {
        let field = |labels, cell_sized| FieldScore {
            name: String::new(),
            labels,
            interior: labels,
            interior_found: labels,
            border: 0,
            border_found: 0,
            detections: cell_sized,
            cell_sized,
            radius: 10.0,
            interior_cell_sized: cell_sized,
            merged: 0,
            merged_labels: 0,
            on_marks: 2,
            ms: 1.0,
        };
        let s = Summary::of(&[
            field(100, 100),
            field(100, 140),
            field(100, 90),
            field(10, 50),
        ]);
        assert_eq!(s.dense_fields, 3);
        assert!((s.median_ratio - 1.0).abs() < 1e-9);
        assert_eq!(s.dense_off, 1);
        assert_eq!(s.interior_recall, 1.0);
        assert_eq!(s.on_marks, 8);
    }

    #[test]
    fn a_paler_stain_scales_each_pixels_density_against_the_background() {
        // Background 200 (most of the field), a cell at 50 (density ln 4 in each channel).
        let img = RgbImage::from_fn(40, 40, |x, _| {
            if x < 4 {
                image::Rgb([50, 50, 50])
            } else {
                image::Rgb([200, 200, 200])
            }
        });
        assert_eq!(restain(img.clone(), 1.0), img);
        let pale = restain(img.clone(), 0.5);
        // Half the density: 200 / 2 = 100; the background stays.
        assert_eq!(pale.get_pixel(0, 0).0, [100, 100, 100]);
        assert_eq!(pale.get_pixel(20, 0).0, [200, 200, 200]);
        let strong = restain(img, 1.5);
        assert_eq!(strong.get_pixel(0, 0).0, [25, 25, 25]);
    }

    #[test]
    fn the_marks_are_black_where_their_mask_says_and_nowhere_else() {
        let img = RgbImage::from_pixel(640, 480, image::Rgb([220, 215, 225]));
        let mut marked = img.clone();
        let mask = draw_marks(&mut marked);
        for ((x, y, px), &m) in marked.enumerate_pixels().zip(&mask) {
            let dark = px.0.iter().all(|&v| v <= 28);
            assert_eq!(dark, m, "({x}, {y}) {:?}", px.0);
            if !m {
                assert_eq!(px, img.get_pixel(x, y));
            }
        }
        let at = |x: u32, y: u32| mask[(y * 640 + x) as usize];
        // The pointer enters at the left edge, 14 pixels wide, and ends at four tenths of the
        // width; the scale bar is in the lower right corner.
        assert!(at(0, 161) && at(0, 168) && at(0, 174) && !at(0, 158) && !at(0, 178));
        let across = |x: u32| (150..230).filter(|&y| at(x, y)).count();
        assert_eq!((across(128), across(250), across(262)), (8, 1, 0));
        assert!(at(600, 448) && at(520, 448) && !at(620, 448) && !at(500, 448));
        // Its legend above it: glyph strokes, with background between them.
        let legend = (410..445).filter(|&y| at(517, y)).count();
        assert!(legend > 10, "{legend}");
        let covered = mask.iter().filter(|&&m| m).count();
        assert!((2_500..4_000).contains(&covered), "{covered}");
    }

    #[test]
    fn detections_on_the_marks_count_when_mostly_on_them_and_inside_the_frame() {
        // Two detections on a 10x10 frame: one 4 pixels wholly on the marks, one at the frame's
        // edge on them; a third half on them.
        let mut owners = OwnerMap::new(10, 10);
        let mut marks = vec![false; 100];
        let cell = |x0, y0, x1, y1, area| cells::Cell {
            bbox: [x0, y0, x1, y1],
            center: (0.0, 0.0),
            area,
        };
        let found = [
            cell(2, 2, 4, 4, 4),
            cell(0, 6, 2, 8, 4),
            cell(6, 2, 8, 4, 4),
        ];
        for (i, c) in found.iter().enumerate() {
            let [x0, y0, x1, y1] = c.bbox;
            for y in y0..y1 {
                for x in x0..x1 {
                    let k = (y * 10 + x) as usize;
                    owners.ids[k] = i as u32;
                    marks[k] = i < 2 || x == 6;
                }
            }
        }
        assert_eq!(on_marks(&found, &owners, &marks), 2);
        marks[(2 * 10 + 7) as usize] = false;
        marks[(3 * 10 + 6) as usize] = false;
        assert_eq!(on_marks(&found, &owners, &marks), 1);
    }

    #[test]
    fn a_vignette_darkens_the_corners_by_its_loss_and_spares_the_centre() {
        let img = RgbImage::from_pixel(41, 31, image::Rgb([200, 100, 50]));
        assert_eq!(vignette(img.clone(), 0.0), img);
        let dim = vignette(img, 0.3);
        assert_eq!(dim.get_pixel(20, 15).0, [200, 100, 50]);
        assert_eq!(dim.get_pixel(0, 0).0, [140, 70, 35]);
        assert_eq!(dim.get_pixel(40, 30).0, [140, 70, 35]);
        // Ten pixels right of the centre, 25 from the corners: 100 / 625 of the loss.
        assert_eq!(
            dim.get_pixel(30, 15).0[0],
            200 - (200.0f32 * 0.3 * 100.0 / 625.0).round() as u8
        );
    }
}
