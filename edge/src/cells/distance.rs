//! The exact squared Euclidean distance transform of a mask (Felzenszwalb-Huttenlocher), its
//! short rows by brute force in vector lanes where the processor has wide ones.

/// A column's distance with no background in it (far above any distance in a frame).
const INF: u32 = u32::MAX / 4;

/// Exact squared Euclidean distance of each foreground pixel to the nearest background pixel
/// inside the frame (0 on background; `u32::MAX` where the frame has no background).
/// Felzenszwalb & Huttenlocher's separable transform: per column, then lower envelopes of
/// parabolas per row.
pub(super) fn squared_distance(mask: &[u8], w: usize) -> Vec<u32> {
    squared_distance_with(mask, w, Lanes::here())
}

/// [`squared_distance`] with short runs' row pass by `lanes` ([`Lanes::None`]: the envelope).
pub(super) fn squared_distance_with(mask: &[u8], w: usize, lanes: Lanes) -> Vec<u32> {
    let h = mask.len() / w;
    // Column pass: vertical distance to the nearest background pixel, squared. Down the rows
    // (the distance to the background above), then up (below), every column at once.
    let mut col = vec![INF; mask.len()];
    for y in 0..h {
        let (done, rest) = col.split_at_mut(y * w);
        let row = &mut rest[..w];
        let m = &mask[y * w..(y + 1) * w];
        if y == 0 {
            for (c, &v) in row.iter_mut().zip(m) {
                *c = if v == 0 { 0 } else { INF };
            }
        } else {
            let above = &done[(y - 1) * w..];
            for ((c, &v), &a) in row.iter_mut().zip(m).zip(above) {
                *c = if v == 0 { 0 } else { (a + 1).min(INF) };
            }
        }
    }
    // Up the rows, each row's final distance squared as it is reached; `below` keeps the row
    // under it unsquared.
    let mut below = vec![INF; w];
    for row in col.chunks_exact_mut(w).rev() {
        for (c, b) in row.iter_mut().zip(below.iter_mut()) {
            let d = (*c).min(*b + 1);
            *b = d;
            *c = if d == INF { INF } else { d * d };
        }
    }
    // Row pass: lower envelope of the parabolas (x - q)^2 + col[q], per run of foreground.
    // The nearest background in the row bounds each run pixel's distance, so only the columns
    // from the background pixel before the run to the one after it can hold its minimum.
    let mut out = vec![0u32; mask.len()];
    let mut v = vec![0usize; w + 1];
    let mut g = vec![0i64; w + 1];
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
            if lanes != Lanes::None && hi - lo < NEAREST_MAX {
                nearest(&f[lo..=hi], &mut row[lo..=hi], lanes);
            } else {
                // With background at both ends, no pixel of the run lies farther than
                // `(hi - lo) / 2` from one: a column whose own distance is beyond that squared
                // is never the nearest, and stays off the envelope.
                let cap = if f[lo] == 0 && f[hi] == 0 {
                    (((hi - lo) / 2).pow(2) as u32).min(INF - 1)
                } else {
                    INF - 1
                };
                envelope(&f[lo..=hi], cap, &mut v, &mut g, &mut row[lo..=hi]);
            }
            a = b;
        }
    }
    out
}

/// Runs up to this many columns take [`nearest`]; longer ones the envelope.
const NEAREST_MAX: usize = 64;

/// The vector lanes [`nearest`] runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lanes {
    /// None wide enough: every run takes the envelope. With 128-bit lanes and no unsigned
    /// minimum (x86-64's baseline), trying every column costs more than the envelope.
    None,
    /// AVX2's 256-bit lanes (x86-64): eight columns at once.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// The lanes the build targets, whatever they are (tests).
    #[cfg(test)]
    Plain,
}

impl Lanes {
    /// What this processor has (checked once per call, a cached flag).
    pub(super) fn here() -> Lanes {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Lanes::Avx2;
        }
        Lanes::None
    }
}

