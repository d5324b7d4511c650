//! The foreground: background light per block, optical density against it, the threshold a
//! few noise widths above the background mode, and the mask's clean-up (opening, rim-gap
//! closing, hole filling).

use image::RgbImage;
use rayon::prelude::*;

use super::watershed::{find_root, join_runs, push_runs, Run};
use super::CellFinderConfig;

/// The background light of a frame: natural log per block and channel.
pub(super) struct Background {
    /// `[gh][gw]` of RGB.
    pub(super) grid: Vec<[f32; 3]>,
    pub(super) gw: usize,
    pub(super) gh: usize,
    pub(super) block: u32,
    /// Beyond the outer blocks' centres the light goes on changing as it does between the two
    /// outermost blocks (else it stays the outermost block's).
    pub(super) extrapolate: bool,
}

impl Background {
    /// The 90th percentile of each block; a block much darker than most of its neighbours takes
    /// the brightest of them (so a large cell covering a block does not pass for background).
    pub(super) fn of(img: &RgbImage, block: u32, covered: f32, extrapolate: bool) -> Background {
        let block = block.max(8);
        let (grid, gw, gh) = log_background_grid(img, block, covered);
        Background {
            grid,
            gw,
            gh,
            block,
            extrapolate,
        }
    }

    /// The blocks of the row holding pixel row `y`, left to right.
    pub(super) fn row(&self, y: usize) -> &[[f32; 3]] {
        let gy = (y / self.block as usize).min(self.gh - 1);
        &self.grid[gy * self.gw..(gy + 1) * self.gw]
    }
}

