//! RedDino's augmentation pipeline as batched tensor operations on the training device:
//! RandomResizedCrop, 4 of 33 pixel-level transforms chosen uniformly per image (DESIGN.md's
//! list, albumentations' parameters), horizontal/vertical flips and rot90 each with p = 0.85,
//! then ImageNet normalisation.
//!
//! Images are `[B, 3, H, W]` float in [0, 1]. Random parameters come from a seeded ChaCha
//! generator and per-pixel noise from libtorch's generator (seeded per step by the trainer), so a
//! step's augmentations are reproducible. Each transform is applied, in the order of [`Op::ALL`],
//! to the images that drew it. Where albumentations works on OpenCV-specific structures (HLS,
//! polygon rasterisation, per-pixel swaps), the tensor version keeps the effect and parameters
//! and says how it differs in its doc line.

use std::f64::consts::PI;

use rand::seq::index::sample;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use reddino_models::arch::{IMAGENET_MEAN, IMAGENET_STD};
use tch::{Device, Kind, Tensor};

/// The 33 pixel-level transforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Box blur, kernel 3-7.
    Blur,
    /// CLAHE on the HSV value (clip 1-4, 8x8 tiles); albumentations uses LAB lightness.
    Clahe,
    ChannelShuffle,
    /// One channel set to 0.
    ChannelDropout,
    /// Brightness, contrast, saturation, hue 0.2 (in that order).
    ColorJitter,
    /// Disc blur, radius 3-10.
    Defocus,
    /// Nearest down to 1/4 and back up.
    Downscale,
    /// Emboss, alpha 0.2-0.5, strength 0.2-0.7.
    Emboss,
    /// Per-channel histogram equalisation.
    Equalize,
    /// PCA colour shift, alpha ~ N(0, 0.1).
    FancyPca,
    /// Additive Gaussian noise, variance 10-50 (8-bit units).
    GaussNoise,
    /// Gaussian blur, kernel 3-7 (sigma as OpenCV derives it).
    GaussianBlur,
    /// Gaussian blur (sigma 0.7), two rounds of random local displacement (max 4 px), blur.
    GlassBlur,
    /// Hue +-20 (OpenCV's 180-step hue), saturation +-30, value +-20 (8-bit units).
    HueSaturationValue,
    /// Sensor noise: hue jitter (std 0.01-0.05 of the circle) and shot-like luminance noise
    /// (intensity 0.1-0.5).
    IsoNoise,
    /// JPEG at quality 99-100 (on the CPU: the codec is not a tensor operation).
    ImageCompression,
    InvertImg,
    /// Median, kernel 3-7.
    MedianBlur,
    /// Line kernel of length 3-7 at a random angle.
    MotionBlur,
    /// Per-pixel multiplier 0.9-1.1.
    MultiplicativeNoise,
    /// Keep 4 bits per channel.
    Posterize,
    /// `x * (1 + c) + b`, c and b in +-0.2.
    RandomBrightnessContrast,
    /// Per-channel shift +-20 (8-bit units).
    RgbShift,
    /// `x^(g/100)`, g in 80-120.
    RandomGamma,
    /// Slanted streaks of length 20 in (200,200,200), box blur 7, brightness x0.7.
    RandomRain,
    /// A random triangle in the lower half darkened to x0.5.
    RandomShadow,
    /// Pixels whose lightness is below the snow point brightened x2.5.
    RandomSnow,
    /// A bright glow from a point in the upper half plus 6-10 faint circles.
    RandomSunFlare,
    /// Bezier tone curve, control points N(0.25, 0.1) and N(0.75, 0.1).
    RandomToneCurve,
    /// Smooth random haze (coefficient 0.3-1) blended towards white.
    RandomFog,
    /// Circular sinc (jinc) filter, kernel 7-15, cutoff pi/4-pi/2.
    RingingOvershoot,
    /// Sharpen, alpha 0.2-0.5, lightness 0.5-1.
    Sharpen,
    /// Values >= 128 inverted.
    Solarize,
}

impl Op {
    /// All transforms, in application order.
    pub const ALL: [Op; 33] = [
        Op::Blur,
        Op::Clahe,
        Op::ChannelShuffle,
        Op::ChannelDropout,
        Op::ColorJitter,
        Op::Defocus,
        Op::Downscale,
        Op::Emboss,
        Op::Equalize,
        Op::FancyPca,
        Op::GaussNoise,
        Op::GaussianBlur,
        Op::GlassBlur,
        Op::HueSaturationValue,
        Op::IsoNoise,
        Op::ImageCompression,
        Op::InvertImg,
        Op::MedianBlur,
        Op::MotionBlur,
        Op::MultiplicativeNoise,
        Op::Posterize,
        Op::RandomBrightnessContrast,
        Op::RgbShift,
        Op::RandomGamma,
        Op::RandomRain,
        Op::RandomShadow,
        Op::RandomSnow,
        Op::RandomSunFlare,
        Op::RandomToneCurve,
        Op::RandomFog,
        Op::RingingOvershoot,
        Op::Sharpen,
        Op::Solarize,
    ];