/// The 1-D squared distance transform of a short `f` (at most `NEAREST_MAX` columns) by
/// trying every column for every pixel, eight pixels at once: `n^2` additions and minima
/// without a branch, in vector lanes, where the envelope's few steps per pixel each hang on a
/// comparison the processor mispredicts (with AVX2, the transform's share of the finder's
/// profile on the suite's fields went from 15% to 8%). The same values as [`envelope`] with
/// no cap.
fn nearest(f: &[u32], out: &mut [u32], lanes: Lanes) {
    match lanes {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Lanes::Avx2` is only made where the processor has AVX2 (`Lanes::here`).
        Lanes::Avx2 => unsafe { nearest_avx2(f, out) },
        _ => nearest_lanes(f, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nearest_avx2(f: &[u32], out: &mut [u32]) {
    nearest_lanes(f, out)
}

#[inline(always)]
fn nearest_lanes(f: &[u32], out: &mut [u32]) {
    const LANES: usize = 8;
    for (c, chunk) in out.chunks_mut(LANES).enumerate() {
        let mut best = [u32::MAX; LANES];
        // Each lane's (x - q)^2 and its step to q + 1, 2q + 1 - 2x (wrapping).
        let mut sq = [0u32; LANES];
        let mut step = [0u32; LANES];
        for i in 0..LANES {
            let x = (c * LANES + i) as u32;
            sq[i] = x * x;
            step[i] = 1u32.wrapping_sub(2 * x);
        }
        for &fq in f {
            for i in 0..LANES {
                best[i] = best[i].min(sq[i] + fq);
                sq[i] = sq[i].wrapping_add(step[i]);
                step[i] = step[i].wrapping_add(2);
            }
        }
        for (o, &b) in chunk.iter_mut().zip(&best) {
            *o = if b >= INF { u32::MAX } else { b };
        }
    }
}

/// 1-D squared distance transform of `f` (`INF` = no background in that column) into
/// `out`, by the lower envelope of parabolas, leaving out the columns whose `f` is above
/// `cap` (below `INF`; the caller knows those are never the nearest). The parabola
/// of column `p` is `(x - p)^2 + f[p]`; `g` holds `f[p] + p^2` of each parabola on the
/// envelope, and where two parabolas cross is compared by cross-multiplication in integers
/// (no division).
pub(super) fn envelope(f: &[u32], cap: u32, v: &mut [usize], g: &mut [i64], out: &mut [u32]) {
    let mut k = 0usize;
    let mut any = false;
    for (q, &fq) in f.iter().enumerate() {
        if fq > cap {
            continue;
        }
        let gq = fq as i64 + (q * q) as i64;
        if !any {
            any = true;
            v[0] = q;
            g[0] = gq;
            continue;
        }
        // Parabola q crosses parabola v[k] at (gq - g[k]) / 2(q - v[k]); v[k] crosses v[k - 1]
        // at (g[k] - g[k - 1]) / 2(v[k] - v[k - 1]). While the first is not right of the
        // second, v[k] is nowhere lowest.
        while k > 0 {
            let (p, pp) = (v[k], v[k - 1]);
            if (gq - g[k]) * (p - pp) as i64 <= (g[k] - g[k - 1]) * (q - p) as i64 {
                k -= 1;
            } else {
                break;
            }
        }
        k += 1;
        v[k] = q;
        g[k] = gq;
    }
    if !any {
        out.iter_mut().for_each(|o| *o = u32::MAX);
        return;
    }
    let last = k;
    let mut k = 0;
    for (x, o) in out.iter_mut().enumerate() {
        // Move on while the next parabola is lower at x: their crossing lies left of x.
        while k < last && g[k + 1] - g[k] < 2 * (x as i64) * (v[k + 1] - v[k]) as i64 {
            k += 1;
        }
        let p = v[k];
        let dx = x.abs_diff(p) as u64;
        *o = (dx * dx + f[p] as u64).min(u32::MAX as u64) as u32;
    }
}
