//! Cuts that the watershed misses: basins split at a neck, and a cell's blue parts (a
//! parasite, a platelet on it) told from a neighbour.

use image::RgbImage;

use super::foreground::Background;
use super::watershed::{basin_sizes, find_root, Object};

/// Cuts basins at a neck (see `CellFinderConfig::split_necks`). Only basins of at least 0.6 of
/// a typical cell's area are looked at. Their outline's bays are the boundary pixels at least
/// `max(2, 0.2 x typical_r)` inside the convex hull, grouped by adjacency; each bay is
/// represented by its deepest pixel. Of the pairs of bays whose connecting line passes through
/// the basin (its midpoint does) and is shorter than `saliency` x the two depths together, the
/// shortest relative to its depths cuts the basin in two when the smaller side holds at least
/// a fifth of it; the smaller side becomes a basin of its own. A single bay (a sickle's inner edge,
/// a helmet cell's bite) never cuts, nor do the shallow bays between an echinocyte's
/// crenations; the parts cut off between an acanthocyte's spicules are below a fifth.
pub(super) fn split_necks(
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
    // Each basin's area, then the boundary pixels (a 4-neighbour outside the basin) of those
    // big enough to look at, in raster order.
    let area = basin_sizes(&labels, n);
    let big: Vec<bool> = area.iter().map(|&a| a as f32 >= min_area).collect();
    if !big.contains(&true) {
        return (labels, n);
    }
    let mut boundaries: Vec<Vec<P>> = vec![Vec::new(); n];
    for (y, row) in labels.chunks_exact(w).enumerate() {
        for (x, &l) in row.iter().enumerate() {
            if l == u32::MAX || !big[l as usize] {
                continue;
            }
            let interior = x > 0
                && row[x - 1] == l
                && x + 1 < w
                && row[x + 1] == l
                && y > 0
                && labels[(y - 1) * w + x] == l
                && y + 1 < h
                && labels[(y + 1) * w + x] == l;
            if !interior {
                boundaries[l as usize].push((x as f32, y as f32));
            }
        }
    }
    for (l, boundary) in boundaries.into_iter().enumerate() {
        if !big[l] {
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
        // Convex hull (Andrew's monotone chain; raster order sorted by x, then y).
        let sorted = by_column(&boundary, w);
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
        // Depth inside the hull: the distance to the nearest hull edge's line. Most boundary
        // pixels lie on or near the hull: the search stops at the first edge closer than
        // `min_depth`, starting from the edge that stopped the last one.
        let edges: Vec<(P, P, f32)> = (0..hull.len())
            .map(|k| {
                let (a, b) = (hull[k], hull[(k + 1) % hull.len()]);
                let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt().max(1e-6);
                (a, b, len)
            })
            .collect();
        let mut near = 0;
        let mut deep: Vec<(P, f32)> = Vec::new();
        'pixels: for &p in &boundary {
            let mut d = f32::INFINITY;
            for k in (near..edges.len()).chain(0..near) {
                let (a, b, len) = edges[k];
                d = d.min(cross(a, b, p).abs() / len);
                if d < min_depth {
                    near = k;
                    continue 'pixels;
                }
            }
            deep.push((p, d));
        }
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
        // The basin's pixels in raster order (earlier cuts relabelled only other basins).
        let pix: Vec<(usize, usize)> = labels
            .chunks_exact(w)
            .enumerate()
            .flat_map(|(y, row)| {
                row.iter()
                    .enumerate()
                    .filter(move |(_, &m)| m == l)
                    .map(move |(x, _)| (x, y))
            })
            .collect();
        let left: Vec<bool> = pix
            .iter()
            .map(|&(x, y)| cross(p, q, (x as f32, y as f32)) > 0.0)
            .collect();
        let on_left = left.iter().filter(|&&s| s).count();
        let smaller = on_left.min(pix.len() - on_left);
        if 5 * smaller < pix.len() {
            continue;
        }
        let minority = 2 * on_left < pix.len();
        let id = n as u32;
        n += 1;
        for (&(x, y), &s) in pix.iter().zip(&left) {
            if s == minority {
                labels[y * w + x] = id;
            }
        }
    }
    (labels, n)
}

/// Pixel centres given in raster order, sorted by x, then y: a counting sort by column, which
/// keeps each column's pixels in raster order (by y).
pub(super) fn by_column(raster: &[(f32, f32)], w: usize) -> Vec<(f32, f32)> {
    let mut start = vec![0usize; w + 1];
    for &(x, _) in raster {
        start[x as usize + 1] += 1;
    }
    for k in 1..=w {
        start[k] += start[k - 1];
    }
    let mut sorted = vec![(0.0, 0.0); raster.len()];
    for &p in raster {
        let s = &mut start[p.0 as usize];
        sorted[*s] = p;
        *s += 1;
    }
    sorted
}

/// More than the rounding of [`split_blue_parts`]'s red-minus-blue density can add to the
/// background's red-minus-blue (logs of 8-bit values and of the background's: at most 5.55).
pub(super) const BLUE_MARGIN: f32 = 1e-5;

/// Blue-stained parts at the edge of a cell become basins of their own: a platelet lying
/// against a red cell (or on its rim) is one object with it, and the distance map has no peak
/// for it. Pixels whose red-minus-blue optical density exceeds `threshold` are grouped
/// (8-connected); a group that reaches the object's edge and covers at most a quarter of the
/// basin holding most of it is split off. Blue parts inside a cell (a parasite, a white cell's
/// nucleus) and cells blue all over (platelets and white cells on their own) stay as they are.
pub(super) fn split_blue_parts(
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
    // The background block of each of the window's columns.
    let block = bg.block as usize;
    let bxs: Vec<usize> = (obj.x0..obj.x0 + w)
        .map(|x| (x / block).min(bg.gw - 1))
        .collect();
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
        // Every pixel of the window, then masked by the object: no branch at its outline.
        for (((&l, b), px), &bx) in row.iter().zip(out).zip(pixels.chunks_exact(3)).zip(&bxs) {
            let g = blocks[bx];
            // A pixel no bluer than red (b <= r, so ln b <= ln r) reads at most the block's
            // g[0] - g[2], give or take a few roundings (under 2e-6 at these magnitudes): below
            // the threshold by more than that, it is not blue, and its logs are not looked up.
            if px[2] <= px[0] && g[0] - g[2] + BLUE_MARGIN <= threshold {
                *b = false;
                continue;
            }
            // ln(bg_r / r) - ln(bg_b / b)
            let red_minus_blue = (g[0] - ln[px[0] as usize]) - (g[2] - ln[px[2] as usize]);
            *b = l != u32::MAX && red_minus_blue > threshold;
            any |= *b;
        }
    }
    if !any {
        return (labels, n);
    }
    let area = basin_sizes(&labels, n);
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
        if 4 * group.len() <= area[host as usize] {
            let id = n as u32;
            n += 1;
            for &i in &group {
                labels[i] = id;
            }
        }
    }
    (labels, n)
}
