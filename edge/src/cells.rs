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

use image::RgbImage;
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
    /// Side of the blocks used to estimate the background light.
    pub background_block: u32,
    /// Threshold = background mode + this many noise widths (and at least `min_density`).
    pub noise_widths: f32,
    /// A background block darker than most of its neighbours by more than this (summed natural
    /// log over R, G, B) is taken as covered by a cell and takes its brightest neighbour's
    /// light; 0 = every block takes the brightest of its 3x3 neighbourhood.
    pub background_covered: f32,
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
            background_covered: 0.0,
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
            drop_border: true,
            tile: 224,
        }
    }
}

impl CellFinderConfig {
    /// The finder's settings for real smears (pale and strong stains, JPEG noise, overlapping
    /// cells, vignetting): channels weighed by contrast over noise, the density smoothed and
    /// gated by each pixel's own, the noise width from the median deviation, rims' gaps closed,
    /// enclosed background bigger than a pallor left open, clumps split, the typical radius
    /// without specks, blocks of background taken from their neighbours only when covered.
    /// [`CellFinderConfig::default`] keeps the settings the synthetic microscope and its demo
    /// model were built with.
    pub fn real_smear() -> Self {
        CellFinderConfig {
            background_covered: 0.2,
            median_noise: true,
            skip_specks: true,
            weigh_channels: true,
            smooth: true,
            close_gaps: 2,
            max_pallor: 0.8,
            clump_area: 1.3,
            smooth_min_radius: 15.0,
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
    pub fn for_model(m: &reddino_models::bundle::Manifest) -> Result<Self, String> {
        match m.cell_finder.as_str() {
            "" => Ok(CellFinderConfig::default()),
            name => CellFinderConfig::profile(name).map_err(|e| {
                format!(
                    "model {} {} asks for a cell finder this edge lacks: {e}",
                    m.name, m.version
                )
            }),
        }
    }

    /// The settings of a named profile: `default` (the synthetic microscope's) or `real-smear`.
    pub fn profile(name: &str) -> Result<Self, String> {
        match name {
            "default" => Ok(CellFinderConfig::default()),
            "real-smear" => Ok(CellFinderConfig::real_smear()),
            other => Err(format!(
                "unknown finder profile {other:?} (known: default, real-smear)"
            )),
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

/// The background light of a frame: natural log per block and channel.
struct Background {
    /// `[gh][gw]` of RGB.
    grid: Vec<[f32; 3]>,
    gw: usize,
    gh: usize,
    block: u32,
}

impl Background {
    /// The 90th percentile of each block; a block much darker than most of its neighbours takes
    /// the brightest of them (so a large cell covering a block does not pass for background).
    fn of(img: &RgbImage, block: u32, covered: f32) -> Background {
        let block = block.max(8);
        let (grid, gw, gh) = log_background_grid(img, block, covered);
        Background {
            grid,
            gw,
            gh,
            block,
        }
    }

    /// The blocks of the row holding pixel row `y`, left to right.
    fn row(&self, y: usize) -> &[[f32; 3]] {
        let gy = (y / self.block as usize).min(self.gh - 1);
        &self.grid[gy * self.gw..(gy + 1) * self.gw]
    }
}

fn log_background_grid(img: &RgbImage, block: u32, covered: f32) -> (Vec<[f32; 3]>, usize, usize) {
    let (w, h) = img.dimensions();
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
                    hist[0][px[0] as usize] += 1;
                    hist[1][px[1] as usize] += 1;
                    hist[2][px[2] as usize] += 1;
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
    // A block darker than most of its neighbours by more than `covered` (summed over the
    // channels, natural log) is covered by a cell: it takes its neighbours' brightest. Light
    // falling off towards the corners (vignetting) is far gentler from block to block, and a
    // block that keeps its own value follows it. With `covered` 0 every block takes the
    // brightest of its 3x3 neighbourhood.
    let mut dil = pct.clone();
    let mut sums: Vec<f32> = Vec::with_capacity(8);
    for by in 0..gh {
        for bx in 0..gw {
            let own = pct[by * gw + bx];
            let mut m = [f32::MIN; 3];
            sums.clear();
            for ny in by.saturating_sub(1)..(by + 2).min(gh) {
                for nx in bx.saturating_sub(1)..(bx + 2).min(gw) {
                    if (nx, ny) == (bx, by) {
                        continue;
                    }
                    let v = pct[ny * gw + nx];
                    sums.push(v.iter().sum());
                    for c in 0..3 {
                        m[c] = m[c].max(v[c]);
                    }
                }
            }
            if sums.is_empty() {
                continue;
            }
            if covered <= 0.0 {
                for c in 0..3 {
                    m[c] = m[c].max(own[c]);
                }
                dil[by * gw + bx] = m;
                continue;
            }
            sums.sort_unstable_by(f32::total_cmp);
            if own.iter().sum::<f32>() < sums[sums.len() / 2] - covered {
                dil[by * gw + bx] = m;
            }
        }
    }
    (dil, gw, gh)
}

/// Optical density against the background, its channels weighted by `weights`, bilinearly
/// interpolated between block centres (negative where a pixel is brighter than the estimate:
/// background noise stays symmetric around its mode). One pass, row by row.
fn optical_density(
    img: &RgbImage,
    bg: &Background,
    ln: &[f32; 256],
    weights: [f32; 3],
) -> Vec<f32> {
    let block = bg.block;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (grid, gw, gh) = (&bg.grid, bg.gw, bg.gh);
    let coord = |p: usize, n: usize| -> (usize, usize, f32) {
        let f = ((p as f32 + 0.5) / block as f32 - 0.5).clamp(0.0, (n - 1) as f32);
        let i0 = f.floor() as usize;
        (i0, (i0 + 1).min(n - 1), f - i0 as f32)
    };
    let xs: Vec<(usize, usize, f32)> = (0..w).map(|x| coord(x, gw)).collect();
    // One table per channel: ln of each 8-bit value times the channel's weight.
    let tables: [[f32; 256]; 3] = std::array::from_fn(|c| ln.map(|v| v * weights[c]));
    let weighted = |b: &[f32; 3]| b[0] * weights[0] + b[1] * weights[1] + b[2] * weights[2];
    let mut od = vec![0f32; w * h];
    let mut col = vec![0f32; gw];
    for (y, (out, row)) in od
        .chunks_exact_mut(w)
        .zip(img.as_raw().chunks_exact(3 * w))
        .enumerate()
    {
        let (y0, y1, fy) = coord(y, gh);
        // The channels' weighted backgrounds add up: interpolate their sum.
        for (bx, c) in col.iter_mut().enumerate() {
            let a = weighted(&grid[y0 * gw + bx]);
            let b = weighted(&grid[y1 * gw + bx]);
            *c = a * (1.0 - fy) + b * fy;
        }
        for ((o, px), &(x0, x1, fx)) in out.iter_mut().zip(row.chunks_exact(3)).zip(&xs) {
            let bg = col[x0] * (1.0 - fx) + col[x1] * fx;
            *o = bg
                - tables[0][px[0] as usize]
                - tables[1][px[1] as usize]
                - tables[2][px[2] as usize];
        }
    }
    od
}

/// Channel weights that bring the cells out of the noise best (a matched filter): each
/// channel's cell contrast over its noise variance, scaled so that a typical stained pixel
/// keeps the density it has summed over R, G and B. Haemoglobin absorbs green most; on a pale
/// field red carries almost no contrast and only adds noise. Estimated on 2x2 means of the
/// frame (8-bit steps quantise single pixels' densities); (1, 1, 1) when the frame shows no
/// stain.
fn channel_weights(img: &RgbImage, bg: &Background, ln: &[f32; 256]) -> [f32; 3] {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut samples: Vec<[f32; 3]> = Vec::with_capacity((w / 2) * (h / 2));
    for y in (0..h.saturating_sub(1)).step_by(2) {
        let b = bg.row(y);
        for x in (0..w.saturating_sub(1)).step_by(2) {
            let bb = &b[(x / bg.block as usize).min(bg.gw - 1)];
            let mut v = [0f32; 3];
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let i = ((y + dy) * w + x + dx) * 3;
                for c in 0..3 {
                    v[c] += bb[c] - ln[raw[i + c] as usize];
                }
            }
            samples.push(v.map(|s| s * 0.25));
        }
    }
    const PLAIN: [f32; 3] = [1.0, 1.0, 1.0];
    if samples.len() < 64 {
        return PLAIN;
    }
    let sums: Vec<f32> = samples.iter().map(|v| v[0] + v[1] + v[2]).collect();
    let (mode, sigma) = mode_and_noise(&sums);
    let stained = mode + 6.0 * sigma.max(1e-3);
    let mut signal = [0f64; 3];
    let mut n = 0usize;
    for (v, &s) in samples.iter().zip(&sums) {
        if s > stained {
            n += 1;
            for c in 0..3 {
                signal[c] += v[c] as f64;
            }
        }
    }
    if n < 64 {
        return PLAIN;
    }
    let mut weights = [0f32; 3];
    let (mut kept, mut total) = (0f32, 0f32);
    for c in 0..3 {
        let channel: Vec<f32> = samples.iter().map(|v| v[c]).collect();
        let (m, noise) = mode_and_noise(&channel);
        let contrast = (signal[c] / n as f64) as f32 - m;
        total += contrast.max(0.0);
        if noise > 0.0 && contrast > 0.0 {
            weights[c] = contrast / (noise * noise);
            kept += weights[c] * contrast;
        }
    }
    if kept <= 0.0 || total <= 0.0 {
        return PLAIN;
    }
    weights.map(|v| v * total / kept)
}

/// The mode of `values` (the background's density) and the noise around it: the median
/// distance below the mode, as a normal's sigma (the upper side mixes with faint cell edges).
fn mode_and_noise(values: &[f32]) -> (f32, f32) {
    const BINS: usize = 8192;
    const SCALE: f32 = 1024.0;
    let hist = density_histogram(values, BINS, SCALE);
    // The mode of a lightly smoothed histogram (single bins are spiky).
    let smooth: Vec<u32> = (0..BINS)
        .map(|i| hist[i.saturating_sub(4)..(i + 5).min(BINS)].iter().sum())
        .collect();
    let mode = smooth
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| **c)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let below: u32 = hist[..mode].iter().sum();
    let mut acc = 0;
    let mut k = 0;
    while k < mode && acc < below / 2 {
        acc += hist[mode - 1 - k];
        k += 1;
    }
    let m = (mode as f32 + 0.5) / SCALE - HIST_OFFSET;
    (m, k as f32 / SCALE * 1.4826)
}

/// Densities from `-HIST_OFFSET` up, in `bins` bins of `1 / scale` (the ends collect the rest).
const HIST_OFFSET: f32 = 2.0;

fn density_histogram(values: &[f32], bins: usize, scale: f32) -> Vec<u32> {
    let mut hist = vec![0u32; bins];
    for &v in values {
        hist[(((v + HIST_OFFSET) * scale).max(0.0) as usize).min(bins - 1)] += 1;
    }
    hist
}

/// 3x3 mean of a frame-sized map (edges use the pixels inside the frame).
fn box3(v: &[f32], w: usize) -> Vec<f32> {
    let h = v.len() / w;
    let mut rows = vec![0f32; v.len()];
    for (src, dst) in v.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        for (x, d) in dst.iter_mut().enumerate() {
            let (a, b) = (x.saturating_sub(1), (x + 2).min(w));
            *d = src[a..b].iter().sum::<f32>() / (b - a) as f32;
        }
    }
    let mut out = vec![0f32; v.len()];
    for y in 0..h {
        let (a, b) = (y.saturating_sub(1), (y + 2).min(h));
        let k = 1.0 / (b - a) as f32;
        let dst = &mut out[y * w..(y + 1) * w];
        for yy in a..b {
            for (d, s) in dst.iter_mut().zip(&rows[yy * w..(yy + 1) * w]) {
                *d += s;
            }
        }
        dst.iter_mut().for_each(|d| *d *= k);
    }
    out
}

/// `ln(max(v, 1))` for every 8-bit value.
fn ln_table() -> [f32; 256] {
    std::array::from_fn(|v| (v.max(1) as f32).ln())
}

/// Thresholds `widths` noise widths above the background mode of the density (and at least
/// `min_density` above it), one per entry of `widths`.
fn density_thresholds<const N: usize>(
    od: &[f32],
    cfg: &CellFinderConfig,
    widths: [f32; N],
) -> [f32; N] {
    let (m, sigma) = if cfg.median_noise {
        mode_and_noise(od)
    } else {
        mode_and_half_width(od)
    };
    widths.map(|k| (m + k * sigma).max(m + cfg.min_density))
}

/// The background mode of the density histogram and the noise width from its lower half-width
/// at half maximum (bins of 1/128: on a frame of 8-bit pixels, quantised).
fn mode_and_half_width(od: &[f32]) -> (f32, f32) {
    const SCALE: f32 = 128.0;
    let hist = density_histogram(od, 1024, SCALE);
    let mode = hist
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| **c)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let half = hist[mode] / 2;
    let mut hw = 1;
    while hw < mode && hist[mode - hw] > half {
        hw += 1;
    }
    (
        (mode as f32 + 0.5) / SCALE - HIST_OFFSET,
        hw as f32 / 1.1774 / SCALE,
    )
}

/// 3x3 minimum (`erode`) or maximum filter of a 0/1 mask over the pixels inside the frame.
fn filter3(mask: &[u8], w: usize, erode: bool) -> Vec<u8> {
    let pick = if erode { u8::min } else { u8::max };
    // Rows: each pixel with its left and right neighbours (the frame edge counts as neither).
    let mut tmp = mask.to_vec();
    for (src, dst) in mask.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        if w > 1 {
            for (d, (&l, &r)) in dst[1..w - 1]
                .iter_mut()
                .zip(src[..w - 2].iter().zip(&src[2..]))
            {
                *d = pick(*d, pick(l, r));
            }
            dst[0] = pick(src[0], src[1]);
            dst[w - 1] = pick(src[w - 1], src[w - 2]);
        }
    }
    // Columns: each row with the rows above and below.
    let mut out = tmp.clone();
    let h = mask.len() / w;
    for y in 0..h {
        let dst = &mut out[y * w..(y + 1) * w];
        if y > 0 {
            for (d, &s) in dst.iter_mut().zip(&tmp[(y - 1) * w..y * w]) {
                *d = pick(*d, s);
            }
        }
        if y + 1 < h {
            for (d, &s) in dst.iter_mut().zip(&tmp[(y + 1) * w..(y + 2) * w]) {
                *d = pick(*d, s);
            }
        }
    }
    out
}