pub(super) fn log_background_grid(
    img: &RgbImage,
    block: u32,
    covered: f32,
) -> (Vec<[f32; 3]>, usize, usize) {
    let (w, h) = img.dimensions();
    let gw = w.div_ceil(block) as usize;
    let gh = h.div_ceil(block) as usize;
    let mut pct = vec![[0f32; 3]; gw * gh];
    let raw = img.as_raw();
    // Block by block on the pool (a frame's rows of blocks are too few to share out).
    pct.par_iter_mut().enumerate().for_each(|(i, out)| {
        let (bx, by) = (i % gw, i / gw);
        // Each value's counters side by side (one cache line): the three channels' of even
        // pixels, then of odd ones. Neighbouring pixels mostly hold the same value; two sets of
        // counters halve the increments that wait on the one before.
        let mut hist = [[0u32; 8]; 256];
        let (x0, y0) = (bx as u32 * block, by as u32 * block);
        let (x1, y1) = ((x0 + block).min(w), (y0 + block).min(h));
        for y in y0..y1 {
            let row = &raw[((y * w + x0) * 3) as usize..((y * w + x1) * 3) as usize];
            let pairs = row.chunks_exact(6);
            if let [r, g, b] = *pairs.remainder() {
                hist[r as usize][0] += 1;
                hist[g as usize][1] += 1;
                hist[b as usize][2] += 1;
            }
            for px in pairs {
                hist[px[0] as usize][0] += 1;
                hist[px[1] as usize][1] += 1;
                hist[px[2] as usize][2] += 1;
                hist[px[3] as usize][4] += 1;
                hist[px[4] as usize][5] += 1;
                hist[px[5] as usize][6] += 1;
            }
        }
        let n = (x1 - x0) * (y1 - y0);
        let target = (n as f32 * 0.9) as u32;
        for c in 0..3 {
            let mut acc = 0;
            let mut v = 255;
            for (i, cnt) in hist.iter().enumerate() {
                acc += cnt[c] + cnt[c + 4];
                if acc >= target {
                    v = i;
                    break;
                }
            }
            out[c] = (v.max(1) as f32).ln();
        }
    });
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
/// background noise stays symmetric around its mode), and beyond the outer centres held at the
/// outer blocks' light or, with `bg.extrapolate`, extrapolated from the two outermost blocks.
/// One pass, row by row.
pub(super) fn optical_density(
    img: &RgbImage,
    bg: &Background,
    ln: &[f32; 256],
    weights: [f32; 3],
) -> Vec<f32> {
    let block = bg.block;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (grid, gw, gh) = (&bg.grid, bg.gw, bg.gh);
    // Pixel `p`'s two blocks along an axis of `n` blocks and its weight on the second.
    let coord = |p: usize, n: usize| -> (usize, usize, f32) {
        let f = (p as f32 + 0.5) / block as f32 - 0.5;
        if bg.extrapolate && n > 1 {
            // Outside [0, n - 1] the weight leaves [0, 1]: the line through the outer two.
            let i0 = (f.max(0.0) as usize).min(n - 2);
            return (i0, i0 + 1, f - i0 as f32);
        }
        let f = f.clamp(0.0, (n - 1) as f32);
        let i0 = f.floor() as usize;
        (i0, (i0 + 1).min(n - 1), f - i0 as f32)
    };
    let xs: Vec<(usize, usize, f32)> = (0..w).map(|x| coord(x, gw)).collect();
    // One table per channel: ln of each 8-bit value times the channel's weight.
    let tables: [[f32; 256]; 3] = std::array::from_fn(|c| ln.map(|v| v * weights[c]));
    let weighted = |b: &[f32; 3]| b[0] * weights[0] + b[1] * weights[1] + b[2] * weights[2];
    let mut od = vec![0f32; w * h];
    let rows = od
        .par_chunks_exact_mut(w)
        .zip(img.as_raw().par_chunks_exact(3 * w));
    rows.enumerate().for_each_init(
        || vec![0f32; gw],
        |col, (y, (out, row))| {
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
        },
    );
    od
}

/// The least optical density (natural log of the background's light over the pixel's) an
/// opaque pixel has in every channel ([`clear_opaque`]): under 61% of the background's light.
/// On the Chula fields the microscope's grey, half-transparent pointer reads 0.6-0.8 in each
/// channel; 99% of the stained pixels read under 0.46 in their least channel, and their least
/// channel under 0.76 of their greatest.
pub(super) const OPAQUE_DENSITY: f32 = 0.5;

/// The density [`clear_opaque`] gives opaque pixels: below any cell's and any background's,
/// in the bottom bin of [`density_histogram`], which [`density_thresholds`] then leaves out.
pub(super) const OPAQUE: f32 = -2.0 * HIST_OFFSET;

/// Sets the density `od` (from [`optical_density`] with `weights`) of opaque grey pixels, and
/// of the grey pixels joined to them, to [`OPAQUE`]. Opaque grey: at least [`OPAQUE_DENSITY`]
/// in every channel against their block's background, the least channel's density at least
/// `ratio` of the greatest's. A stained cell absorbs green far more than red (eosin,
/// haemoglobin), a white cell's nucleus red far more than blue; what is as dark in every
/// channel is opaque: an eyepiece pointer, a scale bar and its legend, dirt. Only pixels whose
/// weighted density could be that high are looked at (few, on a smear).
pub(super) fn clear_opaque(
    od: &mut [f32],
    img: &RgbImage,
    bg: &Background,
    ln: &[f32; 256],
    weights: [f32; 3],
    ratio: f32,
) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // An opaque pixel's weighted density against the interpolated background, with a fifth
    // of slack for the blocks' differences from it.
    let least = 0.8 * OPAQUE_DENSITY * (weights[0] + weights[1] + weights[2]);
    let block = bg.block as usize;
    let shared: &[f32] = od;
    // Eight pixels at a time are checked for one that could be opaque (no branch) before any
    // is looked at.
    const CHUNK: usize = 8;
    let opaque: Vec<(usize, usize)> = shared
        .par_chunks_exact(w)
        .zip(img.as_raw().par_chunks_exact(3 * w))
        .enumerate()
        .fold(Vec::new, |mut out, (y, (row_od, row))| {
            let blocks = bg.row(y);
            for (k, chunk) in row_od.chunks(CHUNK).enumerate() {
                if chunk.iter().fold(f32::MIN, |a, &o| a.max(o)) < least {
                    continue;
                }
                for (i, &o) in chunk.iter().enumerate() {
                    let x = k * CHUNK + i;
                    if o < least {
                        continue;
                    }
                    let (g, px) = (blocks[(x / block).min(bg.gw - 1)], &row[3 * x..3 * x + 3]);
                    let d = std::array::from_fn(|c| g[c] - ln[px[c] as usize]);
                    if grey_at(&d, OPAQUE_DENSITY, ratio) {
                        out.push((x, y));
                    }
                }
            }
            out
        })
        .reduce(Vec::new, |mut a, b| {
            a.extend(b);
            a
        });
    if opaque.is_empty() {
        return;
    }
    // The mark's blurred edge goes with it: the grey pixels (as dense in every channel, over
    // [`GREY_DENSITY`]) joined to it.
    let grey = |x: usize, y: usize| {
        let g = bg.row(y)[(x / block).min(bg.gw - 1)];
        let px = &img.as_raw()[3 * (y * w + x)..3 * (y * w + x) + 3];
        grey_at(
            &std::array::from_fn(|c| g[c] - ln[px[c] as usize]),
            GREY_DENSITY,
            ratio,
        )
    };
    let mut seen = vec![false; w * h];
    for &(x, y) in &opaque {
        seen[y * w + x] = true;
    }
    let mut stack = opaque;
    while let Some((x, y)) = stack.pop() {
        od[y * w + x] = OPAQUE;
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                if !seen[ny * w + nx] && grey(nx, ny) {
                    seen[ny * w + nx] = true;
                    stack.push((nx, ny));
                }
            }
        }
    }
}

