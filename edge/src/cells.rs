//! Cell finding: stain-robust foreground, hole filling, distance transform and a
//! dynamics-based watershed that splits touching cells, size filters, boxes for cropping.
//! Also the tile mode (non-overlapping model-size tiles).
//!
//! Foreground is optical density summed over R, G and B against a background estimated per
//! block (so vignetting and stain tone do not move the threshold); the threshold sits a few
//! noise widths above the background mode. The watershed floods the distance transform from
//! its peaks and keeps two basins apart only when both rise more than `h` above the level
//! where they meet, with `h` scaled to the typical cell radius of the frame.

use image::{GrayImage, Luma, RgbImage};
use imageproc::distance_transform::euclidean_squared_distance_transform;
use imageproc::morphology::open_mut;
use imageproc::region_labelling::{connected_components, Connectivity};
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
    /// Side of the blocks used to estimate the background light.
    pub background_block: u32,
    /// Threshold = background mode + this many noise widths (and at least `min_density`).
    pub noise_widths: f32,
    /// Smallest summed optical density counted as stained.
    pub min_density: f32,
    /// Basins split when both rise this fraction of the typical radius above their meeting level.
    pub split_dynamics: f32,
    /// Objects smaller than this fraction of the median object area are dropped as debris.
    pub min_area_fraction: f32,
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
            noise_widths: 6.0,
            min_density: 0.10,
            split_dynamics: 0.14,
            min_area_fraction: 0.02,
            drop_border: true,
            tile: 224,
        }
    }
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
        Mode::Cells => find_cells(img, cfg),
        Mode::Tiles => tiles(img.width(), img.height(), cfg.tile),
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

/// Natural log of the background light per pixel and channel, from the 90th percentile of
/// each block, taking the brightest of the 3x3 neighbouring blocks (so a large cell covering
/// a block does not pass for background), bilinearly interpolated.
fn log_background(img: &RgbImage, block: u32) -> [Vec<f32>; 3] {
    let (w, h) = img.dimensions();
    let block = block.max(8);
    let gw = w.div_ceil(block) as usize;
    let gh = h.div_ceil(block) as usize;
    let mut pct = vec![[0f32; 3]; gw * gh];
    let raw = img.as_raw();
    for by in 0..gh {
        for bx in 0..gw {
            let mut hist = [[0u32; 256]; 3];
            let (x0, y0) = (bx as u32 * block, by as u32 * block);
            let (x1, y1) = ((x0 + block).min(w), (y0 + block).min(h));
            for y in y0..y1 {
                let row = &raw[((y * w + x0) * 3) as usize..((y * w + x1) * 3) as usize];
                for px in row.chunks_exact(3) {
                    for c in 0..3 {
                        hist[c][px[c] as usize] += 1;
                    }
                }
            }
            let n = (x1 - x0) * (y1 - y0);
            let target = (n as f32 * 0.9) as u32;
            for c in 0..3 {
                let mut acc = 0;
                let mut v = 255;
                for (i, cnt) in hist[c].iter().enumerate() {
                    acc += cnt;
                    if acc >= target {
                        v = i;
                        break;
                    }
                }
                pct[by * gw + bx][c] = (v.max(1) as f32).ln();
            }
        }
    }
    let mut dil = pct.clone();
    for by in 0..gh {
        for bx in 0..gw {
            let mut m = [f32::MIN; 3];
            for ny in by.saturating_sub(1)..(by + 2).min(gh) {
                for nx in bx.saturating_sub(1)..(bx + 2).min(gw) {
                    for c in 0..3 {
                        m[c] = m[c].max(pct[ny * gw + nx][c]);
                    }
                }
            }
            dil[by * gw + bx] = m;
        }
    }
    let mut out = [
        vec![0f32; (w * h) as usize],
        vec![0f32; (w * h) as usize],
        vec![0f32; (w * h) as usize],
    ];
    let coord = |p: u32, n: usize| -> (usize, usize, f32) {
        let f = ((p as f32 + 0.5) / block as f32 - 0.5).clamp(0.0, (n - 1) as f32);
        let i0 = f.floor() as usize;
        let i1 = (i0 + 1).min(n - 1);
        (i0, i1, f - i0 as f32)
    };
    for y in 0..h {
        let (y0, y1, fy) = coord(y, gh);
        for x in 0..w {
            let (x0, x1, fx) = coord(x, gw);
            let i = (y * w + x) as usize;
            for c in 0..3 {
                let a = dil[y0 * gw + x0][c] * (1.0 - fx) + dil[y0 * gw + x1][c] * fx;
                let b = dil[y1 * gw + x0][c] * (1.0 - fx) + dil[y1 * gw + x1][c] * fx;
                out[c][i] = a * (1.0 - fy) + b * fy;
            }
        }
    }
    out
}