/// Fills the pallor of a cell whose stained rim is broken by gaps up to `2 x radius` pixels
/// wide: the background that a closing of the object's mask (dilation then erosion, `radius`
/// times 3x3) encloses becomes part of it. The closing's bridges themselves are not added, so
/// the outline stays as it is. `mask` holds one object, with at least `radius` pixels of
/// background around it.
fn close_rings(mask: &mut [u8], w: usize, radius: u32) {
    let mut closed = mask.to_vec();
    for _ in 0..radius {
        closed = filter3(&closed, w, false);
    }
    for _ in 0..radius {
        closed = filter3(&closed, w, true);
    }
    let mut filled = closed.clone();
    fill_holes(&mut filled, w);
    for ((m, &c), &f) in mask.iter_mut().zip(&closed).zip(&filled) {
        if c == 0 && f != 0 {
            *m = 1;
        }
    }
}

/// Fills background regions that do not reach the border of `mask` (pallor, pale rings):
/// floods the 4-connected background from the border; what it does not reach becomes
/// foreground. A window of the frame around one object gives that object's holes: an
/// 8-connected object encloses a 4-connected region in the window exactly when it does in
/// the frame (the window's edges are background or the frame's).
fn fill_holes(mask: &mut [u8], w: usize) {
    fill_holes_upto(mask, w, usize::MAX);
}

