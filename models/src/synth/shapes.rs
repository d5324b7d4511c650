//! Cell shapes: each class is a signed distance field (pixels, negative inside) plus stain
//! densities inside it, drawn from the cues in TAXONOMY.md.

use rand::Rng;

/// What one pixel of a cell contributes, before the stain palette turns it into absorbance.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Sample {
    /// Signed distance to the cell outline in pixels (negative inside).
    pub sdf: f32,
    /// Haemoglobin thickness inside the cell (1 = normal rim).
    pub hb: f32,
    /// WBC cytoplasm density.
    pub cyto: f32,
    /// Nucleus / platelet granule density (already multiplied by its own coverage).
    pub nucleus: f32,
    /// Parasite ring density (already multiplied by its coverage).
    pub ring: f32,
    /// Parasite chromatin density (already multiplied by its coverage).
    pub chromatin: f32,
}

/// Anti-aliased coverage of a pixel from its signed distance.
#[inline]
pub(crate) fn coverage(sdf: f32) -> f32 {
    (0.5 - sdf).clamp(0.0, 1.0)
}

#[inline]
fn smooth(edge0: f32, edge1: f32, x: f32) -> f32 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Smooth union of two distance fields (k in pixels).
#[inline]
fn smin(a: f32, b: f32, k: f32) -> f32 {
    let h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0);
    b + (a - b) * h - k * h * (1.0 - h)
}

#[inline]
fn circle(x: f32, y: f32, r: f32) -> f32 {
    (x * x + y * y).sqrt() - r
}

/// Approximate distance to an axis-aligned ellipse with semi-axes a >= b.
#[inline]
fn ellipse(x: f32, y: f32, a: f32, b: f32) -> f32 {
    let k = ((x / a).powi(2) + (y / b).powi(2)).sqrt();
    (k - 1.0) * b.min(a)
}

/// Biconcave haemoglobin profile: full at the rim, a pale centre of relative radius `pallor`.
#[inline]
fn biconcave(u: f32, pallor: f32, depth: f32) -> f32 {
    1.0 - depth * (1.0 - smooth(pallor * 0.7, pallor * 1.3, u))
}

/// Per-class parameters, drawn once per cell.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    Discocyte {
        a: f32,
        b: f32,
        pallor: f32,
        depth: f32,
    },
    Spherocyte {
        r: f32,
        density: f32,
    },
    Elliptocyte {
        a: f32,
        b: f32,
        depth: f32,
    },
    Target {
        r: f32,
        spot: f32,
        ring_out: f32,
    },
    Stomatocyte {
        r: f32,
        slit_len: f32,
        slit_w: f32,
    },
    Echinocyte {
        r: f32,
        n: f32,
        amp: f32,
        phase: f32,
    },
    Acanthocyte {
        r: f32,
        spikes: Vec<(f32, f32, f32)>,
    },
    Dacrocyte {
        r: f32,
        tail_len: f32,
    },
    Schistocyte {
        r: f32,
        cuts: Vec<(f32, f32, f32)>,
    },
    Drepanocyte {
        r: f32,
        offset: f32,
        inner: f32,
        stretch: f32,
    },
    Parasitized {
        r: f32,
        pallor: f32,
        rings: Vec<(f32, f32, f32, f32, f32)>,
    },
    Wbc {
        r: f32,
        lobes: Vec<(f32, f32, f32)>,
        wobble: f32,
    },
    Platelet {
        r: f32,
        bumps: [(f32, f32); 3],
        grain: u32,
    },
}

/// A placed cell: class, position, orientation and shape.
#[derive(Debug, Clone)]
pub(crate) struct CellShape {
    pub class: usize,
    pub cx: f32,
    pub cy: f32,
    cos: f32,
    sin: f32,
    pub shape: Shape,
}

fn wrap_angle(a: f32) -> f32 {
    let tau = std::f32::consts::TAU;
    let mut a = a % tau;
    if a > std::f32::consts::PI {
        a -= tau;
    } else if a < -std::f32::consts::PI {
        a += tau;
    }
    a
}

