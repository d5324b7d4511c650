//! Cell finding: stain-robust foreground, hole filling, distance transform and a
//! dynamics-based watershed that splits touching cells, size filters, each cell grown back into
//! its thin parts, boxes for cropping. Also the tile mode (non-overlapping model-size tiles).
//!
//! Foreground is optical density summed over R, G and B against a background estimated per
//! block (so vignetting and stain tone do not move the threshold); the threshold sits a few
//! noise widths above the background mode. The watershed floods the distance transform from
//! its peaks and keeps two basins apart only when both rise more than `h` above the level
//! where they meet, with `h` scaled to the typical cell radius of the frame; a pixel joins the
//! basin of its neighbour highest on the distance map. The opening that removes specks also
//! removes parts of a cell one or two pixels wide (a fragment's corners, a spicule's tip): each
//! cell then claims the stained pixels around it above a lower threshold, a few pixels out.
//!
//! One file per step, in the order a frame meets them: `foreground` (background light,
//! optical density, threshold, mask clean-up), `distance` (distance transform),
//! `watershed` (objects, typical radius, flooding), `splits` (necks, blue parts),
//! `grow` (basin statistics, growing back); `score` scores detections against labels.
//! This file holds the API ([`find`], [`CellFinderConfig`], [`Cell`]) and runs the steps.

mod distance;
mod foreground;
mod grow;
mod score;
mod splits;
mod watershed;

pub use score::{greedy_pairs, match_centres, Match};

use foreground::{
    box3, channel_weights, clear_opaque, density_thresholds, ln_table, opened_mask,
    optical_density, Background,
};
use grow::{Acc, Grow};
use splits::{split_blue_parts, split_necks};
use watershed::{
    disc_radius, flood_clump, median_peak, objects, plain_median_peak, run_end, Object,
};

use image::RgbImage;
use rayon::prelude::*;
use reddino_models::preprocess::OwnerMap;
use serde::{Deserialize, Serialize};

/// How cells are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Segment individual cells.
    #[default]
    Cells,
    /// Cut the frame into non-overlapping model-size tiles.
    Tiles,
}

