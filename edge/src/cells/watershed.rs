//! Objects of the mask and the dynamics-based watershed that floods each one's distance map
//! from its peaks, keeping two basins apart only where both rise more than `h` above the level
//! where they meet; the typical cell radius of a frame.

use rayon::prelude::*;

use super::distance::squared_distance;
use super::foreground::{close_rings, fill_holes_upto};

/// One 8-connected object of the foreground mask, in its own window (its box grown by one
/// pixel, clipped to the frame): a 0/1 mask of the object alone and the exact squared
/// distance of each of its pixels to the background. The nearest background pixel of any
/// object pixel touches the object, so it lies inside the window, and other objects never
/// come closer than the background between them: the window's transform is the frame's.
pub(super) struct Object {
    pub(super) x0: usize,
    pub(super) y0: usize,
    pub(super) w: usize,
    pub(super) h: usize,
    pub(super) dt2: Vec<u32>,
    /// Largest distance to the background (the object's radius where it is widest).
    pub(super) peak: f32,
    /// Area of the largest hole the object encloses (filled or not).
    pub(super) largest_hole: usize,
    /// Pixels of the object (holes filled).
    pub(super) area: usize,
}

/// Finds the objects of `mask` (flood fill from each unvisited foreground pixel), fills their
/// holes and computes their distance transforms. An object's filled holes are its own: what
/// lies inside them is not an object of its own, and the scan (raster order) never starts
/// there. The 8-connected components are labelled first (runs of each row joined to the
/// runs they touch in the row above) and each one's object built side by side on the pool's
/// threads. When no object's filling reaches another component, the scan meets the
/// components in the order of their first pixels and takes each as built. Otherwise the scan
/// takes each component's object as it is when no earlier object's filling reached into it,
/// else builds it from what is left, exactly as a scan alone would.
pub(super) fn objects(mask: &[u8], w: usize, close_gaps: u32, max_hole: usize) -> Vec<Object> {
    let (runs, comps) = components(mask, w);
    let built: Vec<(Object, Vec<u8>, bool)> = comps
        .par_iter()
        .with_max_len(1)
        .map(|c| {
            let rs = &runs[c.clone()];
            let (obj, local) = build_object(rs, mask, w, close_gaps, max_hole);
            let reaches = reaches_others(&obj, &local, rs, mask, w);
            (obj, local, reaches)
        })
        .collect();
    if !built.iter().any(|b| b.2) {
        return built.into_iter().map(|b| b.0).collect();
    }
    const NONE: u32 = u32::MAX;
    let mut comp = vec![NONE; mask.len()];
    for (id, c) in comps.iter().enumerate() {
        for r in &runs[c.clone()] {
            let row = r.y as usize * w;
            comp[row + r.x0 as usize..row + r.x1 as usize].fill(id as u32);
        }
    }
    let mut built: Vec<Option<(Object, Vec<u8>, bool)>> = built.into_iter().map(Some).collect();
    // The scan: the mask's pixels in raster order (its runs row by row).
    let mut raster = runs.clone();
    raster.sort_unstable_by_key(|r| (r.y, r.x0));
    let mut seen = vec![false; mask.len()];
    // Components some earlier object's window filled into.
    let mut touched = vec![false; comps.len()];
    let mut scratch: Vec<(u32, u32)> = Vec::new();
    let mut scratch_runs: Vec<Run> = Vec::new();
    let mut out = Vec::new();
    for run in &raster {
        let row = run.y as usize * w;
        for start in row + run.x0 as usize..row + run.x1 as usize {
            if seen[start] {
                continue;
            }
            let c = comp[start] as usize;
            let (obj, local) = if !touched[c] {
                // Untouched, its first pixel: the scan's flood from here is the component.
                let (obj, local, reaches) = built[c].take().expect("each component is taken once");
                if !reaches {
                    // The only foreground in its window is its own: the scan sees its runs,
                    // and no other component is touched.
                    for r in &runs[comps[c].clone()] {
                        let row = r.y as usize * w;
                        seen[row + r.x0 as usize..row + r.x1 as usize].fill(true);
                    }
                    out.push(obj);
                    continue;
                }
                (obj, local)
            } else {
                seen[start] = true;
                scratch.clear();
                scratch.push(((start % w) as u32, (start / w) as u32));
                spread(mask, w, &mut scratch, 0, |j| {
                    !std::mem::replace(&mut seen[j], true)
                });
                scratch_runs.clear();
                scratch_runs.extend(scratch.iter().map(|&(x, y)| Run {
                    y,
                    x0: x,
                    x1: x + 1,
                }));
                build_object(&scratch_runs, mask, w, close_gaps, max_hole)
            };
            for ly in 0..obj.h {
                for lx in 0..obj.w {
                    if local[ly * obj.w + lx] != 0 {
                        let j = (obj.y0 + ly) * w + obj.x0 + lx;
                        seen[j] = true;
                        if mask[j] != 0 && comp[j] as usize != c {
                            touched[comp[j] as usize] = true;
                        }
                    }
                }
            }
            out.push(obj);
        }
    }
    out
}