/// [`fill_holes`] for the holes of at most `max_area` pixels (larger enclosed regions stay
/// background: the space a ring of touching cells closes in). Returns the largest hole's area.
fn fill_holes_upto(mask: &mut [u8], w: usize, max_area: usize) -> usize {
    let h = mask.len() / w;
    const OUTSIDE: u8 = 2;
    let mut stack: Vec<u32> = Vec::new();
    let seed = |mask: &mut [u8], i: usize, stack: &mut Vec<u32>| {
        if mask[i] == 0 {
            mask[i] = OUTSIDE;
            stack.push(i as u32);
        }
    };
    for x in 0..w {
        seed(mask, x, &mut stack);
        seed(mask, (h - 1) * w + x, &mut stack);
    }
    for y in 0..h {
        seed(mask, y * w, &mut stack);
        seed(mask, y * w + w - 1, &mut stack);
    }
    while let Some(i) = stack.pop() {
        let i = i as usize;
        let (x, y) = (i % w, i / w);
        if x > 0 {
            seed(mask, i - 1, &mut stack);
        }
        if x + 1 < w {
            seed(mask, i + 1, &mut stack);
        }
        if y > 0 {
            seed(mask, i - w, &mut stack);
        }
        if y + 1 < h {
            seed(mask, i + w, &mut stack);
        }
    }
    // The holes: 4-connected regions of background the flood did not reach.
    let mut largest = 0;
    let mut region: Vec<u32> = Vec::new();
    for start in 0..mask.len() {
        if mask[start] != 0 {
            continue;
        }
        const HOLE: u8 = 3;
        mask[start] = HOLE;
        region.clear();
        region.push(start as u32);
        let mut next = 0;
        while next < region.len() {
            let i = region[next] as usize;
            next += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if mask[j] == 0 {
                    mask[j] = HOLE;
                    region.push(j as u32);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        largest = largest.max(region.len());
        if region.len() > max_area {
            for &i in &region {
                mask[i as usize] = OUTSIDE;
            }
        }
    }
    for v in mask.iter_mut() {
        *v = (*v != OUTSIDE) as u8;
    }
    largest
}

/// Exact squared Euclidean distance of each foreground pixel to the nearest background pixel
/// inside the frame (0 on background; `u32::MAX` where the frame has no background).
/// Felzenszwalb & Huttenlocher's separable transform: per column, then lower envelopes of
/// parabolas per row.
fn squared_distance(mask: &[u8], w: usize) -> Vec<u32> {
    let h = mask.len() / w;
    const INF: u32 = u32::MAX / 4;
    // Column pass: vertical distance to the nearest background pixel, squared.
    let mut col = vec![INF; mask.len()];
    let mut last = vec![None::<usize>; w];
    for y in 0..h {
        for x in 0..w {
            if mask[y * w + x] == 0 {
                last[x] = Some(y);
                col[y * w + x] = 0;
            } else if let Some(ly) = last[x] {
                col[y * w + x] = (y - ly) as u32;
            }
        }
    }
    last.iter_mut().for_each(|l| *l = None);
    for y in (0..h).rev() {
        for x in 0..w {
            if mask[y * w + x] == 0 {
                last[x] = Some(y);
            } else if let Some(ly) = last[x] {
                let d = (ly - y) as u32;
                let c = &mut col[y * w + x];
                if d < *c {
                    *c = d;
                }
            }
        }
    }
    for c in col.iter_mut() {
        if *c != INF {
            *c *= *c;
        }
    }
    // Row pass: lower envelope of the parabolas (x - q)^2 + col[q], per run of foreground.
    // The nearest background in the row bounds each run pixel's distance, so only the columns
    // from the background pixel before the run to the one after it can hold its minimum.
    let mut out = vec![0u32; mask.len()];
    let mut v = vec![0usize; w + 1];
    let mut z = vec![0f64; w + 2];
    for y in 0..h {
        let f = &col[y * w..(y + 1) * w];
        let m = &mask[y * w..(y + 1) * w];
        let row = &mut out[y * w..(y + 1) * w];
        let mut a = 0;
        while a < w {
            if m[a] == 0 {
                a += 1;
                continue;
            }
            let mut b = a;
            while b < w && m[b] != 0 {
                b += 1;
            }
            let (lo, hi) = (a.saturating_sub(1), b.min(w - 1));
            envelope(&f[lo..=hi], &mut v, &mut z, &mut row[lo..=hi]);
            a = b;
        }
    }
    out
}

/// 1-D squared distance transform of `f` (`u32::MAX / 4` = no background in that column) into
/// `out`, by the lower envelope of parabolas.
fn envelope(f: &[u32], v: &mut [usize], z: &mut [f64], out: &mut [u32]) {
    const INF: u32 = u32::MAX / 4;
    let mut k = 0usize;
    let mut any = false;
    for (q, &fq) in f.iter().enumerate() {
        if fq == INF {
            continue;
        }
        if !any {
            any = true;
            v[0] = q;
            z[0] = f64::NEG_INFINITY;
            z[1] = f64::INFINITY;
            continue;
        }
        let fqq = fq as f64 + (q * q) as f64;
        let mut s;
        loop {
            let p = v[k];
            s = (fqq - (f[p] as f64 + (p * p) as f64)) / (2.0 * (q - p) as f64);
            if s <= z[k] {
                // z[0] is -inf: k never drops below 0 here.
                k -= 1;
            } else {
                break;
            }
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    if !any {
        out.iter_mut().for_each(|o| *o = u32::MAX);
        return;
    }
    let mut k = 0;
    for (x, o) in out.iter_mut().enumerate() {
        while z[k + 1] < x as f64 {
            k += 1;
        }
        let p = v[k];
        let dx = x.abs_diff(p) as u64;
        *o = (dx * dx + f[p] as u64).min(u32::MAX as u64) as u32;
    }
}

/// One 8-connected object of the foreground mask, in its own window (its box grown by one
/// pixel, clipped to the frame): a 0/1 mask of the object alone and the exact squared
/// distance of each of its pixels to the background. The nearest background pixel of any
/// object pixel touches the object, so it lies inside the window, and other objects never
/// come closer than the background between them: the window's transform is the frame's.
struct Object {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    dt2: Vec<u32>,
    /// Largest distance to the background (the object's radius where it is widest).
    peak: f32,
    /// Area of the largest hole the object encloses (filled or not).
    largest_hole: usize,
    /// Pixels of the object (holes filled).
    area: usize,
}

/// Finds the objects of `mask` (flood fill from each unvisited foreground pixel), fills their
/// holes and computes their distance transforms.
fn objects(mask: &[u8], w: usize, close_gaps: u32, max_hole: usize) -> Vec<Object> {
    let h = mask.len() / w;
    let mut seen = vec![false; mask.len()];
    // (x, y) of the current object's pixels: no divisions in the loops.
    let mut pixels: Vec<(u32, u32)> = Vec::new();
    let mut out = Vec::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        pixels.clear();
        pixels.push(((start % w) as u32, (start / w) as u32));
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        let mut next = 0;
        while next < pixels.len() {
            let (x, y) = (pixels[next].0 as usize, pixels[next].1 as usize);
            next += 1;
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if mask[j] != 0 && !seen[j] {
                        seen[j] = true;
                        pixels.push((nx as u32, ny as u32));
                    }
                }
            }
        }
        // The window: the box grown by one pixel, and by the closing's reach.
        let pad = 1 + close_gaps as usize;
        let (wx0, wy0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
        let (ww, wh) = ((x1 + 1 + pad).min(w) - wx0, (y1 + 1 + pad).min(h) - wy0);
        let mut local = vec![0u8; ww * wh];
        for &(x, y) in &pixels {
            local[(y as usize - wy0) * ww + (x as usize - wx0)] = 1;
        }
        if close_gaps > 0 {
            close_rings(&mut local, ww, close_gaps);
        }
        // Background the object encloses (pallor, pale rings) becomes part of it, with
        // anything inside it (an object enclosed by this one is not counted on its own).
        let largest_hole = fill_holes_upto(&mut local, ww, max_hole);
        for ly in 0..wh {
            for lx in 0..ww {
                if local[ly * ww + lx] != 0 {
                    seen[(wy0 + ly) * w + wx0 + lx] = true;
                }
            }
        }
        let dt2 = squared_distance(&local, ww);
        let peak = dt2
            .iter()
            .map(|&d| {
                if d == u32::MAX {
                    f32::INFINITY
                } else {
                    (d as f32).sqrt()
                }
            })
            .fold(0f32, f32::max);
        out.push(Object {
            x0: wx0,
            y0: wy0,
            w: ww,
            h: wh,
            dt2,
            peak,
            largest_hole,
            area: local.iter().filter(|&&v| v != 0).count(),
        });
    }
    out
}

/// [`flood`], and for a clump (an object of more than `clump_area` typical cells' area `cell`)
/// the split that makes the most of its parts look like one cell: the flood with the dynamics
/// `h_dyn`, halved and quartered and eighthed, each with basins under two fifths of a cell
/// merged into the neighbour they share most outline with, scored by the parts of 0.5 to 1.6
/// cells' area; 0 = off. Overlapping cells leave only a shallow saddle between their distance
/// peaks, and a clump's outline raises spurious ones.
fn flood_clump(obj: &Object, h_dyn: f32, cell: f32, clump_area: f32) -> (Vec<u32>, usize) {
    let first = flood(obj, h_dyn);
    if clump_area <= 0.0 || cell <= 0.0 || (obj.area as f32) < clump_area * cell {
        return first;
    }
    let score = |labels: &[u32], n: usize| {
        let mut size = vec![0usize; n];
        for &l in labels {
            if l != u32::MAX {
                size[l as usize] += 1;
            }
        }
        size.iter()
            .filter(|&&a| (0.5 * cell..=1.6 * cell).contains(&(a as f32)))
            .count()
    };
    let min_px = (0.4 * cell) as usize;
    let mut best: Option<(usize, Vec<u32>, usize)> = None;
    for k in 0..4 {
        let (mut labels, n) = if k == 0 {
            first.clone()
        } else {
            flood(obj, h_dyn / (1u32 << k) as f32)
        };
        let n = merge_small(&mut labels, n, obj.w, min_px);
        let sc = score(&labels, n);
        if best.as_ref().is_none_or(|b| sc > b.0) {
            best = Some((sc, labels, n));
        }
    }
    best.map(|(_, l, n)| (l, n)).unwrap_or(first)
}

/// Merges each basin of fewer than `min_px` pixels into the neighbouring basin it shares the
/// most 4-connected outline with (smallest first), and renumbers the basins `0..n`. Returns
/// the new number of basins.
fn merge_small(labels: &mut [u32], n: usize, w: usize, min_px: usize) -> usize {
    const NONE: u32 = u32::MAX;
    let h = labels.len() / w;
    loop {
        let mut size = vec![0usize; n];
        for &l in labels.iter() {
            if l != NONE {
                size[l as usize] += 1;
            }
        }
        let Some(small) = (0..n)
            .filter(|&l| size[l] > 0 && size[l] < min_px)
            .min_by_key(|&l| size[l])
        else {
            break;
        };
        let mut shared = std::collections::HashMap::<u32, usize>::new();
        for y in 0..h {
            for x in 0..w {
                if labels[y * w + x] as usize != small {
                    continue;
                }
                let mut see = |j: usize| {
                    let l = labels[j];
                    if l != NONE && l as usize != small {
                        *shared.entry(l).or_default() += 1;
                    }
                };
                if x > 0 {
                    see(y * w + x - 1);
                }
                if x + 1 < w {
                    see(y * w + x + 1);
                }
                if y > 0 {
                    see((y - 1) * w + x);
                }
                if y + 1 < h {
                    see((y + 1) * w + x);
                }
            }
        }
        let Some((&into, _)) = shared
            .iter()
            .max_by_key(|(l, c)| (**c, std::cmp::Reverse(**l)))
        else {
            // An isolated small basin: merging stops here (the debris filter judges what is
            // left small).
            break;
        };
        for l in labels.iter_mut() {
            if *l as usize == small {
                *l = into;
            }
        }
    }
    // Renumber the basins left.
    let mut map = vec![NONE; n];
    let mut next = 0u32;
    for l in labels.iter_mut() {
        if *l == NONE {
            continue;
        }
        let m = &mut map[*l as usize];
        if *m == NONE {
            *m = next;
            next += 1;
        }
        *l = *m;
    }
    next as usize
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
    let [t, t_grow] = density_thresholds(od, cfg, [cfg.noise_widths, cfg.grow_widths]);
    let mask: Vec<u8> = match gate {
        Some((raw, tr)) => od
            .iter()
            .zip(raw)
            .map(|(&v, &r)| (v > t && r > tr) as u8)
            .collect(),
        None => od.iter().map(|&v| (v > t) as u8).collect(),
    };
    // Opening with a 3x3 square removes specks and one-pixel bridges.
    let mask = filter3(&filter3(&mask, w, true), w, false);
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

/// The radius of a disc of the median area of the objects at least half as wide as a cell of
/// radius `r`.
fn disc_radius(objs: &[Object], r: f32) -> f32 {
    let mut areas: Vec<usize> = objs
        .iter()
        .filter(|o| o.peak >= 0.5 * r)
        .map(|o| o.area)
        .collect();
    if areas.is_empty() {
        return 0.0;
    }
    let mid = areas.len() / 2;
    let (_, &mut median, _) = areas.select_nth_unstable(mid);
    (median as f32 / std::f32::consts::PI).sqrt()
}

/// The median of the objects' distance peaks, specks and all.
fn plain_median_peak(objs: &[Object]) -> Option<f32> {
    let mut peaks: Vec<f32> = objs.iter().map(|o| o.peak).collect();
    if peaks.is_empty() {
        return None;
    }
    peaks.sort_unstable_by(f32::total_cmp);
    Some(peaks[peaks.len() / 2])
}

/// Typical radius of the frame's cells: the median of the objects' distance peaks, specks left
/// out (objects whose peak is under a third of the area-weighted median peak: however many
/// specks of stain or noise a frame holds, they weigh little by area). Each clump counts once.
fn median_peak(objs: &[Object]) -> Option<f32> {
    let mut peaks: Vec<(f32, u64)> = objs.iter().map(|o| (o.peak, o.area as u64)).collect();
    if peaks.is_empty() {
        return None;
    }
    peaks.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = peaks.iter().map(|p| p.1).sum();
    let mut acc = 0;
    let mut weighted = peaks[peaks.len() - 1].0;
    for &(peak, area) in &peaks {
        acc += area;
        if 2 * acc >= total {
            weighted = peak;
            break;
        }
    }
    let kept: Vec<f32> = peaks
        .iter()
        .map(|p| p.0)
        .filter(|&p| p >= weighted / 3.0)
        .collect();
    Some(kept[kept.len() / 2])
}

fn find_root(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let p = parent[i as usize];
        parent[i as usize] = parent[p as usize];
        i = p;
    }
    i
}

/// Watershed of an object's distance transform by flooding from its peaks; basins whose peak
/// rises less than `h_dyn` above the level where they meet a higher basin are merged into it.
/// Pixels are visited from the highest distance down (a counting sort on the integer squared
/// distances). Returns a basin index per window pixel (`u32::MAX` off the object) and the
/// number of basins.
fn flood(obj: &Object, h_dyn: f32) -> (Vec<u32>, usize) {
    let (w, h) = (obj.w, obj.h);
    let max_key = obj
        .dt2
        .iter()
        .copied()
        .filter(|&d| d != u32::MAX)
        .max()
        .unwrap_or(0) as usize;
    let slot = |d: u32| {
        if d == u32::MAX {
            0
        } else {
            max_key - d as usize
        }
    };
    // Counting sort, highest distance first, ties in raster order.
    let mut start = vec![0u32; max_key + 2];
    for &d in &obj.dt2 {
        if d > 0 {
            start[slot(d) + 1] += 1;
        }
    }
    for k in 1..start.len() {
        start[k] += start[k - 1];
    }
    let mut order = vec![(0u32, 0u32); start[max_key + 1] as usize];
    for (i, &d) in obj.dt2.iter().enumerate() {
        if d > 0 {
            let s = &mut start[slot(d)];
            order[*s as usize] = ((i % w) as u32, (i / w) as u32);
            *s += 1;
        }
    }
    let level_of = |d: u32| {
        if d == u32::MAX {
            f32::INFINITY
        } else {
            (d as f32).sqrt()
        }
    };
    let mut comp = vec![u32::MAX; w * h];
    let mut parent: Vec<u32> = Vec::new();
    let mut peak: Vec<f32> = Vec::new();
    let mut roots: Vec<u32> = Vec::with_capacity(8);
    for &(x, y) in &order {
        let (x, y) = (x as usize, y as usize);
        let p = y * w + x;
        let level = level_of(obj.dt2[p]);
        roots.clear();
        let mut last = u32::MAX;
        // The labelled neighbour highest on the distance map: the pixel drains to its basin.
        // (Taking the basin with the highest peak instead lets a big cell creep along the rim
        // of a smaller touching one, pixel by pixel at the rim's level.)
        let mut uphill = (0u32, u32::MAX);
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                let q = ny * w + nx;
                let c = comp[q];
                // Labelled pixels lie on the object, where the distance is positive.
                if c != u32::MAX && obj.dt2[q] > uphill.0 {
                    uphill = (obj.dt2[q], c);
                }
                // Neighbours mostly share one basin: resolve each once.
                if c != u32::MAX && c != last {
                    last = c;
                    let r = find_root(&mut parent, c);
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
            comp[p] = id;
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
        comp[p] = find_root(&mut parent, uphill.1);
    }
    for c in comp.iter_mut() {
        if *c != u32::MAX {
            *c = find_root(&mut parent, *c);
        }
    }
    (comp, parent.len())
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
    let bg = Background::of(img, cfg.background_block, cfg.background_covered);
    let ln = ln_table();
    let weights = if cfg.weigh_channels {
        channel_weights(img, &bg, &ln)
    } else {
        [1.0; 3]
    };
    let raw = optical_density(img, &bg, &ln, weights);
    let known_r = (cfg.um_per_px > 0.0).then(|| CELL_RADIUS_UM / cfg.um_per_px);
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
            let [t] = density_thresholds(&raw, cfg, [cfg.raw_widths]);
            (raw.as_slice(), t)
        });
        let (t, t_grow, objs, r) = foreground(od, gate, wu, cfg, known_r);
        let Some(r) = r else {
            return vec![];
        };
        if !decided {
            decided = true;
            // A pale cell whose rim is broken is a ring open on one side: its distance peak
            // is half the rim's width, its area still that of a cell.
            if r.max(disc_radius(&objs, r)) >= cfg.smooth_min_radius {
                large = true;
                continue;
            }
        }
        break (smoothed, t, t_grow, objs, r);
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
    // The basin of each pixel over the frame (`NONE` off every basin), for growing.
    let mut basin = if growing {
        vec![NONE; wu * h as usize]
    } else {
        Vec::new()
    };
    // Statistics per basin; basin `l` of an object is `found[base + l]`.
    let mut found: Vec<Acc> = Vec::new();
    for obj in &objs {
        let (labels, n) = flood_clump(obj, h_dyn, typical_area, cfg.clump_area);
        let (labels, n) = split_blue_parts(img, &bg, obj, labels, n, cfg.split_blue, &ln);
        let (labels, n) = split_necks(obj, labels, n, typical_r, cfg.split_necks);
        let base = found.len() as u32;
        let mut acc = vec![Acc::EMPTY; n];
        for (ly, row) in labels.chunks_exact(obj.w).enumerate() {
            let y = obj.y0 + ly;
            for (lx, &l) in row.iter().enumerate() {
                if l == NONE {
                    continue;
                }
                let x = obj.x0 + lx;
                acc[l as usize].add(x as u32, y as u32, w, h);
                if growing {
                    basin[y * wu + x] = base + l;
                }
                if let Some(o) = owners.as_deref_mut() {
                    o.ids[y * wu + x] = base + l;
                }
            }
        }
        // Empty basins stay (their indices are in the owner map); the area filter drops them.
        found.extend(acc);
    }
    // Debris: basins smaller than a fraction of the median basin (before growing, so that
    // growing changes boxes, never which cells are found).
    let mut areas: Vec<u32> = found.iter().map(|a| a.n).filter(|&n| n > 0).collect();
    if areas.is_empty() {
        return vec![];
    }
    areas.sort_unstable();
    let median = areas[areas.len() / 2];
    let min_area = ((median as f32 * cfg.min_area_fraction) as u32).max(6);
    let kept: Vec<bool> = found.iter().map(|a| a.n >= min_area).collect();
    if growing {
        let grow = Grow {
            od,
            threshold: t_grow.min(t),
            w: wu,
            grows: &kept,
        };
        for (i, l) in grow.run(&mut basin, &objs, cfg.grow_steps) {
            let (x, y) = (i % w, i / w);
            found[l as usize].add(x, y, w, h);
            if let Some(o) = owners.as_deref_mut() {
                o.ids[i as usize] = l;
            }
        }
    }
    drop(basin);
    drop(smoothed);
    drop(raw);
    let mut cells: Vec<(usize, Cell)> = found
        .iter()
        .enumerate()
        .filter(|(k, a)| kept[*k] && !(cfg.drop_border && a.border))
        .map(|(k, a)| {
            let cell = Cell {
                bbox: [a.x0, a.y0, a.x1, a.y1],
                center: ((a.sx / a.n as f64) as f32, (a.sy / a.n as f64) as f32),
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
        for id in o.ids.iter_mut().filter(|id| **id != OwnerMap::BACKGROUND) {
            *id = index[*id as usize];
        }
    }
    cells.into_iter().map(|(_, c)| c).collect()
}

/// Where a cell is and how big: a basin's statistics.
#[derive(Clone)]
struct Acc {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
    sx: f64,
    sy: f64,
    n: u32,
    /// A pixel on the frame's border.
    border: bool,
}

impl Acc {
    const EMPTY: Acc = Acc {
        x0: u32::MAX,
        y0: u32::MAX,
        x1: 0,
        y1: 0,
        sx: 0.0,
        sy: 0.0,
        n: 0,
        border: false,
    };

    /// Adds pixel (`x`, `y`) of a `w` x `h` frame.
    fn add(&mut self, x: u32, y: u32, w: u32, h: u32) {
        self.x0 = self.x0.min(x);
        self.y0 = self.y0.min(y);
        self.x1 = self.x1.max(x + 1);
        self.y1 = self.y1.max(y + 1);
        self.sx += x as f64 + 0.5;
        self.sy += y as f64 + 0.5;
        self.n += 1;
        self.border |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
    }
}

/// Growing basins into the stained pixels around them (see `CellFinderConfig::grow_steps`).
struct Grow<'a> {
    /// Optical density of the frame.
    od: &'a [f32],
    /// A pixel can be claimed when its density is above this.
    threshold: f32,
    w: usize,
    /// Which basins grow (the others are debris).
    grows: &'a [bool],
}

impl Grow<'_> {
    const NONE: u32 = u32::MAX;
    /// Marks a pixel claimed in the current step: claimed, but no source for its neighbours
    /// until the next step.
    const FRESH: u32 = 1 << 31;

    /// Grows the basins into the unclaimed pixels above the threshold (8-connected), one ring
    /// per step for `steps` steps; a pixel that two basins reach in the same step joins the
    /// first growing basin among its neighbours (scanned row by row). Scans only the objects'
    /// windows and then the rings, not the frame. Returns the claimed pixels with their basins.
    fn run(&self, basin: &mut [u32], objs: &[Object], steps: u32) -> Vec<(u32, u32)> {
        // First ring: unclaimed pixels next to a growing basin. A basin's pixels lie inside its
        // object's window, and so do their neighbours (the window is the box grown by one).
        let mut ring: Vec<u32> = Vec::new();
        for obj in objs {
            for y in obj.y0..obj.y0 + obj.h {
                for j in y * self.w + obj.x0..y * self.w + obj.x0 + obj.w {
                    if let Some(l) = self.claim(basin, j) {
                        basin[j] = l | Self::FRESH;
                        ring.push(j as u32);
                    }
                }
            }
        }
        let mut all = Vec::new();
        let mut next = Vec::new();
        for step in 0..steps {
            for &j in &ring {
                let b = &mut basin[j as usize];
                *b &= !Self::FRESH;
                all.push((j, *b));
            }
            if step + 1 == steps {
                break;
            }
            next.clear();
            for &j in &ring {
                self.around(j as usize, |k| {
                    if let Some(l) = self.claim(basin, k) {
                        basin[k] = l | Self::FRESH;
                        next.push(k as u32);
                    }
                });
            }
            std::mem::swap(&mut ring, &mut next);
            if ring.is_empty() {
                break;
            }
        }
        all
    }

    /// The basin that unclaimed pixel `j` above the threshold joins: the first growing basin
    /// among its neighbours (claimed before this step); `None` if it is claimed, below the
    /// threshold or next to none.
    fn claim(&self, basin: &[u32], j: usize) -> Option<u32> {
        if basin[j] != Self::NONE || self.od[j] <= self.threshold {
            return None;
        }
        let mut found = None;
        self.around(j, |k| {
            let l = basin[k];
            // `NONE` has the `FRESH` bit too: unclaimed and fresh pixels are no source.
            if found.is_none() && l & Self::FRESH == 0 && self.grows[l as usize] {
                found = Some(l);
            }
        });
        found
    }

    /// Calls `f` on the 3x3 neighbourhood of pixel `j` inside the frame (`j` included).
    fn around(&self, j: usize, mut f: impl FnMut(usize)) {
        let h = self.od.len() / self.w;
        let (x, y) = (j % self.w, j / self.w);
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(self.w) {
                f(ny * self.w + nx);
            }
        }
    }
}

