//! The exact squared Euclidean distance transform of a mask (Felzenszwalb-Huttenlocher).

/// Exact squared Euclidean distance of each foreground pixel to the nearest background pixel
/// inside the frame (0 on background; `u32::MAX` where the frame has no background).
/// Felzenszwalb & Huttenlocher's separable transform: per column, then lower envelopes of
/// parabolas per row.
pub(super) fn squared_distance(mask: &[u8], w: usize) -> Vec<u32> {
    let h = mask.len() / w;
    const INF: u32 = u32::MAX / 4;
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
    for y in (0..h.saturating_sub(1)).rev() {
        let (head, below) = col.split_at_mut((y + 1) * w);
        let row = &mut head[y * w..];
        for (c, &b) in row.iter_mut().zip(&below[..w]) {
            *c = (*c).min(b + 1);
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
pub(super) fn envelope(f: &[u32], v: &mut [usize], z: &mut [f64], out: &mut [u32]) {
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