/// Summed optical density over R, G, B against the estimated background (negative where a
/// pixel is brighter than the estimate: background noise stays symmetric around its mode).
fn optical_density(img: &RgbImage, block: u32) -> Vec<f32> {
    let bg = log_background(img, block);
    let ln: Vec<f32> = (0..256).map(|v| (v.max(1) as f32).ln()).collect();
    img.as_raw()
        .chunks_exact(3)
        .enumerate()
        .map(|(i, px)| (0..3).map(|c| bg[c][i] - ln[px[c] as usize]).sum::<f32>())
        .collect()
}

/// Threshold a few noise widths above the background mode of the density histogram.
fn density_threshold(od: &[f32], cfg: &CellFinderConfig) -> f32 {
    const BINS: usize = 1024;
    const SCALE: f32 = 128.0;
    const OFFSET: f32 = 2.0;
    let mut hist = vec![0u32; BINS];
    for &v in od {
        hist[(((v + OFFSET) * SCALE).max(0.0) as usize).min(BINS - 1)] += 1;
    }
    let mode = hist
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| **c)
        .map(|(i, _)| i)
        .unwrap_or(0);
    // Noise width from the lower half-width at half maximum of the background mode (the
    // upper side mixes with faint cell edges).
    let half = hist[mode] / 2;
    let mut hw = 1;
    while hw < mode && hist[mode - hw] > half {
        hw += 1;
    }
    let sigma = hw as f32 / 1.1774 / SCALE;
    let m = (mode as f32 + 0.5) / SCALE - OFFSET;
    (m + cfg.noise_widths * sigma).max(m + cfg.min_density)
}

/// Fills background regions that do not reach the frame border (pallor, pale rings).
fn fill_holes(mask: &mut GrayImage) {
    let inv = GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        Luma([if mask.get_pixel(x, y)[0] == 0 { 255 } else { 0 }])
    });
    let labels = connected_components(&inv, Connectivity::Four, Luma([0u8]));
    let (w, h) = mask.dimensions();
    let mut border = std::collections::HashSet::new();
    for x in 0..w {
        border.insert(labels.get_pixel(x, 0)[0]);
        border.insert(labels.get_pixel(x, h - 1)[0]);
    }
    for y in 0..h {
        border.insert(labels.get_pixel(0, y)[0]);
        border.insert(labels.get_pixel(w - 1, y)[0]);
    }
    for (x, y, l) in labels.enumerate_pixels() {
        if l[0] != 0 && !border.contains(&l[0]) {
            mask.put_pixel(x, y, Luma([255]));
        }
    }
}

fn find_root(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let p = parent[i as usize];
        parent[i as usize] = parent[p as usize];
        i = p;
    }
    i
}