/// Cuts basins at a neck (see `CellFinderConfig::split_necks`). Only basins of at least 0.6 of
/// a typical cell's area are looked at. Their outline's bays are the boundary pixels at least
/// `max(2, 0.2 x typical_r)` inside the convex hull, grouped by adjacency; each bay is
/// represented by its deepest pixel. Of the pairs of bays whose connecting line passes through
/// the basin (its midpoint does) and is shorter than `saliency` x the two depths together, the
/// shortest relative to its depths cuts the basin in two when the smaller side holds at least
/// a fifth of it; the smaller side becomes a basin of its own. A single bay (a sickle's inner edge,
/// a helmet cell's bite) never cuts, nor do the shallow bays between an echinocyte's
/// crenations; the parts cut off between an acanthocyte's spicules are below a fifth.
fn split_necks(
    obj: &Object,
    mut labels: Vec<u32>,
    mut n: usize,
    typical_r: f32,
    saliency: f32,
) -> (Vec<u32>, usize) {
    if saliency <= 0.0 {
        return (labels, n);
    }
    let (w, h) = (obj.w, obj.h);
    let min_area = 0.6 * std::f32::consts::PI * typical_r * typical_r;
    let min_depth = (0.2 * typical_r).max(2.0);
    type P = (f32, f32);
    let cross = |o: P, a: P, b: P| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut pixels: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, &l) in labels.iter().enumerate() {
        if l != u32::MAX {
            pixels[l as usize].push(i);
        }
    }
    for (l, pix) in pixels.iter().enumerate() {
        if (pix.len() as f32) < min_area {
            continue;
        }
        let l = l as u32;
        let inside = |x: i64, y: i64| {
            x >= 0
                && y >= 0
                && (x as usize) < w
                && (y as usize) < h
                && labels[y as usize * w + x as usize] == l
        };
        // Boundary pixels (a 4-neighbour outside the basin), in raster order.
        let boundary: Vec<P> = pix
            .iter()
            .map(|&i| ((i % w) as i64, (i / w) as i64))
            .filter(|&(x, y)| {
                !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1))
            })
            .map(|(x, y)| (x as f32, y as f32))
            .collect();
        // Convex hull (Andrew's monotone chain; raster order sorted by x, then y).
        let mut sorted = boundary.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut hull: Vec<P> = Vec::new();
        for &p in sorted.iter().chain(sorted.iter().rev().skip(1)) {
            while hull.len() >= 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
        if hull.len() < 3 {
            continue;
        }
        // Depth inside the hull: the distance to the nearest hull edge's line.
        let depth = |p: P| {
            (0..hull.len())
                .map(|k| {
                    let (a, b) = (hull[k], hull[(k + 1) % hull.len()]);
                    let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt().max(1e-6);
                    cross(a, b, p).abs() / len
                })
                .fold(f32::INFINITY, f32::min)
        };
        let deep: Vec<(P, f32)> = boundary
            .iter()
            .map(|&p| (p, depth(p)))
            .filter(|&(_, d)| d >= min_depth)
            .collect();
        if deep.len() < 2 {
            continue;
        }
        // Bays: deep pixels joined through 8-neighbours; the deepest pixel of each.
        let mut parent: Vec<u32> = (0..deep.len() as u32).collect();
        for a in 0..deep.len() {
            for b in a + 1..deep.len() {
                let (p, q) = (deep[a].0, deep[b].0);
                if (p.0 - q.0).abs() <= 1.0 && (p.1 - q.1).abs() <= 1.0 {
                    let (ra, rb) = (
                        find_root(&mut parent, a as u32),
                        find_root(&mut parent, b as u32),
                    );
                    parent[ra.max(rb) as usize] = ra.min(rb);
                }
            }
        }
        let mut bays: Vec<(u32, P, f32)> = Vec::new();
        for (a, &(p, d)) in deep.iter().enumerate() {
            let r = find_root(&mut parent, a as u32);
            match bays.iter_mut().find(|(root, _, _)| *root == r) {
                Some(bay) if d > bay.2 => *bay = (r, p, d),
                Some(_) => {}
                None => bays.push((r, p, d)),
            }
        }
        let mut cut: Option<(f32, P, P)> = None;
        for (a, &(_, p, dp)) in bays.iter().enumerate() {
            for &(_, q, dq) in &bays[a + 1..] {
                let ratio = ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt() / (dp + dq);
                let mid = (
                    ((p.0 + q.0) / 2.0).round() as i64,
                    ((p.1 + q.1) / 2.0).round() as i64,
                );
                if ratio <= saliency
                    && inside(mid.0, mid.1)
                    && cut.is_none_or(|(best, _, _)| ratio < best)
                {
                    cut = Some((ratio, p, q));
                }
            }
        }
        let Some((_, p, q)) = cut else {
            continue;
        };
        let left: Vec<bool> = pix
            .iter()
            .map(|&i| cross(p, q, ((i % w) as f32, (i / w) as f32)) > 0.0)
            .collect();
        let on_left = left.iter().filter(|&&s| s).count();
        let smaller = on_left.min(pix.len() - on_left);
        if 5 * smaller < pix.len() {
            continue;
        }
        let minority = 2 * on_left < pix.len();
        let id = n as u32;
        n += 1;
        for (&i, &s) in pix.iter().zip(&left) {
            if s == minority {
                labels[i] = id;
            }
        }
    }
    (labels, n)
}