    /// Applies the transform to every image of `x` ([n, 3, H, W], values in [0, 1]).
    pub fn apply(self, x: &Tensor, rng: &mut ChaCha8Rng) -> Tensor {
        let n = x.size()[0] as usize;
        let dev = x.device();
        let out = match self {
            Op::Blur => {
                let ks: Vec<usize> = (0..n).map(|_| odd(rng, 3, 7)).collect();
                let kernels = ks.iter().map(|&k| box_kernel(k)).collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::Clahe => {
                let clip = uniform(rng, n, 1.0, 4.0, dev);
                clahe(x, &clip)
            }
            Op::ChannelShuffle => {
                let mut idx = Vec::with_capacity(n * 3);
                for _ in 0..n {
                    let mut p = [0i64, 1, 2];
                    rand::seq::SliceRandom::shuffle(&mut p[..], rng);
                    idx.extend_from_slice(&p);
                }
                let idx = Tensor::from_slice(&idx)
                    .view([n as i64, 3, 1, 1])
                    .to_device(dev);
                x.gather(1, &idx.expand_as(x), false)
            }
            Op::ChannelDropout => {
                let c: Vec<i64> = (0..n).map(|_| rng.gen_range(0..3)).collect();
                let keep = 1.0
                    - Tensor::from_slice(&c)
                        .to_device(dev)
                        .one_hot(3)
                        .to_kind(Kind::Float)
                        .view([n as i64, 3, 1, 1]);
                x * keep
            }
            Op::ColorJitter => {
                let b = uniform(rng, n, 0.8, 1.2, dev);
                let c = uniform(rng, n, 0.8, 1.2, dev);
                let s = uniform(rng, n, 0.8, 1.2, dev);
                let h = uniform(rng, n, -0.2, 0.2, dev);
                let x = (x * b).clamp(0.0, 1.0);
                let m = gray(&x).mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float);
                let x = ((&x - &m) * c + &m).clamp(0.0, 1.0);
                let g = gray(&x);
                let x = ((&x - &g) * s + &g).clamp(0.0, 1.0);
                let (hh, ss, vv) = rgb_to_hsv(&x);
                hsv_to_rgb(&(hh + h).remainder(1.0), &ss, &vv)
            }
            Op::Defocus => {
                let kernels = (0..n)
                    .map(|_| disc_kernel(rng.gen_range(3..=10)))
                    .collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::Downscale => {
                let s = x.size();
                let (h, w) = (s[2], s[3]);
                let small = x.upsample_nearest2d([(h / 4).max(1), (w / 4).max(1)], None, None);
                small.upsample_nearest2d([h, w], None, None)
            }
            Op::Emboss => {
                let kernels = (0..n)
                    .map(|_| {
                        let a = rng.gen_range(0.2..0.5);
                        let s = rng.gen_range(0.2..0.7);
                        let e = [-1.0 - s, -s, 0.0, -s, 1.0, s, 0.0, s, 1.0 + s];
                        blend_identity(&e, a)
                    })
                    .collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::Equalize => equalize(x),
            Op::FancyPca => {
                let alpha = normal(rng, n * 3, 0.1);
                fancy_pca(
                    x,
                    &Tensor::from_slice(&alpha)
                        .view([n as i64, 3])
                        .to_device(dev),
                )
            }
            Op::GaussNoise => {
                let std: Vec<f32> = (0..n)
                    .map(|_| (rng.gen_range(10.0f32..50.0)).sqrt() / 255.0)
                    .collect();
                let std = Tensor::from_slice(&std)
                    .view([n as i64, 1, 1, 1])
                    .to_device(dev);
                x + x.randn_like() * std
            }
            Op::GaussianBlur => {
                let kernels = (0..n)
                    .map(|_| {
                        let k = odd(rng, 3, 7);
                        gaussian_kernel(k, 0.3 * ((k as f64 - 1.0) * 0.5 - 1.0) + 0.8)
                    })
                    .collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::GlassBlur => {
                let k = vec![gaussian_kernel(5, 0.7); n];
                let mut y = depthwise(x, &k);
                for _ in 0..2 {
                    y = displace(&y, 4);
                }
                depthwise(&y, &k)
            }
            Op::HueSaturationValue => {
                let h = uniform(rng, n, -20.0 / 180.0, 20.0 / 180.0, dev);
                let s = uniform(rng, n, -30.0 / 255.0, 30.0 / 255.0, dev);
                let v = uniform(rng, n, -20.0 / 255.0, 20.0 / 255.0, dev);
                let (hh, ss, vv) = rgb_to_hsv(x);
                hsv_to_rgb(
                    &(hh + h).remainder(1.0),
                    &(ss + s).clamp(0.0, 1.0),
                    &(vv + v).clamp(0.0, 1.0),
                )
            }
            Op::IsoNoise => {
                let shift = uniform(rng, n, 0.01, 0.05, dev);
                let intensity = uniform(rng, n, 0.1, 0.5, dev);
                let (hh, ss, vv) = rgb_to_hsv(x);
                let hh = (&hh + hh.randn_like() * shift).remainder(1.0);
                let vv = (&vv + vv.randn_like() * intensity * 0.1 * vv.sqrt()).clamp(0.0, 1.0);
                hsv_to_rgb(&hh, &ss, &vv)
            }
            Op::ImageCompression => {
                let q: Vec<u8> = (0..n).map(|_| rng.gen_range(99..=100)).collect();
                jpeg_roundtrip(x, &q)
            }
            Op::InvertImg => 1.0 - x,
            Op::MedianBlur => {
                let mut out = x.shallow_clone();
                let ks: Vec<usize> = (0..n).map(|_| odd(rng, 3, 7)).collect();
                for k in [3usize, 5, 7] {
                    let idx: Vec<i64> = (0..n).filter(|&i| ks[i] == k).map(|i| i as i64).collect();
                    if idx.is_empty() {
                        continue;
                    }
                    let idx = Tensor::from_slice(&idx).to_device(dev);
                    let sub = median(&x.index_select(0, &idx), k as i64);
                    out = out.index_copy(0, &idx, &sub);
                }
                out
            }
            Op::MotionBlur => {
                let kernels = (0..n)
                    .map(|_| {
                        let k = odd(rng, 3, 7);
                        line_kernel(k, rng.gen_range(0.0..PI))
                    })
                    .collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::MultiplicativeNoise => {
                let s = x.size();
                let m = Tensor::empty([s[0], 1, s[2], s[3]], (Kind::Float, dev)).uniform_(0.9, 1.1);
                x * m
            }
            Op::Posterize => {
                (x * 255.0 + 0.5)
                    .floor()
                    .clamp(0.0, 255.0)
                    .divide_scalar(16.0)
                    .floor()
                    * (16.0 / 255.0)
            }
            Op::RandomBrightnessContrast => {
                let a = uniform(rng, n, 0.8, 1.2, dev);
                let b = uniform(rng, n, -0.2, 0.2, dev);
                x * a + b
            }
            Op::RgbShift => {
                let v: Vec<f32> = (0..n * 3)
                    .map(|_| rng.gen_range(-20.0f32..20.0) / 255.0)
                    .collect();
                x + Tensor::from_slice(&v)
                    .view([n as i64, 3, 1, 1])
                    .to_device(dev)
            }
            Op::RandomGamma => {
                let g = uniform(rng, n, 0.8, 1.2, dev);
                x.clamp_min(0.0).pow(&g)
            }
            Op::RandomRain => rain(x, rng),
            Op::RandomShadow => shadow(x, rng),
            Op::RandomSnow => {
                let p = uniform(rng, n, 0.1, 0.3, dev);
                let thr = p * 0.5 + 1.0 / 3.0;
                let l = lightness(x);
                let below = l.lt_tensor(&thr).to_kind(Kind::Float);
                x * (1.0 + 1.5 * below)
            }
            Op::RandomSunFlare => sun_flare(x, rng),
            Op::RandomToneCurve => {
                let low: Vec<f32> = normal(rng, n, 0.1)
                    .iter()
                    .map(|v| (0.25 + v).clamp(0.0, 1.0))
                    .collect();
                let high: Vec<f32> = normal(rng, n, 0.1)
                    .iter()
                    .map(|v| (0.75 + v).clamp(0.0, 1.0))
                    .collect();
                let low = Tensor::from_slice(&low)
                    .view([n as i64, 1, 1, 1])
                    .to_device(dev);
                let high = Tensor::from_slice(&high)
                    .view([n as i64, 1, 1, 1])
                    .to_device(dev);
                let t = x.clamp(0.0, 1.0);
                let u = 1.0 - &t;
                &u * &u * &t * low * 3.0 + &u * &t * &t * high * 3.0 + &t * &t * &t
            }
            Op::RandomFog => {
                let coef = uniform(rng, n, 0.3, 1.0, dev);
                let s = x.size();
                let haze = Tensor::empty([s[0], 1, 7, 7], (Kind::Float, dev))
                    .uniform_(0.0, 1.0)
                    .upsample_bicubic2d([s[2], s[3]], false, None, None)
                    .clamp(0.0, 1.0);
                let a = haze * coef * 0.6;
                x * (1.0 - &a) + a
            }
            Op::RingingOvershoot => {
                let kernels = (0..n)
                    .map(|_| {
                        let k = odd(rng, 7, 15);
                        let cutoff = rng.gen_range(PI / 4.0..PI / 2.0);
                        jinc_kernel(k, cutoff)
                    })
                    .collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::Sharpen => {
                let kernels = (0..n)
                    .map(|_| {
                        let a = rng.gen_range(0.2..0.5);
                        let l = rng.gen_range(0.5..1.0);
                        let e = [-1.0, -1.0, -1.0, -1.0, 8.0 + l, -1.0, -1.0, -1.0, -1.0];
                        blend_identity(&e, a)
                    })
                    .collect::<Vec<_>>();
                depthwise(x, &kernels)
            }
            Op::Solarize => {
                let hi = x.ge(0.5);
                (-x + 1.0).where_self(&hi, x)
            }
        };
        out.clamp(0.0, 1.0)
    }
}

// ---------------------------------------------------------------- random parameters

fn odd(rng: &mut ChaCha8Rng, lo: usize, hi: usize) -> usize {
    lo + 2 * rng.gen_range(0..=(hi - lo) / 2)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32, dev: Device) -> Tensor {
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_slice(&v)
        .view([n as i64, 1, 1, 1])
        .to_device(dev)
}

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| std * rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

// ---------------------------------------------------------------- kernels

/// A square kernel, row-major.
#[derive(Debug, Clone)]
struct Kernel {
    size: usize,
    w: Vec<f32>,
}

fn normalised(size: usize, w: Vec<f64>) -> Kernel {
    let s: f64 = w.iter().sum();
    Kernel {
        size,
        w: w.iter().map(|v| (v / s) as f32).collect(),
    }
}

fn box_kernel(k: usize) -> Kernel {
    normalised(k, vec![1.0; k * k])
}

fn gaussian_kernel(k: usize, sigma: f64) -> Kernel {
    let r = (k / 2) as f64;
    let w = (0..k * k)
        .map(|i| {
            let (y, x) = ((i / k) as f64 - r, (i % k) as f64 - r);
            (-(x * x + y * y) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    normalised(k, w)
}

fn disc_kernel(radius: usize) -> Kernel {
    let k = 2 * radius + 1;
    let r = radius as f64;
    let w = (0..k * k)
        .map(|i| {
            let (y, x) = ((i / k) as f64 - r, (i % k) as f64 - r);
            if x * x + y * y <= r * r {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    normalised(k, w)
}

fn line_kernel(k: usize, angle: f64) -> Kernel {
    let mut w = vec![0.0; k * k];
    let c = (k / 2) as f64;
    let steps = 4 * k;
    for s in 0..=steps {
        let t = -c + 2.0 * c * s as f64 / steps as f64;
        let x = (c + t * angle.cos()).round() as usize;
        let y = (c + t * angle.sin()).round() as usize;
        w[y.min(k - 1) * k + x.min(k - 1)] = 1.0;
    }
    normalised(k, w)
}

/// Bessel J1 (Numerical Recipes' rational approximation, |error| < 1e-7).
fn bessel_j1(x: f64) -> f64 {
    let ax = x.abs();
    if ax < 8.0 {
        let y = x * x;
        let a = x
            * (72362614232.0
                + y * (-7895059235.0
                    + y * (242396853.1
                        + y * (-2972611.439 + y * (15704.48260 + y * (-30.16036606))))));
        let b = 144725228442.0
            + y * (2300535178.0 + y * (18583304.74 + y * (99447.43394 + y * (376.9991397 + y))));
        a / b
    } else {
        let z = 8.0 / ax;
        let y = z * z;
        let xx = ax - 2.356194491;
        let a = 1.0
            + y * (0.183105e-2
                + y * (-0.3516396496e-4 + y * (0.2457520174e-5 + y * (-0.240337019e-6))));
        let b = 0.04687499995
            + y * (-0.2002690873e-3
                + y * (0.8449199096e-5 + y * (-0.88228987e-6 + y * 0.105787412e-6)));
        let ans = (std::f64::consts::FRAC_2_PI / ax).sqrt() * (xx.cos() * a - z * xx.sin() * b);
        if x < 0.0 {
            -ans
        } else {
            ans
        }
    }
}

/// albumentations' RingingOvershoot kernel: `cutoff * J1(cutoff r) / (2 pi r)`, centre
/// `cutoff^2 / (4 pi)`, normalised.
fn jinc_kernel(k: usize, cutoff: f64) -> Kernel {
    let c = (k / 2) as f64;
    let w = (0..k * k)
        .map(|i| {
            let (y, x) = ((i / k) as f64 - c, (i % k) as f64 - c);
            let r = (x * x + y * y).sqrt();
            if r == 0.0 {
                cutoff * cutoff / (4.0 * PI)
            } else {
                cutoff * bessel_j1(cutoff * r) / (2.0 * PI * r)
            }
        })
        .collect();
    normalised(k, w)
}

/// `(1 - a) * identity + a * effect` for a 3x3 effect kernel (not normalised, as albumentations).
fn blend_identity(effect: &[f64; 9], a: f64) -> Kernel {
    let w = (0..9)
        .map(|i| (1.0 - a) * if i == 4 { 1.0 } else { 0.0 } + a * effect[i])
        .map(|v| v as f32)
        .collect();
    Kernel { size: 3, w }
}

/// Per-image kernels applied to every channel, reflect padding. Kernels of different sizes are
/// zero-padded to the largest, so the whole subset is one grouped convolution.
fn depthwise(x: &Tensor, kernels: &[Kernel]) -> Tensor {
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let k = kernels.iter().map(|k| k.size).max().unwrap_or(1);
    let mut weights = vec![0f32; kernels.len() * k * k];
    for (i, ker) in kernels.iter().enumerate() {
        let off = (k - ker.size) / 2;
        for y in 0..ker.size {
            for xx in 0..ker.size {
                weights[i * k * k + (y + off) * k + xx + off] = ker.w[y * ker.size + xx];
            }
        }
    }
    let kk = k as i64;
    let wt = Tensor::from_slice(&weights)
        .view([n, 1, 1, kk, kk])
        .expand([n, c, 1, kk, kk], false)
        .reshape([n * c, 1, kk, kk])
        .to_device(x.device());
    let p = kk / 2;
    let padded = x
        .reshape([1, n * c, h, w])
        .pad([p, p, p, p], "reflect", None);
    padded
        .conv2d::<Tensor>(&wt, None, [1, 1], [0, 0], [1, 1], n * c)
        .reshape([n, c, h, w])
}

// ---------------------------------------------------------------- colour helpers

fn gray(x: &Tensor) -> Tensor {
    let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114])
        .view([1, 3, 1, 1])
        .to_device(x.device());
    (x * w).sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
}

fn lightness(x: &Tensor) -> Tensor {
    let mx = x.amax([1i64].as_slice(), true);
    let mn = x.amin([1i64].as_slice(), true);
    (mx + mn) * 0.5
}

/// RGB -> (h, s, v), each [n, 1, H, W], h in [0, 1).
pub fn rgb_to_hsv(x: &Tensor) -> (Tensor, Tensor, Tensor) {
    let r = x.narrow(1, 0, 1);
    let g = x.narrow(1, 1, 1);
    let b = x.narrow(1, 2, 1);
    let v = x.amax([1i64].as_slice(), true);
    let mn = x.amin([1i64].as_slice(), true);
    let d = &v - mn;
    let s = (&d / v.clamp_min(1e-8)).where_self(&v.gt(0.0), &v.zeros_like());
    let dd = d.clamp_min(1e-8);
    let hr = ((&g - &b) / &dd).remainder(6.0);
    let hg = (&b - &r) / &dd + 2.0;
    let hb = (&r - &g) / &dd + 4.0;
    let h = hr.where_self(&v.eq_tensor(&r), &hg.where_self(&v.eq_tensor(&g), &hb));
    let h = (h / 6.0)
        .where_self(&d.gt(0.0), &d.zeros_like())
        .remainder(1.0);
    (h, s, v)
}

/// (h, s, v) -> RGB.
pub fn hsv_to_rgb(h: &Tensor, s: &Tensor, v: &Tensor) -> Tensor {
    let f = |n: f64| {
        let k = (h * 6.0 + n).remainder(6.0);
        let m = k.minimum(&(4.0 - &k)).clamp(0.0, 1.0);
        v - v * s * m
    };
    Tensor::cat(&[f(5.0), f(3.0), f(1.0)], 1)
}

// ---------------------------------------------------------------- histogram transforms

fn to_bins(x: &Tensor) -> Tensor {
    (x.clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Int64)
}

/// Per-(image, channel) histogram equalisation (OpenCV's equalizeHist).
fn equalize(x: &Tensor) -> Tensor {
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let bins = to_bins(x).view([n * c, h * w]);
    let hist = Tensor::zeros([n * c, 256], (Kind::Float, x.device())).scatter_add(
        1,
        &bins,
        &Tensor::ones([n * c, h * w], (Kind::Float, x.device())),
    );
    let cdf = hist.cumsum(1, Kind::Float);
    // cdf_min: the cdf at the first non-empty bin.
    let first = hist.gt(0.0).to_kind(Kind::Int64).argmax(1, true);
    let cdf_min = cdf.gather(1, &first, false);
    let total = (h * w) as f64;
    let lut = ((&cdf - &cdf_min) * 255.0 / (-&cdf_min + total).clamp_min(1.0))
        .round()
        .clamp(0.0, 255.0);
    lut.gather(1, &bins, false).view([n, c, h, w]) / 255.0
}

/// CLAHE on the HSV value channel; RGB scaled by v'/v (hue and saturation unchanged).
fn clahe(x: &Tensor, clip: &Tensor) -> Tensor {
    const G: i64 = 8;
    let s = x.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    if h % G != 0 || w % G != 0 {
        return equalize(x);
    }
    let dev = x.device();
    let (th, tw) = (h / G, w / G);
    let v = x.amax([1i64].as_slice(), true); // [n,1,h,w]
    let bins = to_bins(&v).view([n, h, w]);
    // tile index of each pixel
    let ty = Tensor::arange(h, (Kind::Int64, dev)).divide_scalar_mode(th, "floor");
    let tx = Tensor::arange(w, (Kind::Int64, dev)).divide_scalar_mode(tw, "floor");
    let tile = (ty.view([1, h, 1]) * G + tx.view([1, 1, w])).expand([n, h, w], false);
    let img = Tensor::arange(n, (Kind::Int64, dev)).view([n, 1, 1]);
    let flat = ((&img * (G * G) + &tile) * 256 + &bins).view([-1]);
    let hist = Tensor::zeros([n * G * G * 256], (Kind::Float, dev))
        .index_add(0, &flat, &Tensor::ones([n * h * w], (Kind::Float, dev)))
        .view([n, G * G, 256]);
    let tile_px = (th * tw) as f64;
    let limit = (clip.view([n, 1, 1]) * tile_px / 256.0).clamp_min(1.0);
    let clipped = hist.minimum(&limit);
    let excess = (&hist - &clipped).sum_dim_intlist([2i64].as_slice(), true, Kind::Float);
    let redistributed = clipped + excess / 256.0;
    let lut = (redistributed.cumsum(2, Kind::Float) * (255.0 / tile_px))
        .clamp(0.0, 255.0)
        .view([-1]); // [n*64*256]
                     // Bilinear interpolation between the four nearest tile centres.
    let coord = |len: i64, t: i64| {
        let f = (Tensor::arange(len, (Kind::Float, dev)) + 0.5) / t as f64 - 0.5;
        let i0 = f.floor().clamp(0.0, (G - 1) as f64);
        let i1 = (&i0 + 1.0).clamp(0.0, (G - 1) as f64);
        let wgt = (&f - &i0).clamp(0.0, 1.0);
        (i0.to_kind(Kind::Int64), i1.to_kind(Kind::Int64), wgt)
    };
    let (y0, y1, wy) = coord(h, th);
    let (x0, x1, wx) = coord(w, tw);
    let look = |yi: &Tensor, xi: &Tensor| {
        let t = yi.view([1, h, 1]) * G + xi.view([1, 1, w]);
        let idx = ((&img * (G * G) + t) * 256 + &bins).view([-1]);
        lut.index_select(0, &idx).view([n, h, w])
    };
    let wy = wy.view([1, h, 1]);
    let wx = wx.view([1, 1, w]);
    let one_wx: Tensor = -&wx + 1.0;
    let one_wy: Tensor = -&wy + 1.0;
    let top: Tensor = look(&y0, &x0) * &one_wx + look(&y0, &x1) * &wx;
    let bottom: Tensor = look(&y1, &x0) * &one_wx + look(&y1, &x1) * &wx;
    let v_new: Tensor = ((top * one_wy + bottom * &wy) / 255.0).unsqueeze(1);
    let ratio = (&v_new / v.clamp_min(1e-6)).where_self(&v.gt(1e-6), &v_new.zeros_like());
    (x * ratio).where_self(&v.gt(1e-6), &v_new.expand_as(x))
}

fn fancy_pca(x: &Tensor, alpha: &Tensor) -> Tensor {
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let px = x.view([n, c, h * w]).transpose(1, 2).to_kind(Kind::Double); // [n, hw, 3]
    let centred = &px - px.mean_dim([1i64].as_slice(), true, Kind::Double);
    let cov = centred.transpose(1, 2).matmul(&centred) / ((h * w - 1) as f64);
    let (vals, vecs) = cov.linalg_eigh("L");
    let delta = vecs.matmul(&(alpha.to_kind(Kind::Double) * vals).unsqueeze(-1)); // [n,3,1]
    x + delta.to_kind(Kind::Float).view([n, c, 1, 1])
}

fn median(x: &Tensor, k: i64) -> Tensor {
    let s = x.size();
    let p = k / 2;
    let padded = x.pad([p, p, p, p], "reflect", None);
    padded
        .unfold(2, k, 1)
        .unfold(3, k, 1)
        .reshape([s[0], s[1], s[2], s[3], k * k])
        .median_dim(-1, false)
        .0
}

/// Every pixel takes the value of a random pixel at most `max_delta` away (clamped to the image).
fn displace(x: &Tensor, max_delta: i64) -> Tensor {
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let dev = x.device();
    let dy = Tensor::randint_low(-max_delta, max_delta + 1, [n, 1, h, w], (Kind::Int64, dev));
    let dx = Tensor::randint_low(-max_delta, max_delta + 1, [n, 1, h, w], (Kind::Int64, dev));
    let yy = (Tensor::arange(h, (Kind::Int64, dev)).view([1, 1, h, 1]) + dy).clamp(0, h - 1);
    let xx = (Tensor::arange(w, (Kind::Int64, dev)).view([1, 1, 1, w]) + dx).clamp(0, w - 1);
    let idx = (yy * w + xx)
        .view([n, 1, h * w])
        .expand([n, c, h * w], false);
    x.view([n, c, h * w])
        .gather(2, &idx, false)
        .view([n, c, h, w])
}

fn coords(h: i64, w: i64, dev: Device) -> (Tensor, Tensor) {
    let yy = Tensor::arange(h, (Kind::Float, dev)).view([1, 1, h, 1]) / h as f64;
    let xx = Tensor::arange(w, (Kind::Float, dev)).view([1, 1, 1, w]) / w as f64;
    (yy, xx)
}

fn rain(x: &Tensor, rng: &mut ChaCha8Rng) -> Tensor {
    let s = x.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    let dev = x.device();
    let kernels: Vec<Kernel> = (0..n)
        .map(|_| {
            let slant = rng.gen_range(-10.0f64..10.0);
            let angle = PI / 2.0 + (slant / 20.0).atan();
            let mut k = line_kernel(21, angle);
            k.w.iter_mut()
                .for_each(|v| *v = if *v > 0.0 { 1.0 } else { 0.0 });
            k
        })
        .collect();
    // One drop per 600 pixels, as albumentations' default rain.
    let drops = (h * w / 600).max(1);
    let at = Tensor::randint_low(0, h * w, [n, drops], (Kind::Int64, dev));
    let seeds = Tensor::zeros([n, h * w], (Kind::Float, dev))
        .scatter_value(1, &at, 1.0)
        .view([n, 1, h, w]);
    let streaks = depthwise(&seeds, &kernels).gt(0.0);
    let drop = Tensor::from_slice(&[200.0f32 / 255.0])
        .to_device(dev)
        .view([1, 1, 1, 1]);
    let y = drop.expand_as(x).where_self(&streaks.expand_as(x), x);
    let y = depthwise(&y, &vec![box_kernel(7); n as usize]);
    y * 0.7
}

fn shadow(x: &Tensor, rng: &mut ChaCha8Rng) -> Tensor {
    let s = x.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    let dev = x.device();
    let (yy, xx) = coords(h, w, dev);
    let mut masks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let p: Vec<(f64, f64)> = (0..3)
            .map(|_| (rng.gen_range(0.0..1.0), rng.gen_range(0.5..1.0)))
            .collect();
        // inside = all three edge functions share a sign
        let edge =
            |a: (f64, f64), b: (f64, f64)| (&xx - a.0) * (b.1 - a.1) - (&yy - a.1) * (b.0 - a.0);
        let e0 = edge(p[0], p[1]);
        let e1 = edge(p[1], p[2]);
        let e2 = edge(p[2], p[0]);
        let pos = e0.ge(0.0).logical_and(&e1.ge(0.0)).logical_and(&e2.ge(0.0));
        let neg = e0.le(0.0).logical_and(&e1.le(0.0)).logical_and(&e2.le(0.0));
        masks.push(pos.logical_or(&neg));
    }
    let inside = Tensor::cat(&masks, 0).to_kind(Kind::Float); // [n,1,h,w]
    x * (1.0 - inside * 0.5)
}

fn sun_flare(x: &Tensor, rng: &mut ChaCha8Rng) -> Tensor {
    let s = x.size();
    let (n, h, w) = (s[0], s[2], s[3]);
    let dev = x.device();
    let (yy, xx) = coords(h, w, dev);
    let mut glows = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (cx, cy) = (rng.gen_range(0.0..1.0), rng.gen_range(0.0..0.5));
        let d2 = (&xx - cx).square() + (&yy - cy).square();
        let mut g = (-d2 / (2.0 * 0.25f64.powi(2))).exp() * 0.8;
        let angle = rng.gen_range(0.0..2.0 * PI);
        for _ in 0..rng.gen_range(6..=10) {
            let t = rng.gen_range(0.1..0.9);
            let (px, py) = (cx + t * angle.cos(), cy + t * angle.sin());
            let r = rng.gen_range(0.05..0.125);
            let a = rng.gen_range(0.05..0.2);
            let inside = ((&xx - px).square() + (&yy - py).square())
                .le(r * r)
                .to_kind(Kind::Float);
            g += inside * a;
        }
        glows.push(g.clamp(0.0, 1.0));
    }
    let glow = Tensor::cat(&glows, 0);
    x + (1.0 - x) * glow
}

fn jpeg_roundtrip(x: &Tensor, quality: &[u8]) -> Tensor {
    use image::codecs::jpeg::JpegEncoder;
    let s = x.size();
    let (h, w) = (s[2] as u32, s[3] as u32);
    let cpu = (x.clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(Device::Cpu);
    let mut out = Vec::with_capacity(quality.len());
    for (i, &q) in quality.iter().enumerate() {
        let img = cpu.get(i as i64);
        let bytes = Vec::<u8>::try_from(img.view([-1])).expect("u8 image");
        let mut jpeg = Vec::new();
        let decoded = JpegEncoder::new_with_quality(&mut jpeg, q)
            .encode(&bytes, w, h, image::ExtendedColorType::Rgb8)
            .ok()
            .and_then(|_| image::load_from_memory(&jpeg).ok())
            .map(|d| d.to_rgb8().into_raw())
            .unwrap_or(bytes);
        out.push(Tensor::from_slice(&decoded).view([h as i64, w as i64, 3]));
    }
    (Tensor::stack(&out, 0)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0)
        .to_device(x.device())
}

// ---------------------------------------------------------------- the pipeline

/// Pipeline settings (RedDino's defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// RandomResizedCrop area range.
    pub crop_scale: (f64, f64),
    /// RandomResizedCrop aspect range.
    pub crop_ratio: (f64, f64),
    /// Pixel transforms per image, drawn without replacement from the 33.
    pub ops_per_image: usize,
    /// Probability of each of HorizontalFlip, VerticalFlip, RandomRotate90.
    pub flip_p: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop_scale: (0.32, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            ops_per_image: 4,
            flip_p: 0.85,
        }
    }
}

/// What was applied to each image (for tests and logs).
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub ops: Vec<Vec<Op>>,
    pub hflip: Vec<bool>,
    pub vflip: Vec<bool>,
    pub rot90: Vec<u8>,
}

/// torchvision's RandomResizedCrop parameters: (top, left, height, width).
pub fn rrc_params(
    h: i64,
    w: i64,
    cfg: &AugmentConfig,
    rng: &mut ChaCha8Rng,
) -> (i64, i64, i64, i64) {
    let area = (h * w) as f64;
    let (lr0, lr1) = (cfg.crop_ratio.0.ln(), cfg.crop_ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(cfg.crop_scale.0..=cfg.crop_scale.1);
        let ratio = rng.gen_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round() as i64;
        let ch = (target / ratio).sqrt().round() as i64;
        if cw > 0 && cw <= w && ch > 0 && ch <= h {
            return (rng.gen_range(0..=h - ch), rng.gen_range(0..=w - cw), ch, cw);
        }
    }
    // fallback: centre crop at the clamped ratio
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < cfg.crop_ratio.0 {
        (w, (w as f64 / cfg.crop_ratio.0).round() as i64)
    } else if in_ratio > cfg.crop_ratio.1 {
        ((h as f64 * cfg.crop_ratio.1).round() as i64, h)
    } else {
        (w, h)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// One augmented view of every image: [B, 3, size, size], ImageNet-normalised.
pub fn augment(
    images: &Tensor,
    size: i64,
    cfg: &AugmentConfig,
    rng: &mut ChaCha8Rng,
) -> (Tensor, Applied) {
    augment_with(images, size, cfg, &Op::ALL, rng)
}

impl Op {
    /// What supervised fine-tuning draws from: the transforms that change stain, colour,
    /// exposure and noise but keep the cell's shape at small input sizes (no strong blurs,
    /// downscaling or occluding overlays), so that a classifier learns shape, not stain, and a
    /// mild Gaussian focus blur (sigma 0.8-1.4 px) for the softer optics of other microscopes.
    /// Channel shuffling is left out: it turns red cells blue, and a blue platelet must not be
    /// read as a red-cell fragment of the same outline.
    pub const FINETUNE: [Op; 13] = [
        Op::ColorJitter,
        Op::Equalize,
        Op::FancyPca,
        Op::GaussNoise,
        Op::GaussianBlur,
        Op::HueSaturationValue,
        Op::MultiplicativeNoise,
        Op::RandomBrightnessContrast,
        Op::RgbShift,
        Op::RandomGamma,
        Op::RandomToneCurve,
        Op::Sharpen,
        Op::Clahe,
    ];

    /// Colour and exposure alone: the stain's hue, the light's level and contrast, with no
    /// blur, noise or equalisation, so a cell's outline and texture stay as they are. For a
    /// classifier that should not tell a field by its stain.
    pub const COLOUR: [Op; 6] = [
        Op::FancyPca,
        Op::HueSaturationValue,
        Op::RandomBrightnessContrast,
        Op::RgbShift,
        Op::RandomGamma,
        Op::RandomToneCurve,
    ];
}

/// [`augment`] drawing the pixel transforms from `ops` (applied in [`Op::ALL`] order).
pub fn augment_with(
    images: &Tensor,
    size: i64,
    cfg: &AugmentConfig,
    ops: &[Op],
    rng: &mut ChaCha8Rng,
) -> (Tensor, Applied) {
    let s = images.size();
    let (b, h, w) = (s[0], s[2], s[3]);
    let dev = images.device();
    let mut applied = Applied::default();
    // RandomResizedCrop (bilinear, antialiased as torchvision on tensors).
    let crops: Vec<Tensor> = (0..b)
        .map(|i| {
            let (top, left, ch, cw) = rrc_params(h, w, cfg, rng);
            images
                .get(i)
                .narrow(1, top, ch)
                .narrow(2, left, cw)
                .unsqueeze(0)
                .internal_upsample_bilinear2d_aa([size, size], false, None, None)
        })
        .collect();
    let mut x = Tensor::cat(&crops, 0).clamp(0.0, 1.0);
    // 4 of 33, uniformly, without replacement (as indices into Op::ALL).
    let pool: Vec<usize> = Op::ALL
        .iter()
        .enumerate()
        .filter(|(_, op)| ops.contains(op))
        .map(|(i, _)| i)
        .collect();
    let k = cfg.ops_per_image.min(pool.len());
    let chosen: Vec<Vec<usize>> = (0..b)
        .map(|_| {
            let mut v: Vec<usize> = sample(rng, pool.len(), k)
                .into_iter()
                .map(|j| pool[j])
                .collect();
            v.sort_unstable();
            v
        })
        .collect();
    applied.ops = chosen
        .iter()
        .map(|v| v.iter().map(|&i| Op::ALL[i]).collect())
        .collect();
    for (oi, op) in Op::ALL.iter().enumerate() {
        let idx: Vec<i64> = (0..b)
            .filter(|&i| chosen[i as usize].contains(&oi))
            .collect();
        if idx.is_empty() {
            continue;
        }
        let it = Tensor::from_slice(&idx).to_device(dev);
        let sub = op.apply(&x.index_select(0, &it), rng);
        x = x.index_copy(0, &it, &sub);
    }
    // Flips and rot90, per image.
    let flag = |rng: &mut ChaCha8Rng| rng.gen_bool(cfg.flip_p);
    applied.hflip = (0..b).map(|_| flag(rng)).collect();
    applied.vflip = (0..b).map(|_| flag(rng)).collect();
    applied.rot90 = (0..b)
        .map(|_| if flag(rng) { rng.gen_range(0..4u8) } else { 0 })
        .collect();
    let mask = |v: &[bool]| {
        Tensor::from_slice(&v.iter().map(|&f| f as u8).collect::<Vec<_>>())
            .to_kind(Kind::Bool)
            .view([b, 1, 1, 1])
            .to_device(dev)
    };
    x = x.flip([3]).where_self(&mask(&applied.hflip), &x);
    x = x.flip([2]).where_self(&mask(&applied.vflip), &x);
    for r in 1..4u8 {
        let sel: Vec<bool> = applied.rot90.iter().map(|&k| k == r).collect();
        if sel.iter().any(|&s| s) {
            x = x.rot90(r as i64, [2, 3]).where_self(&mask(&sel), &x);
        }
    }
    (normalize(&x), applied)
}

/// ImageNet normalisation.
pub fn normalize(x: &Tensor) -> Tensor {
    let dev = x.device();
    let mean = Tensor::from_slice(&IMAGENET_MEAN)
        .view([1, 3, 1, 1])
        .to_device(dev);
    let std = Tensor::from_slice(&IMAGENET_STD)
        .view([1, 3, 1, 1])
        .to_device(dev);
    (x - mean) / std
}