/// The least density in every channel of the grey edge [`clear_opaque`] takes with an opaque
/// mark (a blurred pointer's shadow is a few pixels wide).
const GREY_DENSITY: f32 = 0.1;

/// Whether densities `d` (R, G, B) are grey and dense: at least `least` in every channel, the
/// least at least `ratio` of the greatest (see [`clear_opaque`]).
fn grey_at(d: &[f32; 3], least: f32, ratio: f32) -> bool {
    let (lo, hi) = (d[0].min(d[1]).min(d[2]), d[0].max(d[1]).max(d[2]));
    lo >= least && lo >= ratio * hi
}

/// Channel weights that bring the cells out of the noise best (a matched filter): each
/// channel's cell contrast over its noise variance, scaled so that a typical stained pixel
/// keeps the density it has summed over R, G and B. Haemoglobin absorbs green most; on a pale
/// field red carries almost no contrast and only adds noise. Estimated on 2x2 means of the
/// frame (8-bit steps quantise single pixels' densities); (1, 1, 1) when the frame shows no
/// stain.
pub(super) fn channel_weights(img: &RgbImage, bg: &Background, ln: &[f32; 256]) -> [f32; 3] {
    const PLAIN: [f32; 3] = [1.0, 1.0, 1.0];
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let (sw, sh) = (w / 2, h / 2);
    if sw * sh < 64 {
        return PLAIN;
    }
    // Rows of 2x2 means side by side, each part of the rows counting its samples' bins: of
    // the sum over the channels (histogram 0) and of each channel (1 to 3). Counts add up to
    // the same histograms however the rows are shared out.
    let mut samples: Vec<[f32; 3]> = vec![[0f32; 3]; sw * sh];
    let rows_per_part = sh.div_ceil(4 * rayon::current_num_threads()).max(8);
    let bin = |v: f32| density_bin(v, NOISE_BINS, NOISE_SCALE);
    let hist = samples
        .par_chunks_mut(sw * rows_per_part)
        .enumerate()
        .fold(
            || (vec![[0u32; 4]; NOISE_BINS], Vec::new()),
            |(mut hist, mut bins), (part, out)| {
                for (r, out) in out.chunks_exact_mut(sw).enumerate() {
                    let y = 2 * (part * rows_per_part + r);
                    let b = bg.row(y);
                    let (top, below) = (&raw[y * w * 3..], &raw[(y + 1) * w * 3..]);
                    for (sx, o) in out.iter_mut().enumerate() {
                        let x = 2 * sx;
                        let bb = &b[(x / bg.block as usize).min(bg.gw - 1)];
                        let mut v = [0f32; 3];
                        for row in [top, below] {
                            for dx in 0..2 {
                                let px = &row[(x + dx) * 3..(x + dx) * 3 + 3];
                                for c in 0..3 {
                                    v[c] += bb[c] - ln[px[c] as usize];
                                }
                            }
                        }
                        *o = v.map(|s| s * 0.25);
                    }
                    // The row's bins (converted a row at a time, in vector registers), then
                    // counted sample by sample: four counters apart, four increments that do
                    // not wait on each other.
                    bins.clear();
                    bins.extend(out.iter().map(|o| bin(o[0] + o[1] + o[2])));
                    bins.extend(out.as_flattened().iter().map(|&v| bin(v)));
                    let (sums, channels) = bins.split_at(out.len());
                    for (&s, c) in sums.iter().zip(channels.chunks_exact(3)) {
                        hist[s][0] += 1;
                        hist[c[0]][1] += 1;
                        hist[c[1]][2] += 1;
                        hist[c[2]][3] += 1;
                    }
                }
                (hist, bins)
            },
        )
        .map(|(hist, _)| hist)
        .reduce(|| vec![[0u32; 4]; NOISE_BINS], add_counts);
    let of = |k: usize| -> Vec<u32> { hist.iter().map(|c| c[k]).collect() };
    let (mode, sigma) = mode_and_noise_of(&of(0));
    let stained = mode + 6.0 * sigma.max(1e-3);
    let mut signal = [0f64; 3];
    let mut n = 0usize;
    for v in &samples {
        if v[0] + v[1] + v[2] > stained {
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
        let (m, noise) = mode_and_noise_of(&of(c + 1));
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

/// Two parts' counters (four per bin) added up.
fn add_counts(mut a: Vec<[u32; 4]>, b: Vec<[u32; 4]>) -> Vec<[u32; 4]> {
    for (x, y) in a.iter_mut().zip(&b) {
        for k in 0..4 {
            x[k] += y[k];
        }
    }
    a
}

/// The bins of [`mode_and_noise`]: 1/1024 wide.
const NOISE_BINS: usize = 8192;
const NOISE_SCALE: f32 = 1024.0;

/// The mode of `values` (the background's density) and the noise around it: the median
/// distance below the mode, as a normal's sigma (the upper side mixes with faint cell edges).
#[cfg(test)]
pub(super) fn mode_and_noise(values: &[f32]) -> (f32, f32) {
    mode_and_noise_of(&density_histogram(values, NOISE_BINS, NOISE_SCALE))
}

/// [`mode_and_noise`] of the values counted in `hist` (`NOISE_BINS` bins of `1 / NOISE_SCALE`).
fn mode_and_noise_of(hist: &[u32]) -> (f32, f32) {
    const BINS: usize = NOISE_BINS;
    const SCALE: f32 = NOISE_SCALE;
    // The mode of a lightly smoothed histogram (single bins are spiky).
    // Sums over bins i-4..=i+4 (clipped at the ends), from running totals.
    let mut total = vec![0u32; BINS + 1];
    for (i, &c) in hist.iter().enumerate() {
        total[i + 1] = total[i] + c;
    }
    let smooth: Vec<u32> = (0..BINS)
        .map(|i| total[(i + 5).min(BINS)] - total[i.saturating_sub(4)])
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
pub(super) const HIST_OFFSET: f32 = 2.0;

/// The bin of `v` in [`density_histogram`]'s `bins` bins of `1 / scale`.
#[inline(always)]
fn density_bin(v: f32, bins: usize, scale: f32) -> usize {
    // Clamped as floats, then truncated: the same bins as clamping after the conversion (NaN:
    // bin 0, `max` returns the number). The clamped value needs no saturating conversion,
    // whose checks keep the conversion out of vector registers.
    let clamped = ((v + HIST_OFFSET) * scale).max(0.0).min((bins - 1) as f32);
    // SAFETY: `clamped` is a number in 0..=bins - 1, and `bins` is a histogram's length: it
    // truncates to an i32.
    unsafe { clamped.to_int_unchecked::<i32>() as usize }
}

pub(super) fn density_histogram(values: &[f32], bins: usize, scale: f32) -> Vec<u32> {
    let bin = |v: f32| density_bin(v, bins, scale);
    // Parts of the frame side by side, each into four interleaved counters per bin
    // (neighbouring pixels mostly fall in one bin: four counters keep the increments
    // independent). The four of a bin share a cache line: four histograms a power of two
    // apart took half as long again (docs/benchmarks.md, the finder's fifth round).
    let part = |mut h: Vec<[u32; 4]>, chunk: &[f32]| {
        const BLOCK: usize = 64;
        let blocks = chunk.chunks_exact(BLOCK);
        for &v in blocks.remainder() {
            h[bin(v)][0] += 1;
        }
        let mut idx = [0usize; BLOCK];
        for block in blocks {
            for (i, &v) in idx.iter_mut().zip(block) {
                *i = bin(v);
            }
            for q in idx.chunks_exact(4) {
                h[q[0]][0] += 1;
                h[q[1]][1] += 1;
                h[q[2]][2] += 1;
                h[q[3]][3] += 1;
            }
        }
        h
    };
    // One part per thread: each part's counters are zeroed and added up once.
    let part_len = values
        .len()
        .div_ceil(rayon::current_num_threads())
        .max(1 << 14);
    let four = values
        .par_chunks(part_len)
        .fold(|| vec![[0u32; 4]; bins], part)
        .reduce(|| vec![[0u32; 4]; bins], add_counts);
    four.iter().map(|c| c.iter().sum()).collect()
}

/// 3x3 mean of a frame-sized map (edges use the pixels inside the frame).
pub(super) fn box3(v: &[f32], w: usize) -> Vec<f32> {
    let h = v.len() / w;
    // Rows: each value with its neighbours, summed left to right, over their number. The
    // ends have one neighbour; inside, three slices side by side (the loop vectorises).
    let mut rows = vec![0f32; v.len()];
    let pairs = v.par_chunks_exact(w).zip(rows.par_chunks_exact_mut(w));
    pairs.for_each(|(src, dst)| match w {
        1 => dst[0] = src[0],
        _ => {
            dst[0] = (src[0] + src[1]) / 2.0;
            let (l, m, r) = (&src[..w - 2], &src[1..w - 1], &src[2..]);
            for (((d, &l), &m), &r) in dst[1..w - 1].iter_mut().zip(l).zip(m).zip(r) {
                *d = (l + m + r) / 3.0;
            }
            dst[w - 1] = (src[w - 2] + src[w - 1]) / 2.0;
        }
    });
    // Columns: the rows above and below (those inside the frame) added to 0 top to bottom,
    // times one over their number.
    let mut out = vec![0f32; v.len()];
    let row = |y: usize| &rows[y * w..(y + 1) * w];
    out.par_chunks_exact_mut(w)
        .enumerate()
        .for_each(|(y, dst)| {
            let (a, b) = (y.saturating_sub(1), (y + 2).min(h));
            let k = 1.0 / (b - a) as f32;
            match b - a {
                3 => {
                    let (r0, r1, r2) = (row(a), row(a + 1), row(a + 2));
                    for (((d, &p), &q), &s) in dst.iter_mut().zip(r0).zip(r1).zip(r2) {
                        *d = (0.0 + p + q + s) * k;
                    }
                }
                2 => {
                    for ((d, &p), &q) in dst.iter_mut().zip(row(a)).zip(row(a + 1)) {
                        *d = (0.0 + p + q) * k;
                    }
                }
                _ => {
                    for (d, &p) in dst.iter_mut().zip(row(a)) {
                        *d = (0.0 + p) * k;
                    }
                }
            }
        });
    out
}

/// `ln(max(v, 1))` for every 8-bit value.
pub(super) fn ln_table() -> [f32; 256] {
    std::array::from_fn(|v| (v.max(1) as f32).ln())
}

/// Thresholds `widths` noise widths above the background mode of the density (and at least
/// `min_density` above it), one per entry of `widths`. In a pale field (with
/// `contrast_fraction`) the least density above the mode is [`cell_floor`], and with
/// `lower_first` the first width is [`cell_widths`].
pub(super) fn density_thresholds<const N: usize>(
    od: &[f32],
    cfg: &CellFinderConfig,
    mut widths: [f32; N],
    lower_first: bool,
) -> [f32; N] {
    let (bins, scale) = if cfg.median_noise {
        (NOISE_BINS, NOISE_SCALE)
    } else {
        (HALF_WIDTH_BINS, HALF_WIDTH_SCALE)
    };
    let mut hist = density_histogram(od, bins, scale);
    if cfg.drop_neutral > 0.0 {
        // Opaque pixels ([`clear_opaque`]) are neither background nor cells.
        hist[0] = 0;
    }
    let (m, sigma) = if cfg.median_noise {
        mode_and_noise_of(&hist)
    } else {
        mode_and_half_width_of(&hist)
    };
    let mut floor = cfg.min_density;
    if cfg.contrast_fraction > 0.0 {
        let stained = quantile_of(&hist, scale, STAINED_QUANTILE);
        floor = cell_floor(m, stained, cfg);
        if let Some(first) = widths.first_mut().filter(|_| lower_first) {
            *first = cell_widths(m, sigma, stained, cfg);
        }
    }
    widths.map(|k| (m + k * sigma).max(m + floor))
}

/// The least density above the background mode `m` counted as stained, for a stained level
/// `stained`: `min_density`, or in a pale field `contrast_fraction` of the cells' contrast
/// (a floor of 0.1 would cut a cell of contrast 0.2 down to its rim).
pub(super) fn cell_floor(m: f32, stained: f32, cfg: &CellFinderConfig) -> f32 {
    let own = cfg.contrast_fraction * (stained - m);
    if cfg.contrast_fraction <= 0.0 || own.is_nan() {
        return cfg.min_density;
    }
    own.clamp(0.0, cfg.min_density)
}

/// The density's quantile that stands for its stained pixels (cells cover a fifth to two
/// thirds of a field: its top twentieth lies inside them).
pub(super) const STAINED_QUANTILE: f32 = 0.95;

/// Noise widths of the cells' threshold for a density of background mode `m`, noise width
/// `sigma` and stained level `stained`: `noise_widths`, or where the cells stand few noise
/// widths above the background (a pale stain) `contrast_fraction` of their contrast, down to
/// `min_widths` (`contrast_fraction` 0: always `noise_widths`). A threshold of many noise
/// widths cuts a pale cell's rim into arcs and specks.
pub(super) fn cell_widths(m: f32, sigma: f32, stained: f32, cfg: &CellFinderConfig) -> f32 {
    let k = cfg.contrast_fraction * (stained - m) / sigma;
    if cfg.contrast_fraction <= 0.0 || k.is_nan() {
        return cfg.noise_widths;
    }
    k.clamp(cfg.min_widths.min(cfg.noise_widths), cfg.noise_widths)
}

/// The value below which a fraction `q` of the values counted in `hist` lie (bins of
/// `1 / scale` from `-HIST_OFFSET`; the bin's middle).
pub(super) fn quantile_of(hist: &[u32], scale: f32, q: f32) -> f32 {
    let total: u64 = hist.iter().map(|&c| c as u64).sum();
    let target = (q as f64 * total as f64).ceil() as u64;
    let mut acc = 0u64;
    let bin = hist
        .iter()
        .position(|&c| {
            acc += c as u64;
            acc >= target.max(1)
        })
        .unwrap_or(hist.len().saturating_sub(1));
    (bin as f32 + 0.5) / scale - HIST_OFFSET
}

/// The bins of [`mode_and_half_width_of`]: 1/128 wide (on a frame of 8-bit pixels, quantised).
const HALF_WIDTH_BINS: usize = 1024;
const HALF_WIDTH_SCALE: f32 = 128.0;

/// The background mode of the values counted in `hist` (`HALF_WIDTH_BINS` bins of
/// `1 / HALF_WIDTH_SCALE`) and the noise width from its lower half-width at half maximum.
fn mode_and_half_width_of(hist: &[u32]) -> (f32, f32) {
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
        (mode as f32 + 0.5) / HALF_WIDTH_SCALE - HIST_OFFSET,
        hw as f32 / 1.1774 / HALF_WIDTH_SCALE,
    )
}

/// 3x3 minimum (`erode`) or maximum filter of a 0/1 mask over the pixels inside the frame.
pub(super) fn filter3(mask: &[u8], w: usize, erode: bool) -> Vec<u8> {
    let h = mask.len() / w;
    // One copy of the loops per filter: the pick inlines and the rows vectorise.
    let mut out = vec![0u8; mask.len()];
    if erode {
        filter3_rows(mask, 0, w, h, 0..h, u8::min, &mut out);
    } else {
        filter3_rows(mask, 0, w, h, 0..h, u8::max, &mut out);
    }
    out
}

/// The opening (3x3 erosion, then dilation, as [`filter3`] makes them) of the frame-sized
/// 0/1 mask whose rows `row_mask(y, row)` writes: bands of rows side by side on the pool's
/// threads, each thresholding, eroding and dilating its rows and the two either side of them
/// in buffers of its own (the mask is never written whole, and a band's rows stay in cache).
pub(super) fn opened_mask(
    w: usize,
    h: usize,
    row_mask: impl Fn(usize, &mut [u8]) + Sync,
) -> Vec<u8> {
    const BAND: usize = 32;
    let mut out = vec![0u8; w * h];
    if w == 0 {
        return out;
    }
    out.par_chunks_mut(BAND * w)
        .enumerate()
        .for_each(|(band, dst)| {
            let (y0, y1) = (band * BAND, (band * BAND + BAND).min(h));
            let (m0, m1) = (y0.saturating_sub(2), (y1 + 2).min(h));
            let mut mask = vec![0u8; (m1 - m0) * w];
            for (y, row) in (m0..m1).zip(mask.chunks_exact_mut(w)) {
                row_mask(y, row);
            }
            let (e0, e1) = (y0.saturating_sub(1), (y1 + 1).min(h));
            let mut eroded = vec![0u8; (e1 - e0) * w];
            filter3_rows(&mask, m0, w, h, e0..e1, u8::min, &mut eroded);
            filter3_rows(&eroded, e0, w, h, y0..y1, u8::max, dst);
        });
    out
}

/// Rows `rows` of the 3x3 filter `pick` of a frame `h` rows high into `out` (`rows.len()`
/// rows), from its rows `src_y0..` in `src` (those the output rows need: one above and
/// below, inside the frame).
#[inline(always)]
fn filter3_rows(
    src: &[u8],
    src_y0: usize,
    w: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    pick: impl Fn(u8, u8) -> u8 + Copy,
    out: &mut [u8],
) {
    let row = |y: usize| &src[(y - src_y0) * w..(y - src_y0 + 1) * w];
    let mut across = vec![0u8; w];
    for (y, dst) in rows.zip(out.chunks_exact_mut(w)) {
        // Each pixel with the rows above and below (inside the frame), then with its left
        // and right neighbours (the frame's edge counts as neither).
        across.copy_from_slice(row(y));
        for ny in [y.wrapping_sub(1), y + 1] {
            if ny < h {
                for (d, &s) in across.iter_mut().zip(row(ny)) {
                    *d = pick(*d, s);
                }
            }
        }
        dst.copy_from_slice(&across);
        if w > 1 {
            for (d, (&l, &r)) in dst[1..w - 1]
                .iter_mut()
                .zip(across[..w - 2].iter().zip(&across[2..]))
            {
                *d = pick(*d, pick(l, r));
            }
            dst[0] = pick(across[0], across[1]);
            dst[w - 1] = pick(across[w - 1], across[w - 2]);
        }
    }
}

/// Fills the pallor of a cell whose stained rim is broken by gaps up to `2 x radius` pixels
/// wide: the background that a closing of the object's mask (dilation then erosion, `radius`
/// times 3x3) encloses becomes part of it. The closing's bridges themselves are not added, so
/// the outline stays as it is. `mask` holds one object, with at least `radius` pixels of
/// background around it.
pub(super) fn close_rings(mask: &mut [u8], w: usize, radius: u32) {
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
pub(super) fn fill_holes(mask: &mut [u8], w: usize) {
    fill_holes_upto(mask, w, usize::MAX);
}

/// [`fill_holes`] for the holes of at most `max_area` pixels (larger enclosed regions stay
/// background: the space a ring of touching cells closes in). Returns the largest hole's area.
/// The background is taken in runs along the rows, joined where runs of neighbouring rows
/// share a column: a component that reaches the window's edge is outside, any other a hole.
pub(super) fn fill_holes_upto(mask: &mut [u8], w: usize, max_area: usize) -> usize {
    let h = mask.len() / w;
    // The background's runs row by row; runs in rows next to each other that share a column
    // are 4-connected.
    let mut runs: Vec<Run> = Vec::new();
    let mut rows = Vec::with_capacity(h + 1);
    for (y, row) in mask.chunks_exact(w).enumerate() {
        rows.push(runs.len());
        push_runs(row, y, false, &mut runs);
    }
    rows.push(runs.len());
    let mut parent = join_runs(&runs, &rows, false);
    // Each component's area and whether it reaches the window's edge (then it is outside).
    let mut area = vec![0usize; runs.len()];
    let mut outside = vec![false; runs.len()];
    let mut root = vec![0u32; runs.len()];
    for (i, &Run { y, x0, x1 }) in runs.iter().enumerate() {
        root[i] = find_root(&mut parent, i as u32);
        let root = root[i] as usize;
        area[root] += (x1 - x0) as usize;
        outside[root] |= y == 0 || y as usize == h - 1 || x0 == 0 || x1 as usize == w;
    }
    let largest = (0..runs.len())
        .filter(|&i| root[i] as usize == i && !outside[i])
        .map(|i| area[i])
        .max()
        .unwrap_or(0);
    for v in mask.iter_mut() {
        *v = (*v != 0) as u8;
    }
    for (&Run { y, x0, x1 }, &root) in runs.iter().zip(&root) {
        let root = root as usize;
        if !outside[root] && area[root] <= max_area {
            let row = y as usize * w;
            mask[row + x0 as usize..row + x1 as usize].fill(1);
        }
    }
    largest
}