/// A run of foreground pixels in row `y`, columns `x0..x1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) y: u32,
    pub(super) x0: u32,
    pub(super) x1: u32,
}

/// The 8-connected components of `mask`: its runs grouped by component (each group in raster
/// order) and each component's range of them, components in the raster order of their first
/// pixels.
pub(super) fn components(mask: &[u8], w: usize) -> (Vec<Run>, Vec<std::ops::Range<usize>>) {
    // The runs of each row, rows side by side.
    let per_row: Vec<Vec<Run>> = mask
        .par_chunks_exact(w)
        .enumerate()
        .map(|(y, row)| {
            let mut out = Vec::new();
            push_runs(row, y, true, &mut out);
            out
        })
        .collect();
    let mut runs: Vec<Run> = Vec::with_capacity(per_row.iter().map(Vec::len).sum());
    let mut row_start = Vec::with_capacity(per_row.len() + 1);
    for r in per_row {
        row_start.push(runs.len());
        runs.extend(r);
    }
    row_start.push(runs.len());
    // A run joins every run of the row above that it touches (overlapping columns or
    // diagonal neighbours).
    let mut parent = join_runs(&runs, &row_start, true);
    // Components numbered by their first run; runs grouped by component, keeping their order.
    let mut id = vec![u32::MAX; runs.len()];
    let mut count: Vec<usize> = Vec::new();
    for i in 0..runs.len() {
        let root = find_root(&mut parent, i as u32) as usize;
        if id[root] == u32::MAX {
            id[root] = count.len() as u32;
            count.push(0);
        }
        id[i] = id[root];
        count[id[i] as usize] += 1;
    }
    let mut ranges = Vec::with_capacity(count.len());
    let mut next = Vec::with_capacity(count.len());
    let mut at = 0;
    for &n in &count {
        ranges.push(at..at + n);
        next.push(at);
        at += n;
    }
    let mut grouped = vec![Run { y: 0, x0: 0, x1: 0 }; runs.len()];
    for (r, &c) in runs.iter().zip(&id) {
        grouped[next[c as usize]] = *r;
        next[c as usize] += 1;
    }
    (grouped, ranges)
}

/// Appends row `y`'s runs of foreground (`foreground`: pixels not 0) or of background (0),
/// left to right.
pub(super) fn push_runs(row: &[u8], y: usize, foreground: bool, out: &mut Vec<Run>) {
    let w = row.len();
    let mut x = 0;
    while x < w {
        match first_byte(&row[x..], foreground) {
            None => break,
            Some(a) => x += a,
        }
        let x0 = x;
        x += first_byte(&row[x..], !foreground).unwrap_or(w - x);
        out.push(Run {
            y: y as u32,
            x0: x0 as u32,
            x1: x as u32,
        });
    }
}

