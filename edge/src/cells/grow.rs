//! Each basin's statistics, and each cell grown back into its thin parts (the stained pixels
//! around it above a lower threshold, a few pixels out).

use rayon::prelude::*;

use super::watershed::Object;

/// Where a cell is and how big: a basin's statistics.
#[derive(Clone)]
pub(super) struct Acc {
    pub(super) x0: u32,
    pub(super) y0: u32,
    pub(super) x1: u32,
    pub(super) y1: u32,
    /// Twice the sums of the pixels' centres (`2x + 1`, `2y + 1`): integers, so a basin's
    /// rows add up in any grouping to the same sums.
    pub(super) sx: u64,
    pub(super) sy: u64,
    pub(super) n: u32,
    /// A pixel on the frame's border.
    pub(super) border: bool,
}

impl Acc {
    pub(super) const EMPTY: Acc = Acc {
        x0: u32::MAX,
        y0: u32::MAX,
        x1: 0,
        y1: 0,
        sx: 0,
        sy: 0,
        n: 0,
        border: false,
    };

    /// Adds pixel (`x`, `y`) of a `w` x `h` frame.
    pub(super) fn add(&mut self, x: u32, y: u32, w: u32, h: u32) {
        self.add_run(x, x + 1, y, w, h);
    }

    /// Adds pixels `x0..x1` of row `y` of a `w` x `h` frame (`x0 < x1`).
    pub(super) fn add_run(&mut self, x0: u32, x1: u32, y: u32, w: u32, h: u32) {
        self.x0 = self.x0.min(x0);
        self.y0 = self.y0.min(y);
        self.x1 = self.x1.max(x1);
        self.y1 = self.y1.max(y + 1);
        // The sum of 2x + 1 over x0..x1 is x1^2 - x0^2.
        let (a, b) = (x0 as u64, x1 as u64);
        self.sx += b * b - a * a;
        self.sy += (b - a) * (2 * y as u64 + 1);
        self.n += x1 - x0;
        self.border |= x0 == 0 || y == 0 || x1 == w || y == h - 1;
    }

    /// The centroid of the pixels' centres. The sums are exact (below 2^53) and halving is
    /// exact: the same numbers as summing `x + 0.5` in f64 pixel by pixel.
    pub(super) fn centre(&self) -> (f32, f32) {
        let n = self.n as f64;
        (
            (self.sx as f64 * 0.5 / n) as f32,
            (self.sy as f64 * 0.5 / n) as f32,
        )
    }
}

/// Growing basins into the stained pixels around them (see `CellFinderConfig::grow_steps`).
pub(super) struct Grow<'a> {
    /// Optical density of the frame.
    pub(super) od: &'a [f32],
    /// A pixel can be claimed when its density is above this.
    pub(super) threshold: f32,
    pub(super) w: usize,
    /// Rows of the frame.
    pub(super) h: usize,
    /// Which basins grow (the others are debris).
    pub(super) grows: &'a [bool],
}

impl Grow<'_> {
    pub(super) const NONE: u32 = u32::MAX;
    /// Marks a pixel claimed in the current step: claimed, but no source for its neighbours
    /// until the next step.
    pub(super) const FRESH: u32 = 1 << 31;

    /// Grows the basins into the unclaimed pixels above the threshold (8-connected), one ring
    /// per step for `steps` steps; a pixel that two basins reach in the same step joins the
    /// first growing basin among its neighbours (scanned row by row). Scans only the objects'
    /// windows and then the rings, not the frame. Returns the claimed pixels with their basins.
    pub(super) fn run(&self, basin: &mut [u32], objs: &[Object], steps: u32) -> Vec<(u32, u32)> {
        // First ring: unclaimed pixels next to a growing basin. A basin's pixels lie inside its
        // object's window, and so do their neighbours (the window is the box grown by one).
        // Most of a window is claimed already or below the threshold: eight pixels at a time
        // are checked for an unclaimed one above it (no branch) before any is tried.
        const CHUNK: usize = 8;
        // Each window's claims side by side on the pool's threads: a claim reads only pixels
        // claimed before this step, so it is the same in any order; windows overlap, so a
        // pixel two windows claim (for the same basin) is taken once.
        let shared: &[u32] = basin;
        let claims: Vec<Vec<(u32, u32)>> = objs
            .par_iter()
            .map(|obj| {
                let mut out = Vec::new();
                for y in obj.y0..obj.y0 + obj.h {
                    let row = y * self.w + obj.x0..y * self.w + obj.x0 + obj.w;
                    for start in row.clone().step_by(CHUNK) {
                        let end = (start + CHUNK).min(row.end);
                        let open = shared[start..end]
                            .iter()
                            .zip(&self.od[start..end])
                            .fold(false, |a, (&b, &v)| {
                                a | (b == Self::NONE && v > self.threshold)
                            });
                        if !open {
                            continue;
                        }
                        for j in start..end {
                            if let Some(l) = self.claim(shared, j) {
                                out.push((j as u32, l));
                            }
                        }
                    }
                }
                out
            })
            .collect();
        let mut ring: Vec<u32> = Vec::new();
        for (j, l) in claims.into_iter().flatten() {
            let b = &mut basin[j as usize];
            if *b == Self::NONE {
                *b = l | Self::FRESH;
                ring.push(j);
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
    pub(super) fn claim(&self, basin: &[u32], j: usize) -> Option<u32> {
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
    pub(super) fn around(&self, j: usize, mut f: impl FnMut(usize)) {
        let (x, y) = (j % self.w, j / self.w);
        for ny in y.saturating_sub(1)..(y + 2).min(self.h) {
            for nx in x.saturating_sub(1)..(x + 2).min(self.w) {
                f(ny * self.w + nx);
            }
        }
    }
}