/// Blue-stained parts at the edge of a cell become basins of their own: a platelet lying
/// against a red cell (or on its rim) is one object with it, and the distance map has no peak
/// for it. Pixels whose red-minus-blue optical density exceeds `threshold` are grouped
/// (8-connected); a group that reaches the object's edge and covers at most a quarter of the
/// basin holding most of it is split off. Blue parts inside a cell (a parasite, a white cell's
/// nucleus) and cells blue all over (platelets and white cells on their own) stay as they are.
fn split_blue_parts(
    img: &RgbImage,
    bg: &Background,
    obj: &Object,
    mut labels: Vec<u32>,
    mut n: usize,
    threshold: f32,
    ln: &[f32; 256],
) -> (Vec<u32>, usize) {
    if threshold <= 0.0 {
        return (labels, n);
    }
    let (w, h) = (obj.w, obj.h);
    let mut blue = vec![false; w * h];
    let mut any = false;
    let raw = img.as_raw();
    let stride = 3 * img.width() as usize;
    for (ly, (row, out)) in labels
        .chunks_exact(w)
        .zip(blue.chunks_exact_mut(w))
        .enumerate()
    {
        let y = obj.y0 + ly;
        let pixels = &raw[y * stride + 3 * obj.x0..y * stride + 3 * (obj.x0 + w)];
        let blocks = bg.row(y);
        let block = bg.block as usize;
        for (lx, ((&l, b), px)) in row.iter().zip(out).zip(pixels.chunks_exact(3)).enumerate() {
            if l == u32::MAX {
                continue;
            }
            let g = blocks[((obj.x0 + lx) / block).min(blocks.len() - 1)];
            // ln(bg_r / r) - ln(bg_b / b)
            let red_minus_blue = (g[0] - ln[px[0] as usize]) - (g[2] - ln[px[2] as usize]);
            if red_minus_blue > threshold {
                *b = true;
                any = true;
            }
        }
    }
    if !any {
        return (labels, n);
    }
    let mut area = vec![0u32; n];
    for &l in &labels {
        if l != u32::MAX {
            area[l as usize] += 1;
        }
    }
    let mut seen = vec![false; w * h];
    let mut stack = Vec::new();
    let mut group = Vec::new();
    let mut hosts: Vec<(u32, u32)> = Vec::new();
    for start in 0..w * h {
        if !blue[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        group.clear();
        let mut at_edge = false;
        while let Some(i) = stack.pop() {
            group.push(i);
            let (x, y) = (i % w, i / w);
            // The window's frame is off the object but for objects at the frame's border.
            at_edge |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    at_edge |= labels[j] == u32::MAX && (nx == x || ny == y);
                    if blue[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if !at_edge || group.len() < 6 {
            continue;
        }
        hosts.clear();
        for &i in &group {
            let l = labels[i];
            match hosts.iter_mut().find(|(h, _)| *h == l) {
                Some((_, c)) => *c += 1,
                None => hosts.push((l, 1)),
            }
        }
        let host = hosts.iter().max_by_key(|(_, c)| *c).map_or(0, |(h, _)| *h);
        // A quarter at most: a blurred platelet's core is about half of it, a white cell's
        // nucleus more.
        if 4 * group.len() <= area[host as usize] as usize {
            let id = n as u32;
            n += 1;
            for &i in &group {
                labels[i] = id;
            }
        }
    }
    (labels, n)
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
    Match {
        true_positives: greedy_pairs(pairs, found.len(), truth.len()).len(),
        detections: found.len(),
        truths: truth.len(),
    }
}

/// One-to-one matching of `found` detections to `truths` true cells from candidate pairs
/// `(distance, detection, truth)`: nearest first, each side used at most once. Returns the
/// matched (detection, truth) pairs.
pub fn greedy_pairs(
    mut pairs: Vec<(f32, usize, usize)>,
    found: usize,
    truths: usize,
) -> Vec<(usize, usize)> {
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut used_d = vec![false; found];
    let mut used_t = vec![false; truths];
    let mut matched = Vec::new();
    for (_, i, j) in pairs {
        if !used_d[i] && !used_t[j] {
            used_d[i] = true;
            used_t[j] = true;
            matched.push((i, j));
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;
    use reddino_models::synth::{
        render, set_touching, ClassMix, FieldSpec, SourcePreset, NUM_CLASSES,
    };
    use reddino_models::taxonomy::DEFAULT_CLASSES;

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
    fn touching_cells_of_different_sizes_keep_their_own_pixels() {
        // A big and a small disc overlapping by 3 px, and lone discs for the typical size.
        let discs = [
            (90.0, 100.0, 22.0),
            (124.0, 100.0, 15.0),
            (240.0, 60.0, 18.0),
            (240.0, 150.0, 18.0),
            (40.0, 160.0, 18.0),
        ];
        let img = RgbImage::from_fn(320, 210, |x, y| {
            let inside = discs.iter().any(|&(cx, cy, r): &(f32, f32, f32)| {
                (x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy) <= r
            });
            image::Rgb(if inside {
                [185, 95, 115]
            } else {
                [235, 228, 232]
            })
        });
        let found = find(&img, &CellFinderConfig::default());
        assert_eq!(found.len(), discs.len(), "{found:?}");
        for &(cx, cy, r) in &discs[..2] {
            let cell = found
                .iter()
                .find(|c| (c.center.0 - cx).hypot(c.center.1 - cy) < 0.3 * r)
                .unwrap_or_else(|| panic!("no cell at ({cx}, {cy}): {found:?}"));
            // The box is the disc's (cut at the contact line on the neighbour's side), never
            // a box reaching around the neighbour.
            let [x0, y0, x1, y1] = cell.bbox;
            assert!(
                (y0 as f32 - (cy - r)).abs() <= 2.0 && (y1 as f32 - (cy + r)).abs() <= 2.0,
                "cell at ({cx}, {cy}) r {r}: box {:?}",
                cell.bbox
            );
            assert!(
                x0 as f32 >= cx - r - 2.0 && x1 as f32 <= cx + r + 2.0,
                "{:?}",
                cell.bbox
            );
        }
    }

    #[test]
    fn the_owner_map_gives_each_cell_its_own_pixels() {
        let field = render(&FieldSpec::new(
            640,
            480,
            21,
            SourcePreset::by_name("field_40x").unwrap(),
        ))
        .unwrap();
        // Cut off the field's margins, so that cells lie across the frame's edge.
        let img = image::imageops::crop_imm(&field.image, 37, 29, 640 - 74, 480 - 58).to_image();
        let cfg = CellFinderConfig::default();
        let (found, owners) = find_with_owners(&img, &cfg);
        assert_eq!(found, find(&img, &cfg));
        let w = img.width() as usize;
        assert_eq!(owners.ids.len(), w * img.height() as usize);
        let mut area = vec![0u32; found.len()];
        let mut other = 0;
        for (p, &id) in owners.ids.iter().enumerate() {
            let (x, y) = ((p % w) as u32, (p / w) as u32);
            match id {
                OwnerMap::BACKGROUND => {}
                OwnerMap::OTHER => other += 1,
                i => {
                    let [x0, y0, x1, y1] = found[i as usize].bbox;
                    assert!((x0..x1).contains(&x) && (y0..y1).contains(&y), "cell {i}");
                    area[i as usize] += 1;
                }
            }
        }
        for (c, a) in found.iter().zip(&area) {
            assert_eq!(c.area, *a, "{c:?}");
        }
        // Cells cut by the frame's edge are left out but still own their pixels.
        assert!(other > 0);
        // Tiles own nothing.
        let tiles = CellFinderConfig {
            mode: Mode::Tiles,
            ..cfg
        };
        let (t, owners) = find_with_owners(&img, &tiles);
        assert!(!t.is_empty());
        assert!(owners.ids.iter().all(|&id| id == OwnerMap::BACKGROUND));
    }

    /// The field's true cells, and the detections and their quality against the truth without
    /// and with the neck split.
    fn with_and_without_necks(spec: &FieldSpec) -> (usize, [(usize, Match); 2]) {
        let field = render(spec).unwrap();
        let truth: Vec<((f32, f32), f32)> =
            field.cells.iter().map(|c| (c.center, c.radius)).collect();
        let runs = [0.0, CellFinderConfig::default().split_necks].map(|split_necks| {
            let cfg = CellFinderConfig {
                split_necks,
                drop_border: false,
                ..CellFinderConfig::default()
            };
            let found: Vec<(f32, f32)> =
                find(&field.image, &cfg).iter().map(|c| c.center).collect();
            (found.len(), match_centres(&found, &truth))
        });
        (truth.len(), runs)
    }

    #[test]
    fn a_sickle_or_a_fragment_against_a_round_cell_is_a_cell_of_its_own() {
        // Crowded fields of discocytes, schistocytes and sickles.
        let mut mix = [0.0; NUM_CLASSES];
        for class in ["discocyte", "schistocyte", "drepanocyte"] {
            mix[DEFAULT_CLASSES.iter().position(|c| *c == class).unwrap()] = 1.0;
        }
        let mut source = SourcePreset::by_name("giemsa_60x").unwrap();
        set_touching(std::slice::from_mut(&mut source), 0.6).unwrap();
        let (mut off, mut on) = ((0, 0), (0, 0));
        for seed in 0..2 {
            let mut spec = FieldSpec::new(1280, 960, 300 + seed, source.clone());
            spec.mix = ClassMix(mix);
            let (_, [(_, a), (_, b)]) = with_and_without_necks(&spec);
            off = (off.0 + a.true_positives, off.1 + a.truths);
            on = (on.0 + b.true_positives, on.1 + b.truths);
        }
        let recall = |(tp, n): (usize, usize)| tp as f64 / n as f64;
        eprintln!(
            "recall without the neck split {:.4}, with {:.4}",
            recall(off),
            recall(on)
        );
        assert!(
            on.0 >= off.0 + 10,
            "cells found: {} without the neck split, {} with it (of {})",
            off.0,
            on.0,
            on.1
        );
    }

    #[test]
    fn fields_of_one_class_are_not_cut_up() {
        // Cells placed apart (sickles and tear drops still reach past their spacing and meet).
        let mut source = SourcePreset::by_name("giemsa_60x").unwrap();
        set_touching(std::slice::from_mut(&mut source), 0.0).unwrap();
        // Not white cells: in a field of nothing else the typical cell is a white cell, and its
        // lobed nucleus is cut up with or without this split; among red cells they are found
        // whole (the count test in tests/demo_model.rs).
        for (class, name) in DEFAULT_CLASSES
            .iter()
            .enumerate()
            .filter(|(_, n)| **n != "wbc")
        {
            let mut mix = [0.0; NUM_CLASSES];
            mix[class] = 1.0;
            let mut spec = FieldSpec::new(1280, 960, 400 + class as u64, source.clone());
            spec.mix = ClassMix(mix);
            let (truth, [(off, _), (on, _)]) = with_and_without_necks(&spec);
            eprintln!(
                "{name}: {truth} cells, {off} detections without the neck split, {on} with it"
            );
            // Never further from the truth than without the split, give or take one cell in a
            // hundred (a tear drop's tail cut off now and then).
            assert!(
                100 * on.abs_diff(truth) <= 100 * off.abs_diff(truth) + truth,
                "{name}: {truth} cells, {off} detections without the neck split, {on} with it"
            );
        }
    }

    #[test]
    fn a_platelet_on_a_red_cells_rim_is_a_cell_of_its_own() {
        // Red discs (one with a platelet on its rim, one with a parasite inside), a lone
        // platelet, and a white cell: pale blue cytoplasm around a dark blue nucleus.
        const RED: [u8; 3] = [185, 95, 115];
        const BLUE: [u8; 3] = [80, 90, 180];
        let red = [
            (60.0, 60.0, 18.0),
            (140.0, 60.0, 18.0),
            (60.0, 150.0, 18.0),
            (140.0, 150.0, 18.0),
        ];
        let platelet_on_rim = (60.0 + 18.0, 60.0, 4.5);
        let parasite = (140.0, 150.0, 4.0);
        let lone_platelet = (220.0, 60.0, 4.5);
        let (wbc, nucleus) = ((240.0, 150.0, 24.0), (240.0, 150.0, 12.0));
        let within = |(cx, cy, r): (f32, f32, f32), x: u32, y: u32| {
            (x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy) <= r
        };
        let img = RgbImage::from_fn(300, 210, |x, y| {
            image::Rgb(
                if [platelet_on_rim, parasite, lone_platelet, nucleus]
                    .iter()
                    .any(|&d| within(d, x, y))
                {
                    BLUE
                } else if within(wbc, x, y) {
                    [190, 200, 228]
                } else if red.iter().any(|&d| within(d, x, y)) {
                    RED
                } else {
                    [235, 228, 232]
                },
            )
        });
        let found = find(&img, &CellFinderConfig::default());
        let at = |(cx, cy, _): (f32, f32, f32)| {
            found
                .iter()
                .filter(|c| (c.center.0 - cx).hypot(c.center.1 - cy) < 3.0)
                .count()
        };
        assert_eq!(found.len(), 7, "{found:?}");
        for d in red
            .iter()
            .copied()
            .chain([platelet_on_rim, lone_platelet, wbc])
        {
            assert_eq!(at(d), 1, "{d:?}: {found:?}");
        }
        // Without the split the platelet stays part of its red cell.
        let off = CellFinderConfig {
            split_blue: 0.0,
            ..CellFinderConfig::default()
        };
        assert_eq!(find(&img, &off).len(), 6);
    }

    #[test]
    fn a_thin_tip_cut_by_the_opening_rejoins_its_cell() {
        // A red disc with a two-pixel-wide spike pointing right, and a lone two-pixel speck.
        const RED: [u8; 3] = [185, 95, 115];
        let img = RgbImage::from_fn(160, 120, |x, y| {
            let disc = (x as f32 + 0.5 - 60.0).hypot(y as f32 + 0.5 - 60.0) <= 18.0;
            let spike = (70..90).contains(&x) && (59..61).contains(&y);
            let speck = (120..122).contains(&x) && (30..32).contains(&y);
            image::Rgb(if disc || spike || speck {
                RED
            } else {
                [235, 228, 232]
            })
        });
        let off = CellFinderConfig {
            grow_steps: 0,
            ..CellFinderConfig::default()
        };
        let (plain, grown) = (find(&img, &off), find(&img, &CellFinderConfig::default()));
        let ([plain], [grown]) = (&plain[..], &grown[..]) else {
            panic!("one cell each: {plain:?} {grown:?}")
        };
        // The opening leaves the disc alone; the spike grows back three pixels.
        assert_eq!(plain.bbox, [42, 42, 78, 78]);
        assert_eq!(grown.bbox, [42, 42, 81, 78]);
        assert_eq!(grown.area, plain.area + 2 * 3);
    }

    #[test]
    fn growing_changes_boxes_not_which_cells_are_found() {
        // Fields with white cells, whose grainy cytoplasm leaves specks around them: a speck
        // too small to count stays out even when it could grow. Cells at the frame's border
        // kept, so that both runs keep the same objects.
        let source = SourcePreset::by_name("giemsa_60x").unwrap();
        let plain_cfg = CellFinderConfig {
            grow_steps: 0,
            drop_border: false,
            ..CellFinderConfig::default()
        };
        let grown_cfg = CellFinderConfig {
            drop_border: false,
            ..CellFinderConfig::default()
        };
        for seed in [1000, 1001, 1003] {
            let field = render(&FieldSpec::new(1280, 960, seed, source.clone())).unwrap();
            let plain = find(&field.image, &plain_cfg);
            let grown = find(&field.image, &grown_cfg);
            assert_eq!(plain.len(), grown.len(), "seed {seed}");
            let inside = |a: [u32; 4], b: [u32; 4]| {
                b[0] <= a[0] && b[1] <= a[1] && a[2] <= b[2] && a[3] <= b[3]
            };
            for p in &plain {
                assert!(
                    grown
                        .iter()
                        .any(|g| inside(p.bbox, g.bbox) && g.area >= p.area),
                    "seed {seed}: no grown cell holds {p:?}"
                );
            }
        }
    }

    #[test]
    fn grown_boxes_of_irregular_cells_come_closer_to_their_true_boxes() {
        // Fragments, crenated cells and tear drops, apart, at the two magnifications where thin
        // parts are a pixel or two wide.
        let ratio = |cfg: &CellFinderConfig, source: &SourcePreset, class: usize| {
            let mut mix = [0.0; NUM_CLASSES];
            mix[class] = 1.0;
            let mut spec = FieldSpec::new(1280, 960, 500 + class as u64, source.clone());
            spec.mix = ClassMix(mix);
            let field = render(&spec).unwrap();
            let found = find(&field.image, cfg);
            let mut pairs = Vec::new();
            for (i, c) in found.iter().enumerate() {
                let [x0, y0, x1, y1] = c.bbox;
                for (j, t) in field.cells.iter().enumerate() {
                    if (x0 as f32..x1 as f32).contains(&t.center.0)
                        && (y0 as f32..y1 as f32).contains(&t.center.1)
                    {
                        let d = (c.center.0 - t.center.0).hypot(c.center.1 - t.center.1);
                        pairs.push((d, i, j));
                    }
                }
            }
            let side = |b: [u32; 4]| (b[2] - b[0]).max(b[3] - b[1]) as f64;
            let matched = greedy_pairs(pairs, found.len(), field.cells.len());
            let sum: f64 = matched
                .iter()
                .map(|&(i, j)| side(found[i].bbox) / side(field.cells[j].bbox))
                .sum();
            sum / matched.len() as f64
        };
        let off = CellFinderConfig {
            grow_steps: 0,
            ..CellFinderConfig::default()
        };
        for name in ["giemsa_60x", "field_40x"] {
            let mut source = SourcePreset::by_name(name).unwrap();
            set_touching(std::slice::from_mut(&mut source), 0.0).unwrap();
            for class in ["schistocyte", "echinocyte", "dacrocyte"] {
                let c = DEFAULT_CLASSES.iter().position(|n| *n == class).unwrap();
                let (plain, grown) = (
                    ratio(&off, &source, c),
                    ratio(&CellFinderConfig::default(), &source, c),
                );
                eprintln!("{name} {class}: box side / true side {plain:.3} -> {grown:.3}");
                assert!(
                    grown > plain + 0.01 && grown < 1.01,
                    "{name} {class}: {plain:.3} -> {grown:.3}"
                );
            }
        }
    }

    const BACKGROUND: [u8; 3] = [235, 228, 232];
    const STAIN: [u8; 3] = [185, 95, 115];

    /// A field of `w` x `h` with the pixels for which `cell` holds stained.
    fn field(w: u32, h: u32, cell: impl Fn(f32, f32) -> bool) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb(if cell(x as f32 + 0.5, y as f32 + 0.5) {
                STAIN
            } else {
                BACKGROUND
            })
        })
    }

    #[test]
    fn a_pallor_behind_a_broken_rim_is_filled() {
        // A ring cell (rim 7 pixels wide, pallor as bright as the background) whose rim is cut
        // by a 4-pixel slit from its pallor to the outside (wider than smoothing shuts).
        let img = field(120, 120, |x, y| {
            let d = (x - 60.0).hypot(y - 60.0);
            let slit = x > 60.0 && (y - 60.0).abs() < 2.0;
            (14.0..=21.0).contains(&d) && !slit
        });
        let disc = std::f32::consts::PI * 21.0 * 21.0;
        // Unsmoothed: on a noiseless field the smoothed density grows every cell by a pixel.
        let real = CellFinderConfig {
            smooth: false,
            ..CellFinderConfig::real_smear()
        };
        let closed = find(&img, &real);
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert!(closed[0].area as f32 > 0.9 * disc, "{closed:?}");
        let open = find(
            &img,
            &CellFinderConfig {
                close_gaps: 0,
                ..real
            },
        );
        let area: u32 = open.iter().map(|c| c.area).sum();
        assert!((area as f32) < 0.75 * disc, "without closing: {open:?}");
    }

    #[test]
    fn a_clump_of_overlapping_cells_is_split_into_its_cells() {
        // Lone cells set the typical size; three cells overlapping in a row leave only shallow
        // saddles between their distance peaks.
        let mut centres = vec![(40.0, 40.0), (120.0, 40.0), (200.0, 40.0), (280.0, 40.0)];
        centres.extend([(100.0, 130.0), (111.0, 130.0), (122.0, 130.0)]);
        let img = field(320, 180, |x, y| {
            centres.iter().any(|c| (x - c.0).hypot(y - c.1) <= 16.0)
        });
        let truth: Vec<((f32, f32), f32)> = centres.iter().map(|&c| (c, 16.0)).collect();
        let score = |cfg: &CellFinderConfig| {
            let found: Vec<(f32, f32)> = find(&img, cfg).iter().map(|c| c.center).collect();
            match_centres(&found, &truth)
        };
        let split = score(&CellFinderConfig::real_smear());
        assert_eq!(split.true_positives, 7, "{split:?}");
        assert_eq!(split.detections, 7, "{split:?}");
        let whole = score(&CellFinderConfig {
            clump_area: 0.0,
            ..CellFinderConfig::real_smear()
        });
        assert!(
            whole.true_positives < 7,
            "without the clump split: {whole:?}"
        );
    }

    #[test]
    fn channels_are_weighed_by_their_contrast_over_noise() {
        // Pale cells that darken green alone, on a sensor whose red and blue are noisy.
        let noise = |x: u32, y: u32, c: u32| {
            let mut v =
                (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ (c * 83_492_791))
                    .wrapping_mul(2_654_435_761);
            v ^= v >> 15;
            (v % 31) as i32 - 15
        };
        let centres = [(50.0, 50.0), (130.0, 50.0), (50.0, 130.0), (130.0, 130.0)];
        let img = RgbImage::from_fn(180, 180, |x, y| {
            let inside = centres
                .iter()
                .any(|c: &(f32, f32)| (x as f32 + 0.5 - c.0).hypot(y as f32 + 0.5 - c.1) <= 18.0);
            let g = if inside { 200 } else { 228 } + noise(x, y, 1) / 5;
            image::Rgb([
                (220 + noise(x, y, 0)) as u8,
                g as u8,
                (220 + noise(x, y, 2)) as u8,
            ])
        });
        let truth: Vec<((f32, f32), f32)> = centres.iter().map(|&c| (c, 18.0)).collect();
        let score = |weigh: bool| {
            let cfg = CellFinderConfig {
                weigh_channels: weigh,
                smooth: false,
                ..CellFinderConfig::real_smear()
            };
            let found: Vec<(f32, f32)> = find(&img, &cfg).iter().map(|c| c.center).collect();
            match_centres(&found, &truth)
        };
        let weighed = score(true);
        assert_eq!(
            (weighed.true_positives, weighed.detections),
            (4, 4),
            "{weighed:?}"
        );
        let summed = score(false);
        assert!(summed.true_positives < 4, "summed channels: {summed:?}");
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