/// Watershed of the distance transform by flooding from the peaks; basins whose peak rises
/// less than `h` above the level where they meet a higher basin are merged into it.
/// Returns a label per pixel (`u32::MAX` for background).
fn flood(dist: &[f32], w: usize, h_dyn: f32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..dist.len() as u32)
        .filter(|&i| dist[i as usize] > 0.0)
        .collect();
    order.sort_unstable_by(|&a, &b| dist[b as usize].total_cmp(&dist[a as usize]));
    let hgt = dist.len() / w;
    let mut comp = vec![u32::MAX; dist.len()];
    let mut parent: Vec<u32> = Vec::new();
    let mut peak: Vec<f32> = Vec::new();
    let mut roots: Vec<u32> = Vec::with_capacity(8);
    for &p in &order {
        let (x, y) = (p as usize % w, p as usize / w);
        let level = dist[p as usize];
        roots.clear();
        for dy in -1i32..=1 {
            for dx in -1i32..=1 {
                if dx == 0 && dy == 0 {
                    continue;
                }
                let (nx, ny) = (x as i32 + dx, y as i32 + dy);
                if nx < 0 || ny < 0 || nx as usize >= w || ny as usize >= hgt {
                    continue;
                }
                let q = ny as usize * w + nx as usize;
                if comp[q] != u32::MAX {
                    let r = find_root(&mut parent, comp[q]);
                    if !roots.contains(&r) {
                        roots.push(r);
                    }
                }
            }
        }
        if roots.is_empty() {
            let id = parent.len() as u32;
            parent.push(id);
            peak.push(level);
            comp[p as usize] = id;
            continue;
        }
        roots.sort_unstable_by(|a, b| peak[*b as usize].total_cmp(&peak[*a as usize]));
        let best = roots[0];
        for &r in &roots[1..] {
            let pk = peak[r as usize];
            let dynamics = pk - level;
            // Small objects (platelets) touching a big one keep their own basin when they
            // rise clearly relative to their own size.
            let small_but_distinct = pk >= 2.5 && dynamics >= 1.0 && dynamics >= 0.35 * pk;
            if dynamics < h_dyn && !small_but_distinct {
                parent[r as usize] = best;
            }
        }
        comp[p as usize] = best;
    }
    for c in comp.iter_mut() {
        if *c != u32::MAX {
            *c = find_root(&mut parent, *c);
        }
    }
    comp
}