/// Cell finder settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CellFinderConfig {
    pub mode: Mode,
    /// Side of the blocks used to estimate the background light (with `background_radii`, of
    /// the first look's blocks only).
    pub background_block: u32,
    /// Blocks of the background this many typical cell radii wide (at least 16 pixels; the
    /// radius from `um_per_px`, or from a first look with `background_block`): a block must
    /// hold background between its cells, and light changes over a few cells. 0 = every
    /// frame's blocks are `background_block` wide.
    pub background_radii: f32,
    /// Threshold = background mode + this many noise widths (and at least `min_density`).
    pub noise_widths: f32,
    /// In a pale field the cells stand few noise widths above the background, and a threshold
    /// of `noise_widths` (or `min_density`) cuts their rims into arcs and specks (and the
    /// typical radius read from them is a speck's). The threshold is then at most this
    /// fraction of the cells' contrast (the density's 95th percentile over the background
    /// mode), down to `min_widths` noise widths, and so is the floor `min_density`; 0 = always
    /// `noise_widths` and `min_density`.
    pub contrast_fraction: f32,
    /// The fewest noise widths `contrast_fraction` lowers the threshold to.
    pub min_widths: f32,
    /// A background block darker than most of its neighbours by more than this (summed natural
    /// log over R, G, B) is taken as covered by a cell and takes its brightest neighbour's
    /// light; 0 = every block takes the brightest of its 3x3 neighbourhood. Vignetting darkens
    /// the blocks towards the corners too, each step a little: at 0.2 a field whose corners
    /// get half the light of its centre read its corners as covered.
    pub background_covered: f32,
    /// Between the outer blocks' centres and the frame's edge, the background's light goes on
    /// changing as it does from the next block in to the outer one (else it is the outer
    /// block's). Under vignetting the light keeps falling to the corners: held at the outer
    /// block's, the corners' last half block reads as stain, and in a pale field whose
    /// threshold is low, as specks that pass for the cells. Off in both profiles: it moves the
    /// boxes of one crop in seven on the Chula fields, and reddino-chula was fine-tuned on the
    /// boxes of the light held (docs/benchmarks.md, "Light followed to the frame's edges").
    pub follow_light: bool,
    /// Noise width from the median deviation below the background mode (else from the
    /// half-width at half maximum of a coarse histogram, which 8-bit steps quantise).
    pub median_noise: bool,
    /// The typical radius leaves specks out and counts each clump once (else the plain median
    /// of every object's distance peak).
    pub skip_specks: bool,
    /// Weigh the colour channels by their contrast over noise in each frame (see
    /// `channel_weights`) instead of summing them.
    pub weigh_channels: bool,
    /// Threshold the density's 3x3 mean (JPEG and sensor noise averaged out).
    pub smooth: bool,
    /// Pallor behind a rim broken by gaps up to twice this many pixels wide is filled (see
    /// `close_rings`); 0 = off.
    pub close_gaps: u32,
    /// Background enclosed by an object is filled (a cell's pallor) when its area is at most
    /// that of a disc of this fraction of the typical radius; larger enclosed regions (the
    /// space inside a ring of touching cells) stay background; 0 = every hole filled.
    pub max_pallor: f32,
    /// The least dynamics (pixels) that keeps two basins apart, whatever the cell size.
    pub min_split: f32,
    /// Objects larger than this many typical cells are clumps: see `flood_clump`; 0 = off.
    pub clump_area: f32,
    /// Micrometres per pixel of the camera, when known: the cells' size follows from it (a red
    /// cell is 7.5 um across). 0 = the typical cell size is found in each frame.
    pub um_per_px: f32,
    /// With `smooth`, a pixel must also be this many noise widths above the background on its
    /// own (unsmoothed); 0 = off.
    pub raw_widths: f32,
    /// `smooth` and `close_gaps` only when the typical cell radius is at least this many
    /// pixels: both shut the narrow gaps between small packed cells (a dense field at a low
    /// magnification then reads as clumps).
    pub smooth_min_radius: f32,
    /// Smallest summed optical density counted as stained.
    pub min_density: f32,
    /// Basins split when both rise this fraction of the typical radius above their meeting level.
    pub split_dynamics: f32,
    /// A blue-stained part at the edge of a cell (a platelet lying against or on a red cell)
    /// becomes a cell of its own when its red-minus-blue optical density exceeds this and it
    /// covers at most a quarter of the cell; 0 = off.
    pub split_blue: f32,
    /// A fragment or a sickle lying against a round cell, with a broad contact, has no peak of
    /// its own on the distance map; the outline still shows it as two bays on either side of
    /// the contact. A cell is cut along the line between the deepest points of two bays when
    /// that line is shorter than this multiple of the two bays' depths together (and both parts
    /// hold at least a fifth of it); 0 = off.
    pub split_necks: f32,
    /// Thin and faint parts of a cell that the opening cuts off or that stay below the
    /// threshold (a fragment's sharp corners, a spicule's tip, a tail) join the cell they touch:
    /// stained pixels above `grow_widths` noise widths, at most this many pixels out from the
    /// cell's opened outline, are added to it (its box, area, centre and owned pixels). Which
    /// cells are found is decided before: debris does not grow. 0 = off.
    pub grow_steps: u32,
    /// Threshold for `grow_steps`, in noise widths above the background mode (at most
    /// `noise_widths`; `min_density` still applies).
    pub grow_widths: f32,
    /// Objects smaller than this fraction of the median object area are dropped as debris.
    pub min_area_fraction: f32,
    /// Objects smaller than this fraction of the typical cell's area (the median area of the
    /// objects as wide as a cell) are dropped as debris too: where specks of stain outnumber
    /// the cells, the median object is a speck. 0 = off.
    pub min_cell_fraction: f32,
    /// A pixel dense in every channel (under 61% of the background's light in R, G and B)
    /// whose least channel's density is at least this fraction of its greatest's is opaque and
    /// grey, not stained: an eyepiece pointer, a scale bar or its legend, dirt. It and the grey
    /// pixels joined to it (its blurred edge) are neither cell nor background: no cell is found
    /// on them, none grows into them, the threshold does not count them. 0 = off.
    pub drop_neutral: f32,
    /// Objects touching the frame border are dropped (they are counted in the next field).
    pub drop_border: bool,
    /// Tile side for `Mode::Tiles` (the model input size).
    pub tile: u32,
}