impl Shape {
    /// Draws the parameters of `class` for an RBC radius `r` (pixels).
    pub fn sample(class: usize, r: f32, rng: &mut impl Rng) -> Shape {
        use std::f32::consts::TAU;
        match class {
            0 => {
                let a = r * rng.gen_range(1.0..1.05);
                Shape::Discocyte {
                    a,
                    b: a * rng.gen_range(0.92..1.0),
                    pallor: rng.gen_range(0.30..0.38),
                    depth: rng.gen_range(0.45..0.6),
                }
            }
            1 => Shape::Spherocyte {
                r: r * rng.gen_range(0.7..0.85),
                density: rng.gen_range(1.35..1.55),
            },
            2 => {
                let a = r * rng.gen_range(1.1..1.25);
                Shape::Elliptocyte {
                    a,
                    b: a * rng.gen_range(0.45..0.8),
                    depth: rng.gen_range(0.2..0.35),
                }
            }
            3 => Shape::Target {
                r: r * rng.gen_range(0.98..1.08),
                spot: rng.gen_range(0.16..0.24),
                ring_out: rng.gen_range(0.48..0.6),
            },
            4 => Shape::Stomatocyte {
                r: r * rng.gen_range(0.95..1.05),
                slit_len: rng.gen_range(0.45..0.6),
                slit_w: rng.gen_range(0.07..0.12),
            },
            5 => Shape::Echinocyte {
                r: r * rng.gen_range(0.85..0.95),
                n: rng.gen_range(10..=30) as f32,
                amp: rng.gen_range(0.10..0.16),
                phase: rng.gen_range(0.0..TAU),
            },
            6 => {
                let k = rng.gen_range(2..=10);
                let spikes = (0..k)
                    .map(|_| {
                        (
                            rng.gen_range(0.0..TAU),
                            rng.gen_range(0.25..0.55),
                            rng.gen_range(0.10..0.22),
                        )
                    })
                    .collect();
                Shape::Acanthocyte {
                    r: r * rng.gen_range(0.8..0.9),
                    spikes,
                }
            }
            7 => Shape::Dacrocyte {
                r: r * rng.gen_range(0.85..0.95),
                tail_len: r * rng.gen_range(0.8..1.3),
            },
            8 => {
                let first = rng.gen_range(0.0..TAU);
                let mut cuts = vec![(first, rng.gen_range(-0.05..0.3), 0.0)];
                if rng.gen_bool(0.6) {
                    cuts.push((
                        first + rng.gen_range(1.6..2.6),
                        rng.gen_range(0.0..0.4),
                        0.0,
                    ));
                }
                Shape::Schistocyte {
                    r: r * rng.gen_range(0.8..0.95),
                    cuts,
                }
            }
            9 => Shape::Drepanocyte {
                r: r * rng.gen_range(0.95..1.1),
                offset: rng.gen_range(0.35..0.5),
                inner: rng.gen_range(0.85..0.95),
                stretch: rng.gen_range(1.2..1.45),
            },
            10 => {
                let n = if rng.gen_bool(0.2) { 2 } else { 1 };
                let rings = (0..n)
                    .map(|_| {
                        let d = rng.gen_range(0.0..0.4) * r;
                        let t = rng.gen_range(0.0..TAU);
                        (
                            d * t.cos(),
                            d * t.sin(),
                            (r * rng.gen_range(0.2..0.3)).max(2.5),
                            rng.gen_range(0.0..TAU),
                            (r * 0.09).max(1.3),
                        )
                    })
                    .collect();
                Shape::Parasitized {
                    r: r * rng.gen_range(1.0..1.05),
                    pallor: rng.gen_range(0.30..0.36),
                    rings,
                }
            }
            11 => {
                let big = r * rng.gen_range(1.3..2.0);
                let lobes = if rng.gen_bool(0.65) {
                    // Segmented nucleus (neutrophil): 2-4 lobes along an arc.
                    let n = rng.gen_range(2..=4);
                    let start = rng.gen_range(0.0..TAU);
                    (0..n)
                        .map(|i| {
                            let t = start + i as f32 * rng.gen_range(0.9..1.3);
                            let d = big * rng.gen_range(0.3..0.42);
                            (d * t.cos(), d * t.sin(), big * rng.gen_range(0.24..0.32))
                        })
                        .collect()
                } else {
                    // Round nucleus (lymphocyte).
                    vec![(
                        big * rng.gen_range(-0.08..0.08),
                        big * rng.gen_range(-0.08..0.08),
                        big * rng.gen_range(0.62..0.75),
                    )]
                };
                Shape::Wbc {
                    r: big,
                    lobes,
                    wobble: rng.gen_range(0.0..TAU),
                }
            }
            _ => {
                let pr = (r * rng.gen_range(0.2..0.35)).max(2.5);
                Shape::Platelet {
                    r: pr,
                    bumps: [
                        (rng.gen_range(0.0..TAU), rng.gen_range(0.05..0.2)),
                        (rng.gen_range(0.0..TAU), rng.gen_range(0.05..0.2)),
                        (rng.gen_range(0.0..TAU), rng.gen_range(0.05..0.2)),
                    ],
                    grain: rng.gen(),
                }
            }
        }
    }