fn find_cells(img: &RgbImage, cfg: &CellFinderConfig) -> Vec<Cell> {
    let (w, h) = img.dimensions();
    if w < 3 || h < 3 {
        return vec![];
    }
    let od = optical_density(img, cfg.background_block);
    let t = density_threshold(&od, cfg);
    let mut mask = GrayImage::from_fn(w, h, |x, y| {
        Luma([if od[(y * w + x) as usize] > t { 255 } else { 0 }])
    });
    open_mut(&mut mask, imageproc::distance_transform::Norm::LInf, 1);
    fill_holes(&mut mask);

    // Distance of each foreground pixel to the background.
    let inv = GrayImage::from_fn(w, h, |x, y| {
        Luma([if mask.get_pixel(x, y)[0] == 0 { 255 } else { 0 }])
    });
    let dt2 = euclidean_squared_distance_transform(&inv);
    let dist: Vec<f32> = dt2.as_raw().iter().map(|v| (*v as f32).sqrt()).collect();

    // Typical radius: median of the objects' distance peaks.
    let objects = connected_components(&mask, Connectivity::Eight, Luma([0u8]));
    let mut peaks: std::collections::HashMap<u32, f32> = std::collections::HashMap::new();
    for (i, l) in objects.as_raw().iter().enumerate() {
        if *l != 0 {
            let e = peaks.entry(*l).or_insert(0.0);
            *e = e.max(dist[i]);
        }
    }
    let mut pv: Vec<f32> = peaks.into_values().collect();
    if pv.is_empty() {
        return vec![];
    }
    pv.sort_unstable_by(f32::total_cmp);
    let typical_r = pv[pv.len() / 2];
    let labels = flood(&dist, w as usize, (cfg.split_dynamics * typical_r).max(1.2));

    // Statistics per label.
    struct Acc {
        x0: u32,
        y0: u32,
        x1: u32,
        y1: u32,
        sx: f64,
        sy: f64,
        n: u32,
        border: bool,
    }
    let mut acc: std::collections::HashMap<u32, Acc> = std::collections::HashMap::new();
    for (i, &l) in labels.iter().enumerate() {
        if l == u32::MAX {
            continue;
        }
        let (x, y) = (i as u32 % w, i as u32 / w);
        let a = acc.entry(l).or_insert(Acc {
            x0: x,
            y0: y,
            x1: x + 1,
            y1: y + 1,
            sx: 0.0,
            sy: 0.0,
            n: 0,
            border: false,
        });
        a.x0 = a.x0.min(x);
        a.y0 = a.y0.min(y);
        a.x1 = a.x1.max(x + 1);
        a.y1 = a.y1.max(y + 1);
        a.sx += x as f64 + 0.5;
        a.sy += y as f64 + 0.5;
        a.n += 1;
        a.border |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
    }
    let mut areas: Vec<u32> = acc.values().map(|a| a.n).collect();
    areas.sort_unstable();
    let median = areas[areas.len() / 2];
    let min_area = ((median as f32 * cfg.min_area_fraction) as u32).max(6);
    let mut cells: Vec<Cell> = acc
        .into_values()
        .filter(|a| a.n >= min_area && !(cfg.drop_border && a.border))
        .map(|a| Cell {
            bbox: [a.x0, a.y0, a.x1, a.y1],
            center: ((a.sx / a.n as f64) as f32, (a.sy / a.n as f64) as f32),
            area: a.n,
        })
        .collect();
    cells.sort_by(|a, b| {
        (a.center.1, a.center.0)
            .partial_cmp(&(b.center.1, b.center.0))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    cells
}

/// Detection quality against ground truth: a detection matches a true cell when its centre is
/// within half the cell's radius; each true cell matches at most one detection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub true_positives: usize,
    pub detections: usize,
    pub truths: usize,
}

impl Match {
    pub fn recall(&self) -> f64 {
        self.true_positives as f64 / self.truths.max(1) as f64
    }
    pub fn precision(&self) -> f64 {
        self.true_positives as f64 / self.detections.max(1) as f64
    }
}

/// Greedy nearest matching of detected centres to true (centre, radius) pairs.
pub fn match_centres(found: &[(f32, f32)], truth: &[((f32, f32), f32)]) -> Match {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (i, d) in found.iter().enumerate() {
        for (j, (c, r)) in truth.iter().enumerate() {
            let dist = ((d.0 - c.0).powi(2) + (d.1 - c.1).powi(2)).sqrt();
            if dist <= 0.5 * r {
                pairs.push((dist, i, j));
            }
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut used_d = vec![false; found.len()];
    let mut used_t = vec![false; truth.len()];
    let mut tp = 0;
    for (_, i, j) in pairs {
        if !used_d[i] && !used_t[j] {
            used_d[i] = true;
            used_t[j] = true;
            tp += 1;
        }
    }
    Match {
        true_positives: tp,
        detections: found.len(),
        truths: truth.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reddino_models::synth::{render, FieldSpec, SourcePreset};

    #[test]
    fn finds_cells_on_synthetic_fields_from_every_source() {
        let mut total = Match {
            true_positives: 0,
            detections: 0,
            truths: 0,
        };
        for source in SourcePreset::all() {
            let mut m = Match {
                true_positives: 0,
                detections: 0,
                truths: 0,
            };
            for seed in 0..2 {
                let field = render(&FieldSpec::new(1280, 960, 100 + seed, source.clone())).unwrap();
                let found: Vec<(f32, f32)> = find(&field.image, &CellFinderConfig::default())
                    .iter()
                    .map(|c| c.center)
                    .collect();
                let truth: Vec<((f32, f32), f32)> =
                    field.cells.iter().map(|c| (c.center, c.radius)).collect();
                let r = match_centres(&found, &truth);
                m.true_positives += r.true_positives;
                m.detections += r.detections;
                m.truths += r.truths;
            }
            eprintln!(
                "{}: recall {:.4} precision {:.4} ({} cells)",
                source.name,
                m.recall(),
                m.precision(),
                m.truths
            );
            total.true_positives += m.true_positives;
            total.detections += m.detections;
            total.truths += m.truths;
            assert!(
                m.recall() >= 0.97 && m.precision() >= 0.97,
                "{}: {m:?}",
                source.name
            );
        }
        eprintln!(
            "all: recall {:.4} precision {:.4}",
            total.recall(),
            total.precision()
        );
    }

    #[test]
    fn tiles_cover_the_frame_without_overlap() {
        let t = tiles(500, 300, 224);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].bbox, [224, 0, 448, 224]);
    }

    #[test]
    fn blank_and_tiny_frames_have_no_cells() {
        let img = RgbImage::from_pixel(200, 100, image::Rgb([230, 230, 230]));
        assert!(find(&img, &CellFinderConfig::default()).is_empty());
        assert!(find(&RgbImage::new(2, 2), &CellFinderConfig::default()).is_empty());
    }
}