impl Default for CellFinderConfig {
    fn default() -> Self {
        CellFinderConfig {
            mode: Mode::Cells,
            background_block: 96,
            background_radii: 0.0,
            noise_widths: 6.0,
            contrast_fraction: 0.0,
            min_widths: 3.0,
            background_covered: 0.0,
            follow_light: false,
            median_noise: false,
            skip_specks: false,
            weigh_channels: false,
            smooth: false,
            close_gaps: 0,
            max_pallor: 0.0,
            clump_area: 0.0,
            min_split: 1.2,
            um_per_px: 0.0,
            smooth_min_radius: 11.0,
            raw_widths: 4.0,
            min_density: 0.10,
            split_dynamics: 0.14,
            split_blue: 0.25,
            split_necks: 1.0,
            grow_steps: 3,
            grow_widths: 4.0,
            min_area_fraction: 0.02,
            min_cell_fraction: 0.0,
            drop_neutral: 0.0,
            drop_border: true,
            tile: 224,
        }
    }
}

impl CellFinderConfig {
    /// The finder's settings for real smears (pale and strong stains, JPEG noise, overlapping
    /// cells, vignetting): channels weighed by contrast over noise, the density smoothed and
    /// gated by each pixel's own, the noise width from the median deviation, the threshold
    /// following the cells' contrast in a pale field, rims' gaps closed, enclosed background
    /// bigger than a pallor left open, clumps split, the typical radius without specks, blocks
    /// of background 2.4 cell radii wide and taken from their neighbours only when covered by
    /// something dark, specks under a twentieth of a cell dropped, and opaque grey marks (a
    /// pointer, a scale bar) dropped.
    /// [`CellFinderConfig::default`] keeps the settings the synthetic microscope and its demo
    /// model were built with.
    pub fn real_smear() -> Self {
        CellFinderConfig {
            background_covered: 1.0,
            background_radii: 2.4,
            median_noise: true,
            skip_specks: true,
            weigh_channels: true,
            smooth: true,
            close_gaps: 2,
            max_pallor: 0.8,
            clump_area: 1.3,
            smooth_min_radius: 15.0,
            split_dynamics: 0.1,
            min_cell_fraction: 0.05,
            contrast_fraction: 0.35,
            drop_neutral: 0.75,
            ..CellFinderConfig::default()
        }
    }

    /// These settings with the fields given in `toml` (e.g. `"split_necks = 0"`) changed.
    pub fn with_settings(&self, toml_text: &str) -> Result<Self, toml::de::Error> {
        let mut table = toml::Value::try_from(self).expect("finder settings serialise");
        let changes: toml::Table = toml::from_str(toml_text)?;
        if let toml::Value::Table(t) = &mut table {
            t.extend(changes);
        }
        table.try_into()
    }

    /// The profile a model's crops were cut with (its manifest's `cell_finder`; empty: the
    /// default profile).
    pub fn for_model(m: &reddino_models::bundle::Manifest) -> Result<Self, ProfileError> {
        match m.cell_finder.as_str() {
            "" => Ok(CellFinderConfig::default()),
            name => CellFinderConfig::profile(name).map_err(|_| ProfileError::ModelNeeds {
                model: format!("{} {}", m.name, m.version),
                name: name.to_string(),
            }),
        }
    }