    /// Body radius used for spacing cells apart.
    pub fn body_radius(&self) -> f32 {
        match self {
            Shape::Discocyte { a, .. } | Shape::Elliptocyte { a, .. } => *a * 0.95,
            Shape::Spherocyte { r, .. }
            | Shape::Target { r, .. }
            | Shape::Stomatocyte { r, .. }
            | Shape::Schistocyte { r, .. }
            | Shape::Parasitized { r, .. }
            | Shape::Wbc { r, .. }
            | Shape::Platelet { r, .. } => *r,
            Shape::Echinocyte { r, amp, .. } => *r * (1.0 + amp * 0.5),
            Shape::Acanthocyte { r, .. } => *r * 1.1,
            Shape::Dacrocyte { r, tail_len } => *r + tail_len * 0.3,
            Shape::Drepanocyte { r, stretch, .. } => *r * stretch * 0.8,
        }
    }

    /// Half-side of a square around the centre that holds the whole cell.
    pub fn extent(&self) -> f32 {
        let e = match self {
            Shape::Discocyte { a, .. } | Shape::Elliptocyte { a, .. } => *a,
            Shape::Echinocyte { r, amp, .. } => *r * (1.0 + amp),
            Shape::Acanthocyte { r, spikes } => {
                *r * (1.0 + spikes.iter().map(|s| s.1).fold(0.0, f32::max))
            }
            Shape::Dacrocyte { r, tail_len } => r.max(r * 0.5 + tail_len + r * 0.2),
            Shape::Drepanocyte { r, stretch, .. } => *r * stretch,
            Shape::Platelet { r, .. } => *r * 1.25,
            Shape::Wbc { r, .. } => *r * 1.06,
            Shape::Spherocyte { r, .. }
            | Shape::Target { r, .. }
            | Shape::Stomatocyte { r, .. }
            | Shape::Schistocyte { r, .. }
            | Shape::Parasitized { r, .. } => *r,
        };
        e + 2.0
    }
}

impl CellShape {
    pub fn new(class: usize, cx: f32, cy: f32, angle: f32, shape: Shape) -> Self {
        CellShape {
            class,
            cx,
            cy,
            cos: angle.cos(),
            sin: angle.sin(),
            shape,
        }
    }