/// The index of the first byte of `bytes` that is not 0 (`nonzero`) or that is 0, eight
/// bytes at a time.
pub(super) fn first_byte(bytes: &[u8], nonzero: bool) -> Option<usize> {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let v = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        // Non-zero: the word's bytes as they are. Zero: the high bit of each byte that is 0
        // (its low seven bits plus 0x7f carry into the high bit unless all are 0, and never
        // into the next byte).
        let hits = if nonzero {
            v
        } else {
            !(((v & LOW7) + LOW7) | v | LOW7)
        };
        if hits != 0 {
            // Little-endian: the lowest hit is the first byte.
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = words.remainder().iter().position(|&v| (v != 0) == nonzero);
    rest.map(|k| at + k)
}

/// Union-find over `runs` (row `y`'s runs are `rows[y]..rows[y + 1]`, in column order): each
/// run joined to the runs of the row above that share a column with it, or with `diagonal`
/// also touch it at a corner (8-connectivity; else 4). A component's root is its first run.
pub(super) fn join_runs(runs: &[Run], rows: &[usize], diagonal: bool) -> Vec<u32> {
    let d = diagonal as u32;
    let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
    for y in 1..rows.len().saturating_sub(1) {
        let above = rows[y - 1]..rows[y];
        let mut k = above.start;
        for i in rows[y]..rows[y + 1] {
            let r = runs[i];
            // Runs above that end before this one's reach: done for this and later runs.
            while k < above.end && runs[k].x1 + d <= r.x0 {
                k += 1;
            }
            let mut j = k;
            while j < above.end && runs[j].x0 < r.x1 + d {
                let (a, b) = (
                    find_root(&mut parent, i as u32),
                    find_root(&mut parent, j as u32),
                );
                if a != b {
                    let (lo, hi) = (a.min(b), a.max(b));
                    parent[hi as usize] = lo;
                }
                j += 1;
            }
        }
    }
    parent
}

/// Whether the object built from `runs`, filled into `local`, holds foreground of `mask` that
/// is not its own (another component inside its filled holes).
fn reaches_others(obj: &Object, local: &[u8], runs: &[Run], mask: &[u8], w: usize) -> bool {
    if obj.area == runs.iter().map(|r| (r.x1 - r.x0) as usize).sum::<usize>() {
        return false;
    }
    let mut own = vec![false; local.len()];
    for r in runs {
        let row = (r.y as usize - obj.y0) * obj.w;
        own[row + r.x0 as usize - obj.x0..row + r.x1 as usize - obj.x0].fill(true);
    }
    // Row by row, each row whole (a loop that vectorises).
    (0..obj.h).any(|ly| {
        let l = ly * obj.w..(ly + 1) * obj.w;
        let m = (obj.y0 + ly) * w + obj.x0;
        let row = local[l.clone()]
            .iter()
            .zip(&own[l])
            .zip(&mask[m..m + obj.w]);
        row.fold(false, |a, ((&lo, &ow), &ma)| {
            a | (lo != 0 && !ow && ma != 0)
        })
    })
}

/// Grows the object whose pixels from `pixels[from..]` on are known through the mask's
/// 8-connected foreground: each neighbour `take` accepts joins it.
pub(super) fn spread(
    mask: &[u8],
    w: usize,
    pixels: &mut Vec<(u32, u32)>,
    from: usize,
    mut take: impl FnMut(usize) -> bool,
) {
    let h = mask.len() / w;
    let mut next = from;
    while next < pixels.len() {
        let (x, y) = (pixels[next].0 as usize, pixels[next].1 as usize);
        next += 1;
        if x > 0 && y > 0 && x + 1 < w && y + 1 < h {
            // Inside the frame: the 3x3 neighbourhood without bounds, row by row.
            for ny in y - 1..y + 2 {
                let row = ny * w;
                for nx in x - 1..x + 2 {
                    if mask[row + nx] != 0 && take(row + nx) {
                        pixels.push((nx as u32, ny as u32));
                    }
                }
            }
            continue;
        }
        for ny in y.saturating_sub(1)..(y + 2).min(h) {
            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                let j = ny * w + nx;
                if mask[j] != 0 && take(j) {
                    pixels.push((nx as u32, ny as u32));
                }
            }
        }
    }
}