    /// [`CellFinderConfig::for_model`] at the device's scale: `um_per_px` (`analysis.um_per_px`,
    /// 0 = unknown) gives the cells' size, so the finder skips its first look at each frame
    /// (the real-smear profile on the Chula fields: about 1.5x faster, the same recall within
    /// 0.001, docs/benchmarks.md).
    pub fn for_device(
        m: &reddino_models::bundle::Manifest,
        um_per_px: f32,
    ) -> Result<Self, ProfileError> {
        Ok(CellFinderConfig {
            um_per_px,
            ..CellFinderConfig::for_model(m)?
        })
    }

    /// The settings of a named profile: `default` (the synthetic microscope's) or `real-smear`.
    pub fn profile(name: &str) -> Result<Self, ProfileError> {
        match name {
            "default" => Ok(CellFinderConfig::default()),
            "real-smear" => Ok(CellFinderConfig::real_smear()),
            other => Err(ProfileError::Unknown(other.to_string())),
        }
    }
}

/// A finder profile this edge does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown finder profile {0:?} (known: default, real-smear)")]
    Unknown(String),
    #[error("model {model} asks for a cell finder this edge lacks: unknown finder profile {name:?} (known: default, real-smear); update reddino-edge")]
    ModelNeeds { model: String, name: String },
}

/// A found cell (or tile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// `[x0, y0, x1, y1]`, x1/y1 exclusive.
    pub bbox: [u32; 4],
    /// Centroid of the cell's pixels.
    pub center: (f32, f32),
    /// Pixels in the cell.
    pub area: u32,
}

/// Finds cells (or tiles) in an RGB frame.
pub fn find(img: &RgbImage, cfg: &CellFinderConfig) -> Vec<Cell> {
    match cfg.mode {
        Mode::Cells => find_cells(img, cfg, None),
        Mode::Tiles => tiles(img.width(), img.height(), cfg.tile),
    }
}

/// [`find`], and which found cell each pixel belongs to (indices into the returned cells;
/// [`OwnerMap::OTHER`] for objects left out: debris, cells at the frame's border). Tiles own
/// no pixels.
pub fn find_with_owners(img: &RgbImage, cfg: &CellFinderConfig) -> (Vec<Cell>, OwnerMap) {
    let mut owners = OwnerMap::new(img.width(), img.height());
    let cells = match cfg.mode {
        Mode::Cells => find_cells(img, cfg, Some(&mut owners)),
        Mode::Tiles => tiles(img.width(), img.height(), cfg.tile),
    };
    (cells, owners)
}

/// [`find_with_owners`] when `owners`, else [`find`] (and no map).
pub fn find_maybe_owners(
    img: &RgbImage,
    cfg: &CellFinderConfig,
    owners: bool,
) -> (Vec<Cell>, Option<OwnerMap>) {
    if owners {
        let (cells, map) = find_with_owners(img, cfg);
        (cells, Some(map))
    } else {
        (find(img, cfg), None)
    }
}

/// Non-overlapping `tile` x `tile` tiles covering the frame (partial edge tiles dropped).
pub fn tiles(width: u32, height: u32, tile: u32) -> Vec<Cell> {
    if tile == 0 {
        return vec![];
    }
    let mut out = Vec::new();
    for ty in 0..height / tile {
        for tx in 0..width / tile {
            let (x0, y0) = (tx * tile, ty * tile);
            out.push(Cell {
                bbox: [x0, y0, x0 + tile, y0 + tile],
                center: ((x0 + tile / 2) as f32, (y0 + tile / 2) as f32),
                area: tile * tile,
            });
        }
    }
    out
}

/// Radius of a red cell in micrometres (7.5 um across).
pub const CELL_RADIUS_UM: f32 = 3.75;