    /// Evaluates the cell at pixel centre (px, py).
    pub fn eval(&self, px: f32, py: f32) -> Sample {
        let dx = px - self.cx;
        let dy = py - self.cy;
        // Cell-local coordinates (rotated).
        let x = self.cos * dx + self.sin * dy;
        let y = -self.sin * dx + self.cos * dy;
        let mut s = Sample::default();
        match &self.shape {
            Shape::Discocyte {
                a,
                b,
                pallor,
                depth,
            } => {
                s.sdf = ellipse(x, y, *a, *b);
                let u = ((x / a).powi(2) + (y / b).powi(2)).sqrt();
                s.hb = biconcave(u, *pallor, *depth) + 0.08 * (-((u - 0.78) / 0.12).powi(2)).exp();
            }
            Shape::Spherocyte { r, density } => {
                s.sdf = circle(x, y, *r);
                let u = (x * x + y * y).sqrt() / r;
                s.hb = density * (1.0 - 0.12 * u * u);
            }
            Shape::Elliptocyte { a, b, depth } => {
                s.sdf = ellipse(x, y, *a, *b);
                let u = ((x / a).powi(2) + (y / b).powi(2)).sqrt();
                s.hb = biconcave(u, 0.35, *depth);
            }
            Shape::Target { r, spot, ring_out } => {
                s.sdf = circle(x, y, *r);
                let u = (x * x + y * y).sqrt() / r;
                let pale = smooth(spot - 0.05, spot + 0.05, u)
                    * (1.0 - smooth(ring_out - 0.06, ring_out + 0.06, u));
                s.hb = 1.05 - 0.62 * pale;
            }
            Shape::Stomatocyte {
                r,
                slit_len,
                slit_w,
            } => {
                s.sdf = circle(x, y, *r);
                let sx = 1.0 - smooth(slit_len * 0.7, *slit_len, x.abs() / r);
                let sy = 1.0 - smooth(slit_w * 0.5, *slit_w * 1.3, y.abs() / r);
                s.hb = 1.05 - 0.65 * sx * sy;
            }
            Shape::Echinocyte { r, n, amp, phase } => {
                let t = y.atan2(x);
                let c = (n * t + phase).cos().max(0.0).powi(6);
                let rad = r * (1.0 + amp * c);
                s.sdf = (x * x + y * y).sqrt() - rad;
                let u = (x * x + y * y).sqrt() / r;
                s.hb = biconcave(u, 0.28, 0.3);
            }
            Shape::Acanthocyte { r, spikes } => {
                let t = y.atan2(x);
                let mut k = 1.0;
                for (theta, len, width) in spikes {
                    let d = wrap_angle(t - theta) / width;
                    k += len * (-d * d).exp();
                }
                s.sdf = ((x * x + y * y).sqrt() - r * k) / (1.0 + 0.5 * (k - 1.0));
                s.hb = 1.3;
            }
            Shape::Dacrocyte { r, tail_len } => {
                let body = circle(x, y, *r);
                // Tapered tail along +x, from inside the body to its tip.
                let x0 = r * 0.5;
                let len = r * 0.5 + tail_len;
                let t = ((x - x0) / len).clamp(0.0, 1.0);
                let rad = r * 0.55 * (1.0 - t) + r * 0.06 * t;
                let tail = ((x - (x0 + t * len)).powi(2) + y * y).sqrt() - rad;
                s.sdf = smin(body, tail, r * 0.25);
                let u = (x * x + y * y).sqrt() / r;
                s.hb = biconcave(u, 0.3, 0.35);
            }
            Shape::Schistocyte { r, cuts } => {
                let mut d = circle(x, y, *r);
                for (angle, offset, _) in cuts {
                    let (sn, cs) = angle.sin_cos();
                    d = d.max(x * cs + y * sn - offset * r);
                }
                s.sdf = d;
                s.hb = 1.2;
            }
            Shape::Drepanocyte {
                r,
                offset,
                inner,
                stretch,
            } => {
                // Crescent: a disc minus an offset disc, stretched along its chord.
                let ys = y / stretch;
                let outer = circle(x, ys, *r);
                let bite = circle(x - offset * r, ys, r * inner);
                s.sdf = outer.max(-bite) * stretch.min(1.0 / stretch).max(0.7);
                s.hb = 1.25;
            }
            Shape::Parasitized { r, pallor, rings } => {
                s.sdf = circle(x, y, *r);
                let u = (x * x + y * y).sqrt() / r;
                s.hb = biconcave(u, *pallor, 0.5);
                for &(rx, ry, rr, dot_angle, dot_r) in rings {
                    let d = ((x - rx).powi(2) + (y - ry).powi(2)).sqrt();
                    let band = (d - rr).abs() - (r * 0.045).max(0.7);
                    s.ring += 0.9 * coverage(band);
                    let (sn, cs) = dot_angle.sin_cos();
                    let dot = circle(x - rx - rr * cs, y - ry - rr * sn, dot_r);
                    s.chromatin += coverage(dot);
                }
            }
            Shape::Wbc { r, lobes, wobble } => {
                let t = y.atan2(x);
                let rad = r * (1.0 + 0.03 * (3.0 * t + wobble).sin());
                s.sdf = (x * x + y * y).sqrt() - rad;
                s.cyto = 1.0;
                let mut nd = f32::INFINITY;
                for &(lx, ly, lr) in lobes {
                    nd = smin(nd.min(1e6), circle(x - lx, y - ly, lr), lr * 0.35);
                }
                s.nucleus = 1.6 * coverage(nd);
            }
            Shape::Platelet { r, bumps, grain } => {
                let t = y.atan2(x);
                let mut k = 1.0;
                for (i, (phase, amp)) in bumps.iter().enumerate() {
                    k += amp * ((i as f32 + 2.0) * t + phase).sin();
                }
                s.sdf = (x * x + y * y).sqrt() - r * k;
                // Granules: a hash of the integer pixel offset.
                let h = hash(
                    grain
                        ^ ((x.round() as i32 as u32).wrapping_mul(73_856_093))
                        ^ ((y.round() as i32 as u32).wrapping_mul(19_349_663)),
                );
                let g = 0.55 + 0.9 * (h as f32 / u32::MAX as f32);
                s.nucleus = 1.1 * g * coverage(s.sdf);
            }
        }
        s
    }
}

#[inline]
fn hash(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}