/// The object of these runs of pixels: its window (the box grown by one pixel and by the closing's
/// reach), its rims' gaps closed and holes filled, its distance transform; and its window's
/// mask (1 on the object, holes filled).
pub(super) fn build_object(
    runs: &[Run],
    mask: &[u8],
    w: usize,
    close_gaps: u32,
    max_hole: usize,
) -> (Object, Vec<u8>) {
    let h = mask.len() / w;
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for r in runs {
        x0 = x0.min(r.x0 as usize);
        x1 = x1.max(r.x1 as usize - 1);
        y0 = y0.min(r.y as usize);
        y1 = y1.max(r.y as usize);
    }
    let pad = 1 + close_gaps as usize;
    let (wx0, wy0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
    let (ww, wh) = ((x1 + 1 + pad).min(w) - wx0, (y1 + 1 + pad).min(h) - wy0);
    let mut local = vec![0u8; ww * wh];
    for r in runs {
        let row = (r.y as usize - wy0) * ww;
        local[row + r.x0 as usize - wx0..row + r.x1 as usize - wx0].fill(1);
    }
    if close_gaps > 0 {
        close_rings(&mut local, ww, close_gaps);
    }
    // Background the object encloses (pallor, pale rings) becomes part of it, with
    // anything inside it (an object enclosed by this one is not counted on its own).
    let largest_hole = fill_holes_upto(&mut local, ww, max_hole);
    let dt2 = squared_distance(&local, ww);
    // The square root of the largest squared distance (the root is monotonic: one root, not
    // one per pixel).
    let peak = match dt2.iter().copied().max().unwrap_or(0) {
        u32::MAX => f32::INFINITY,
        d => (d as f32).sqrt(),
    };
    let area = local.iter().filter(|&&v| v != 0).count();
    let obj = Object {
        x0: wx0,
        y0: wy0,
        w: ww,
        h: wh,
        dt2,
        peak,
        largest_hole,
        area,
    };
    (obj, local)
}

/// [`flood`], and for a clump (an object of more than `clump_area` typical cells' area `cell`)
/// the split that makes the most of its parts look like one cell: the flood with the dynamics
/// `h_dyn`, halved and quartered and eighthed, each with basins under two fifths of a cell
/// merged into the neighbour they share most outline with, scored by the parts of 0.5 to 1.6
/// cells' area; 0 = off. Overlapping cells leave only a shallow saddle between their distance
/// peaks, and a clump's outline raises spurious ones.
pub(super) fn flood_clump(
    obj: &Object,
    h_dyn: f32,
    cell: f32,
    clump_area: f32,
) -> (Vec<u32>, usize) {
    if single_seed(obj) {
        // One basin whatever the dynamics: no flood, no split.
        let labels = obj.dt2.iter().map(|&d| if d > 0 { 0 } else { u32::MAX });
        return (labels.collect(), 1);
    }
    flood_and_split_clump(obj, h_dyn, cell, clump_area)
}

/// [`flood_clump`] without its short cut for objects of a single seed.
pub(super) fn flood_and_split_clump(
    obj: &Object,
    h_dyn: f32,
    cell: f32,
    clump_area: f32,
) -> (Vec<u32>, usize) {
    let drain = Drain::of(obj, &flood_order(obj));
    let first = drain.flood(h_dyn);
    if clump_area <= 0.0 || cell <= 0.0 || (obj.area as f32) < clump_area * cell {
        return first;
    }
    let score = |labels: &[u32], n: usize| {
        basin_sizes(labels, n)
            .iter()
            .filter(|&&a| (0.5 * cell..=1.6 * cell).contains(&(a as f32)))
            .count()
    };
    let min_px = (0.4 * cell) as usize;
    let mut best: Option<(usize, Vec<u32>, usize)> = None;
    for k in 0..4 {
        let (mut labels, n) = if k == 0 {
            first.clone()
        } else {
            drain.flood(h_dyn / (1u32 << k) as f32)
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
/// most 4-connected outline with (smallest first, ties to the lower index; the most outline,
/// ties to the lower index), and renumbers the basins `0..n` in raster order of their first
/// pixels. Merging stops at a small basin that touches no other. Returns the new number of
/// basins. The sizes and shared outlines are counted once and carried through the merges: a
/// merged basin's outline with each neighbour is the sum of its parts'.
pub(super) fn merge_small(labels: &mut [u32], n: usize, w: usize, min_px: usize) -> usize {
    const NONE: u32 = u32::MAX;
    let mut size = basin_sizes(labels, n);
    // Where each basin went (itself while it stands).
    let mut into: Vec<u32> = (0..n as u32).collect();
    if (0..n).any(|l| size[l] > 0 && size[l] < min_px) {
        // Pixel pairs side by side or one above the other in two basins: each basin's
        // neighbours with the length of outline they share.
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for (y, row) in labels.chunks_exact(w).enumerate() {
            let below = labels.get((y + 1) * w..(y + 2) * w);
            for (x, &a) in row.iter().enumerate() {
                if a == NONE {
                    continue;
                }
                let right = row.get(x + 1).copied().unwrap_or(NONE);
                let down = below.map_or(NONE, |r| r[x]);
                for b in [right, down] {
                    if b != NONE && b != a {
                        pairs.push((a, b));
                        pairs.push((b, a));
                    }
                }
            }
        }
        pairs.sort_unstable();
        let mut shared: Vec<Vec<(u32, usize)>> = vec![Vec::new(); n];
        for run in pairs.chunk_by(|p, q| p == q) {
            let (a, b) = run[0];
            shared[a as usize].push((b, run.len()));
        }
        while let Some(small) = (0..n)
            .filter(|&l| size[l] > 0 && size[l] < min_px)
            .min_by_key(|&l| size[l])
        {
            let Some(&(to, _)) = shared[small]
                .iter()
                .max_by_key(|(l, c)| (*c, std::cmp::Reverse(*l)))
            else {
                // An isolated small basin: merging stops here (the debris filter judges what
                // is left small).
                break;
            };
            let gone = std::mem::take(&mut shared[small]);
            for (l, c) in gone {
                let others = &mut shared[l as usize];
                others.retain(|e| e.0 != small as u32);
                if l == to {
                    continue;
                }
                match others.iter_mut().find(|e| e.0 == to) {
                    Some(e) => e.1 += c,
                    None => others.push((to, c)),
                }
                let mine = &mut shared[to as usize];
                match mine.iter_mut().find(|e| e.0 == l) {
                    Some(e) => e.1 += c,
                    None => mine.push((l, c)),
                }
            }
            size[to as usize] += size[small];
            size[small] = 0;
            into[small] = to;
        }
    }
    // Each basin's final one, then renumbered in order of first pixels.
    let last = |mut l: u32| {
        while into[l as usize] != l {
            l = into[l as usize];
        }
        l
    };
    let fin: Vec<u32> = (0..n as u32).map(last).collect();
    let mut map = vec![NONE; n];
    let mut next = 0u32;
    // Run by run: a run of one basin is renumbered at once.
    let mut at = 0;
    while at < labels.len() {
        let (l, end) = (labels[at], run_end(labels, at));
        if l != NONE {
            let m = &mut map[fin[l as usize] as usize];
            if *m == NONE {
                *m = next;
                next += 1;
            }
            labels[at..end].fill(*m);
        }
        at = end;
    }
    next as usize
}

/// The radius of a disc of the median area of the objects at least half as wide as a cell of
/// radius `r`.
pub(super) fn disc_radius(objs: &[Object], r: f32) -> f32 {
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
pub(super) fn plain_median_peak(objs: &[Object]) -> Option<f32> {
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
pub(super) fn median_peak(objs: &[Object]) -> Option<f32> {
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

/// The pixels of each basin `0..n` in `labels` (`u32::MAX`: none), counted run by run: a
/// window's rows hold long runs of one basin, and counting them pixel by pixel makes each
/// increment wait on the one before (the same counter).
pub(super) fn basin_sizes(labels: &[u32], n: usize) -> Vec<usize> {
    let mut size = vec![0usize; n];
    let mut at = 0;
    while at < labels.len() {
        let (l, end) = (labels[at], run_end(labels, at));
        if l != u32::MAX {
            size[l as usize] += end - at;
        }
        at = end;
    }
    size
}

/// The end (exclusive) of the run of values equal to `labels[at]` that starts at `at`.
pub(super) fn run_end(labels: &[u32], at: usize) -> usize {
    let l = labels[at];
    labels[at..]
        .iter()
        .position(|&m| m != l)
        .map_or(labels.len(), |k| at + k)
}

pub(super) fn find_root(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let p = parent[i as usize];
        parent[i as usize] = parent[p as usize];
        i = p;
    }
    i
}

/// The object's pixels from the highest distance down (a counting sort on the integer
/// squared distances), ties in raster order.
pub(super) fn flood_order(obj: &Object) -> Vec<(u32, u32)> {
    let w = obj.w;
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
    for (y, row) in obj.dt2.chunks_exact(w).enumerate() {
        for (x, &d) in row.iter().enumerate() {
            if d > 0 {
                let s = &mut start[slot(d)];
                order[*s as usize] = (x as u32, y as u32);
                *s += 1;
            }
        }
    }
    order
}

/// Whether [`flood`] starts a single basin on `obj`: exactly one of its pixels has no
/// neighbour the flood visits before it (higher on the distance map, or as high and earlier in
/// raster order). Every other pixel then drains into that basin, and no two basins ever meet,
/// whatever the dynamics: most lone cells. Stops at the row of the second such pixel.
pub(super) fn single_seed(obj: &Object) -> bool {
    let (w, h) = (obj.w, obj.h);
    let d = &obj.dt2;
    // A pixel starts a basin when it is higher than its neighbours before it in raster order
    // (up-left, up, up-right, left) and at least as high as those after it. Off the window
    // reads as background (0), which drains nothing.
    let zeros = vec![0u32; w];
    let row = |y: usize| &d[y * w..(y + 1) * w];
    let mut seeds = 0u32;
    for y in 0..h {
        let (up, mid) = (if y > 0 { row(y - 1) } else { &zeros }, row(y));
        let down = if y + 1 < h { row(y + 1) } else { &zeros };
        let at = |r: &[u32], x: usize, dx: isize| {
            let nx = x as isize + dx;
            if nx < 0 || nx >= w as isize {
                0
            } else {
                r[nx as usize]
            }
        };
        let seed = |x: usize| {
            let v = mid[x];
            let before = at(up, x, -1)
                .max(up[x])
                .max(at(up, x, 1))
                .max(at(mid, x, -1));
            let after = at(mid, x, 1)
                .max(at(down, x, -1))
                .max(down[x])
                .max(at(down, x, 1));
            (v > 0 && v > before && v >= after) as u32
        };
        if w < 3 {
            seeds += (0..w).map(seed).sum::<u32>();
            continue;
        }
        seeds += seed(0) + seed(w - 1);
        // Inside the row, without bounds checks (the compiler vectorises this).
        for x in 1..w - 1 {
            let v = mid[x];
            let before = up[x - 1].max(up[x]).max(up[x + 1]).max(mid[x - 1]);
            let after = mid[x + 1].max(down[x - 1]).max(down[x]).max(down[x + 1]);
            seeds += (v > 0 && v > before && v >= after) as u32;
        }
        if seeds > 1 {
            return false;
        }
    }
    seeds == 1
}

/// Watershed of an object's distance transform by flooding from its peaks (pixels visited in
/// [`flood_order`]: from the highest distance down); basins whose peak rises less than the
/// dynamics `h_dyn` above the level where they meet a higher basin are merged into it.
///
/// What the flood of an object does whatever its dynamics: where each pixel drains (to its
/// labelled neighbour highest on the distance map, which leads back to the peak that started
/// its basin: its seed) and where basins meet (a pixel whose labelled neighbours drain to more
/// than one seed). Only whether two meeting basins merge depends on the dynamics, so an
/// object is flooded once and each dynamics replays the meetings ([`Drain::flood`]): the same
/// merges in the same order as a flood with that dynamics alone.
pub(super) struct Drain {
    /// Each window pixel's seed (`u32::MAX` off the object).
    seed: Vec<u32>,
    /// Each seed's peak (the distance where its basin started).
    peak: Vec<f32>,
    /// Each meeting's level and its range of `met`.
    meetings: Vec<(f32, u32, u32)>,
    /// The seeds of each meeting pixel's labelled neighbours, in the order the flood sees them
    /// (each once).
    met: Vec<u32>,
}

impl Drain {
    /// Floods `obj` in `order`, recording seeds and meetings.
    pub(super) fn of(obj: &Object, order: &[(u32, u32)]) -> Drain {
        let (w, h) = (obj.w, obj.h);
        // A window clipped by the frame can hold object pixels on its edge; any other has a
        // background rim, and its object pixels' neighbours need no bounds checks.
        let on_edge = |i: usize| obj.dt2[i] > 0;
        let clipped = (0..w).any(|x| on_edge(x) || on_edge((h - 1) * w + x))
            || (0..h).any(|y| on_edge(y * w) || on_edge(y * w + w - 1));
        let iw = w as isize;
        // The 3x3 neighbourhood row by row, without the pixel itself (not labelled yet).
        let offsets = [-iw - 1, -iw, -iw + 1, -1, 1, iw - 1, iw, iw + 1];
        let mut d = Drain {
            seed: vec![u32::MAX; w * h],
            peak: Vec::new(),
            meetings: Vec::new(),
            met: Vec::new(),
        };
        let mut around = [0usize; 8];
        for &(x, y) in order {
            let (x, y) = (x as usize, y as usize);
            let p = y * w + x;
            let mut n = 0;
            if clipped {
                for ny in y.saturating_sub(1)..(y + 2).min(h) {
                    for nx in x.saturating_sub(1)..(x + 2).min(w) {
                        if (nx, ny) != (x, y) {
                            around[n] = ny * w + nx;
                            n += 1;
                        }
                    }
                }
            } else {
                for (a, o) in around.iter_mut().zip(offsets) {
                    *a = (p as isize + o) as usize;
                }
                n = 8;
            }
            // The least and the greatest seed among the labelled neighbours, without a branch
            // (whether a neighbour is labelled is a coin toss the processor mispredicts): an
            // unlabelled one's `u32::MAX` is no least, and plus one it wraps to 0, no greatest.
            // Most pixels have neighbours of one seed only, and take it.
            let (mut least, mut most) = (u32::MAX, 0u32);
            for &q in &around[..n] {
                let s = d.seed[q];
                least = least.min(s);
                most = most.max(s.wrapping_add(1));
            }
            d.seed[p] = if least == u32::MAX {
                d.peak.push(level_of(obj.dt2[p]));
                d.peak.len() as u32 - 1
            } else if most - 1 == least {
                least
            } else {
                // A meeting: the neighbours' seeds, each once, in the order they come, and
                // the labelled neighbour highest on the distance map (the first of the
                // highest), whose basin the pixel drains to. (Taking the basin with the highest
                // peak instead lets a big cell creep along the rim of a smaller touching one,
                // pixel by pixel at the rim's level.)
                let from = d.met.len();
                let mut uphill = (0u32, u32::MAX);
                for &q in &around[..n] {
                    let s = d.seed[q];
                    // Labelled pixels lie on the object, where the distance is positive.
                    if s != u32::MAX {
                        if obj.dt2[q] > uphill.0 {
                            uphill = (obj.dt2[q], s);
                        }
                        if !d.met[from..].contains(&s) {
                            d.met.push(s);
                        }
                    }
                }
                d.meetings
                    .push((level_of(obj.dt2[p]), from as u32, d.met.len() as u32));
                uphill.1
            };
        }
        d
    }

    /// The flood with dynamics `h_dyn`: a basin index per window pixel (`u32::MAX` off the
    /// object; the index of the seed whose basin it ended in) and the number of seeds.
    pub(super) fn flood(&self, h_dyn: f32) -> (Vec<u32>, usize) {
        let mut parent: Vec<u32> = (0..self.peak.len() as u32).collect();
        let mut roots: Vec<u32> = Vec::with_capacity(9);
        for &(level, from, to) in &self.meetings {
            roots.clear();
            for &s in &self.met[from as usize..to as usize] {
                let r = find_root(&mut parent, s);
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
            if roots.len() < 2 {
                continue;
            }
            roots
                .sort_unstable_by(|a, b| self.peak[*b as usize].total_cmp(&self.peak[*a as usize]));
            let best = roots[0];
            for &r in &roots[1..] {
                let pk = self.peak[r as usize];
                let dynamics = pk - level;
                // Small objects (platelets) touching a big one keep their own basin when they
                // rise clearly relative to their own size.
                let small_but_distinct = pk >= 2.5 && dynamics >= 1.0 && dynamics >= 0.35 * pk;
                if dynamics < h_dyn && !small_but_distinct {
                    parent[r as usize] = best;
                }
            }
        }
        // Each seed's basin looked up once, then every pixel's.
        let root: Vec<u32> = (0..self.peak.len() as u32)
            .map(|s| find_root(&mut parent, s))
            .collect();
        let labels = self
            .seed
            .iter()
            .map(|&s| if s == u32::MAX { s } else { root[s as usize] })
            .collect();
        (labels, self.peak.len())
    }
}

/// The flood's level at a squared distance.
fn level_of(d: u32) -> f32 {
    if d == u32::MAX {
        f32::INFINITY
    } else {
        (d as f32).sqrt()
    }
}