fn find_cells(
    img: &RgbImage,
    cfg: &CellFinderConfig,
    mut owners: Option<&mut OwnerMap>,
) -> Vec<Cell> {
    let (w, h) = img.dimensions();
    if w < 3 || h < 3 {
        return vec![];
    }
    let wu = w as usize;
    let ln = ln_table();
    let known_r = (cfg.um_per_px > 0.0).then(|| CELL_RADIUS_UM / cfg.um_per_px);
    // The background's blocks: `background_block` wide, or `background_radii` cells wide
    // (the radius known, or from the first look below).
    let scaled = cfg.background_radii > 0.0;
    let block_for = |r: f32| ((cfg.background_radii * r).round() as u32).max(16);
    let density = |block: u32| {
        let bg = Background::of(img, block, cfg.background_covered, cfg.follow_light);
        let weights = if cfg.weigh_channels {
            channel_weights(img, &bg, &ln)
        } else {
            [1.0; 3]
        };
        let mut raw = optical_density(img, &bg, &ln, weights);
        if cfg.drop_neutral > 0.0 {
            clear_opaque(&mut raw, img, &bg, &ln, weights, cfg.drop_neutral);
        }
        (bg, raw)
    };
    let (mut bg, mut raw) = density(match known_r {
        Some(r) if scaled => block_for(r),
        _ => cfg.background_block,
    });
    let mut rescale = scaled && known_r.is_none();
    // Smoothing and closing the rims' gaps shut the gaps between small touching cells: only
    // for cells of at least `smooth_min_radius`, known or found by a first look without them
    // (with them, a field of small packed cells would read as a few clumps of a large radius).
    let mut large = known_r.is_some_and(|r| r >= cfg.smooth_min_radius);
    let mut decided = known_r.is_some() || !(cfg.smooth || cfg.close_gaps > 0);
    let (smoothed, t, t_grow, objs, typical_r) = loop {
        let smooth = cfg.smooth && large;
        let cfg_here;
        let cfg = if large || cfg.close_gaps == 0 {
            cfg
        } else {
            cfg_here = CellFinderConfig {
                close_gaps: 0,
                ..cfg.clone()
            };
            &cfg_here
        };
        let smoothed = smooth.then(|| box3(&raw, wu));
        let od = smoothed.as_deref().unwrap_or(&raw);
        // Smoothed, a pixel must also stand out on its own (the gap between touching cells
        // stays open though its neighbours raise its mean).
        let gate = (smooth && cfg.raw_widths > 0.0).then(|| {
            let [t] = density_thresholds(&raw, cfg, [cfg.raw_widths], false);
            (raw.as_slice(), t)
        });
        let (t, t_grow, objs, r) = foreground(od, gate, wu, cfg, known_r);
        let Some(r) = r else {
            return vec![];
        };
        // The first look: the cells' radius decides the smoothing and the blocks.
        let mut again = false;
        if !decided || rescale {
            // A pale cell whose rim is broken is a ring open on one side: its distance peak
            // is half the rim's width, its area still that of a cell.
            let r_cell = r.max(disc_radius(&objs, r));
            if !decided {
                decided = true;
                large = r_cell >= cfg.smooth_min_radius;
                again = large;
            }
            if rescale {
                rescale = false;
                let block = block_for(r_cell);
                if block != bg.block {
                    (bg, raw) = density(block);
                    again = true;
                }
            }
        }
        if !again {
            break (smoothed, t, t_grow, objs, r);
        }
    };
    // The density the cells were found on (and grow on).
    let od = smoothed.as_deref().unwrap_or(&raw);
    let h_dyn = (cfg.split_dynamics * typical_r).max(cfg.min_split);
    // Typical cell area: the median area of the objects as wide as a cell.
    let mut cell_areas: Vec<usize> = objs
        .iter()
        .filter(|o| o.peak >= 0.5 * typical_r)
        .map(|o| o.area)
        .collect();
    cell_areas.sort_unstable();
    let typical_area = cell_areas.get(cell_areas.len() / 2).copied().unwrap_or(0) as f32;

    const NONE: u32 = u32::MAX;
    let growing = cfg.grow_steps > 0;
    // The basin of each pixel over the frame (`NONE` off every basin), for growing. With an
    // owner map asked for, the map's buffer is the basin map (its background is `NONE`): one
    // frame-sized buffer filled and written, not two.
    const _: () = assert!(NONE == OwnerMap::BACKGROUND && NONE == Grow::NONE);
    let mut basin = match owners.as_deref_mut() {
        Some(o) if growing => std::mem::take(&mut o.ids),
        _ if growing => vec![NONE; wu * h as usize],
        _ => Vec::new(),
    };
    // Statistics per basin; basin `l` of an object is `found[base + l]`.
    let mut found: Vec<Acc> = Vec::new();
    // Each object's basins on its own (objects side by side on the pool's threads), then
    // gathered in the objects' order: the same cells whatever the number of threads.
    let split: Vec<(Vec<u32>, Vec<Acc>)> = objs
        .par_iter()
        .with_max_len(1)
        .map(|obj| {
            let (labels, n) = flood_clump(obj, h_dyn, typical_area, cfg.clump_area);
            let (labels, n) = split_blue_parts(img, &bg, obj, labels, n, cfg.split_blue, &ln);
            let (labels, n) = split_necks(obj, labels, n, typical_r, cfg.split_necks);
            let mut acc = vec![Acc::EMPTY; n];
            // A basin's pixels run along the rows: each run added at once.
            for (ly, row) in labels.chunks_exact(obj.w).enumerate() {
                let y = (obj.y0 + ly) as u32;
                let mut lx = 0;
                while lx < row.len() {
                    let (l, end) = (row[lx], run_end(row, lx));
                    if l != NONE {
                        let x = obj.x0 as u32;
                        acc[l as usize].add_run(x + lx as u32, x + end as u32, y, w, h);
                    }
                    lx = end;
                }
            }
            (labels, acc)
        })
        .collect();
    for (obj, (labels, acc)) in objs.iter().zip(split) {
        let base = found.len() as u32;
        let map = if growing {
            Some(&mut basin[..])
        } else {
            owners.as_deref_mut().map(|o| &mut o.ids[..])
        };
        if let Some(map) = map {
            for (ly, row) in labels.chunks_exact(obj.w).enumerate() {
                let at = (obj.y0 + ly) * wu + obj.x0;
                for (m, &l) in map[at..at + obj.w].iter_mut().zip(row) {
                    if l != NONE {
                        *m = base + l;
                    }
                }
            }
        }
        // Empty basins stay (their indices are in the owner map); the area filter drops them.
        found.extend(acc);
    }
    // Debris: basins smaller than a fraction of the median basin or of the typical cell
    // (before growing, so that growing changes boxes, never which cells are found).
    let mut areas: Vec<u32> = found.iter().map(|a| a.n).filter(|&n| n > 0).collect();
    if areas.is_empty() {
        return vec![];
    }
    areas.sort_unstable();
    let median = areas[areas.len() / 2];
    let min_area = ((median as f32 * cfg.min_area_fraction) as u32)
        .max((typical_area * cfg.min_cell_fraction) as u32)
        .max(6);
    let kept: Vec<bool> = found.iter().map(|a| a.n >= min_area).collect();
    if growing {
        let grow = Grow {
            od,
            threshold: t_grow.min(t),
            w: wu,
            h: h as usize,
            grows: &kept,
        };
        for (i, l) in grow.run(&mut basin, &objs, cfg.grow_steps) {
            let (x, y) = (i % w, i / w);
            found[l as usize].add(x, y, w, h);
        }
    }
    // Grown, the basin map is the owner map before its basins become cell indices.
    match owners.as_deref_mut() {
        Some(o) if growing => o.ids = basin,
        _ => drop(basin),
    }
    drop(smoothed);
    drop(raw);
    let mut cells: Vec<(usize, Cell)> = found
        .iter()
        .enumerate()
        .filter(|(k, a)| kept[*k] && !(cfg.drop_border && a.border))
        .map(|(k, a)| {
            let cell = Cell {
                bbox: [a.x0, a.y0, a.x1, a.y1],
                center: a.centre(),
                area: a.n,
            };
            (k, cell)
        })
        .collect();
    cells.sort_by(|(_, a), (_, b)| {
        (a.center.1, a.center.0)
            .partial_cmp(&(b.center.1, b.center.0))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if let Some(o) = owners {
        let mut index = vec![OwnerMap::OTHER; found.len()];
        for (i, (k, _)) in cells.iter().enumerate() {
            index[*k] = i as u32;
        }
        // Cells cover a small part of a frame: sixteen pixels at a time are passed over when
        // all are background (one test without a branch), before any is looked up.
        o.ids.par_chunks_mut(1 << 16).for_each(|ids| {
            for chunk in ids.chunks_mut(16) {
                if chunk
                    .iter()
                    .fold(true, |a, &id| a & (id == OwnerMap::BACKGROUND))
                {
                    continue;
                }
                for id in chunk.iter_mut().filter(|id| **id != OwnerMap::BACKGROUND) {
                    *id = index[*id as usize];
                }
            }
        });
    }
    cells.into_iter().map(|(_, c)| c).collect()
}

/// The thresholds (cells, growing), the objects of the opened mask and the typical cell radius
/// (`known_r`, or found from the objects; `None` when there are none) of a density map.
fn foreground(
    od: &[f32],
    gate: Option<(&[f32], f32)>,
    w: usize,
    cfg: &CellFinderConfig,
    known_r: Option<f32>,
) -> (f32, f32, Vec<Object>, Option<f32>) {
    let widths = [cfg.noise_widths, cfg.grow_widths];
    let [t, t_grow] = density_thresholds(od, cfg, widths, true);
    // The mask opened with a 3x3 square (specks and one-pixel bridges removed).
    let h = od.len() / w;
    let mask = match gate {
        Some((raw, tr)) => opened_mask(w, h, |y, row| {
            let at = y * w..(y + 1) * w;
            for ((m, &v), &r) in row.iter_mut().zip(&od[at.clone()]).zip(&raw[at]) {
                *m = (v > t && r > tr) as u8;
            }
        }),
        None => opened_mask(w, h, |y, row| {
            for (m, &v) in row.iter_mut().zip(&od[y * w..(y + 1) * w]) {
                *m = (v > t) as u8;
            }
        }),
    };
    let mut objs = objects(&mask, w, cfg.close_gaps, usize::MAX);
    let typical = |objs: &[Object]| {
        if cfg.skip_specks {
            median_peak(objs)
        } else {
            plain_median_peak(objs)
        }
    };
    let Some(mut typical_r) = known_r.or_else(|| typical(&objs)) else {
        return (t, t_grow, objs, None);
    };
    // Holes bigger than a pallor are the background a ring of touching cells closes in: find
    // the objects again with those left open (and whatever lies inside them found on its own).
    if cfg.max_pallor > 0.0 {
        let max_hole = (std::f32::consts::PI * (cfg.max_pallor * typical_r).powi(2)) as usize;
        if objs.iter().any(|o| o.largest_hole > max_hole) {
            objs = objects(&mask, w, cfg.close_gaps, max_hole);
            match known_r.or_else(|| typical(&objs)) {
                Some(r) => typical_r = r,
                None => return (t, t_grow, objs, None),
            }
        }
    }
    (t, t_grow, objs, Some(typical_r))
}

#[cfg(test)]
mod tests;
