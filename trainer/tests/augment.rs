//! What each of the 33 pixel transforms does to a known image, and the pipeline around them.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use reddino_trainer::augment::{augment, augment_with, hsv_to_rgb, rgb_to_hsv, AugmentConfig, Op};
use tch::{Device, Kind, Tensor};

const S: i64 = 32;

/// libtorch's generator is global: tests that seed it take turns.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> ChaCha8Rng {
    tch::manual_seed(3);
    ChaCha8Rng::seed_from_u64(11)
}

fn constant(n: i64, rgb: [f32; 3]) -> Tensor {
    Tensor::from_slice(&rgb)
        .view([1, 3, 1, 1])
        .expand([n, 3, S, S], false)
        .contiguous()
}

/// Horizontal ramp from `lo` to `hi`, same in every channel.
fn ramp(n: i64, lo: f64, hi: f64) -> Tensor {
    (Tensor::arange(S, (Kind::Float, Device::Cpu)) / (S - 1) as f64 * (hi - lo) + lo)
        .view([1, 1, 1, S])
        .expand([n, 3, S, S], false)
        .contiguous()
}

/// A coloured, textured image with values inside (0.2, 0.8).
fn texture(n: i64) -> Tensor {
    let y = Tensor::arange(S, (Kind::Float, Device::Cpu)).view([1, 1, S, 1]);
    let x = Tensor::arange(S, (Kind::Float, Device::Cpu)).view([1, 1, 1, S]);
    let c = Tensor::from_slice(&[0.0f32, 1.0, 2.0]).view([1, 3, 1, 1]);
    let v = ((&x * 0.3 + &y * 0.2 + c * 2.0).sin() * 0.3 + 0.5).expand([n, 3, S, S], false);
    v.contiguous()
}

fn impulse(n: i64) -> Tensor {
    let t = Tensor::zeros([n, 3, S, S], (Kind::Float, Device::Cpu));
    let _ = t.narrow(2, S / 2, 1).narrow(3, S / 2, 1).fill_(1.0);
    t
}

fn apply(op: Op, x: &Tensor) -> Tensor {
    let _turn = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let y = op.apply(x, &mut rng());
    assert_eq!(y.size(), x.size(), "{op:?} changed the shape");
    let (lo, hi) = (y.min().double_value(&[]), y.max().double_value(&[]));
    assert!(lo >= 0.0 && hi <= 1.0, "{op:?} left [0,1]: [{lo}, {hi}]");
    y
}

fn maxdiff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn mean(a: &Tensor) -> f64 {
    a.mean(Kind::Float).double_value(&[])
}

fn std(a: &Tensor) -> f64 {
    a.std(true).double_value(&[])
}

/// A blur keeps a constant image and spreads an impulse (less peak, same mass).
fn check_blur(op: Op, min_spread: i64) {
    let c = constant(4, [0.3, 0.5, 0.7]);
    assert!(
        maxdiff(&apply(op, &c), &c) < 1e-5,
        "{op:?} changed a constant image"
    );
    let y = apply(op, &impulse(4));
    assert!(
        y.max().double_value(&[]) < 0.9,
        "{op:?} kept the impulse's peak"
    );
    let mass = y.sum(Kind::Float).double_value(&[]) / 12.0;
    assert!((mass - 1.0).abs() < 0.05, "{op:?} mass {mass}");
    let nonzero = y.get(0).get(0).gt(1e-6).sum(Kind::Int64).int64_value(&[]);
    assert!(nonzero >= min_spread, "{op:?} spread to {nonzero} pixels");
}

#[test]
fn blur() {
    check_blur(Op::Blur, 9);
}

#[test]
fn gaussian_blur() {
    check_blur(Op::GaussianBlur, 9);
}

#[test]
fn defocus() {
    check_blur(Op::Defocus, 29); // a disc of radius >= 3
}

#[test]
fn motion_blur() {
    let c = constant(4, [0.3, 0.5, 0.7]);
    assert!(maxdiff(&apply(Op::MotionBlur, &c), &c) < 1e-5);
    let y = apply(Op::MotionBlur, &impulse(4));
    for i in 0..4 {
        let nz = y.get(i).get(0).gt(1e-6).sum(Kind::Int64).int64_value(&[]);
        assert!((3..=7).contains(&nz), "a line of 3-7 pixels, got {nz}");
    }
}

#[test]
fn glass_blur() {
    let c = constant(2, [0.3, 0.5, 0.7]);
    assert!(maxdiff(&apply(Op::GlassBlur, &c), &c) < 1e-5);
    let t = texture(2);
    assert!(std(&apply(Op::GlassBlur, &t)) < std(&t) * 0.95);
}

#[test]
fn ringing_overshoot() {
    let c = constant(4, [0.3, 0.5, 0.7]);
    assert!(maxdiff(&apply(Op::RingingOvershoot, &c), &c) < 1e-5);
    // A step from 0.3 to 0.7 rings: values beyond the step's range appear.
    let step = ramp(4, 0.0, 1.0).ge(0.5).to_kind(Kind::Float) * 0.4 + 0.3;
    let y = apply(Op::RingingOvershoot, &step);
    let (lo, hi) = (y.min().double_value(&[]), y.max().double_value(&[]));
    assert!(lo < 0.299 || hi > 0.701, "no overshoot: [{lo}, {hi}]");
}

#[test]
fn sharpen() {
    let step = ramp(4, 0.0, 1.0).ge(0.5).to_kind(Kind::Float) * 0.4 + 0.3;
    let y = apply(Op::Sharpen, &step);
    // The edge is accentuated: the dark side darker and the bright side brighter at the step.
    let row = y.get(0).get(0).get(5);
    let (a, b) = (row.double_value(&[S / 2 - 1]), row.double_value(&[S / 2]));
    assert!(b - a > 0.4, "edge contrast {}", b - a);
}

#[test]
fn emboss() {
    let c = constant(4, [0.3, 0.5, 0.7]);
    assert!(
        maxdiff(&apply(Op::Emboss, &c), &c) < 1e-5,
        "emboss kernel sums to 1"
    );
    let step = ramp(4, 0.0, 1.0).ge(0.5).to_kind(Kind::Float) * 0.4 + 0.3;
    assert!(maxdiff(&apply(Op::Emboss, &step), &step) > 0.05);
}

#[test]
fn median_blur() {
    // Isolated salt on a constant image disappears.
    let c = constant(4, [0.4, 0.4, 0.4]);
    let salt = &c + impulse(4) * 0.6;
    assert!(maxdiff(&apply(Op::MedianBlur, &salt), &c) < 1e-6);
}

#[test]
fn clahe() {
    // A low-contrast ramp gets stretched.
    let x = ramp(2, 0.4, 0.6);
    let y = apply(Op::Clahe, &x);
    let (r0, r1) = (y.max().double_value(&[]) - y.min().double_value(&[]), 0.2);
    assert!(r0 > r1 * 1.3, "range {r0}");
    // Grey stays grey (hue and saturation untouched).
    assert!(maxdiff(&y.narrow(1, 0, 1), &y.narrow(1, 1, 1)) < 1e-5);
}

#[test]
fn equalize() {
    let y = apply(Op::Equalize, &ramp(2, 0.4, 0.6));
    assert!(y.min().double_value(&[]) < 0.01 && y.max().double_value(&[]) > 0.99);
}

#[test]
fn channel_shuffle() {
    let x = constant(8, [0.1, 0.5, 0.9]);
    let y = apply(Op::ChannelShuffle, &x);
    let sorted = y.sort(1, false).0;
    assert!(maxdiff(&sorted, &x) < 1e-7, "channels are a permutation");
    assert!(
        maxdiff(&y, &x) > 0.1,
        "8 images, some permutation is not the identity"
    );
}

#[test]
fn channel_dropout() {
    let x = constant(6, [0.2, 0.5, 0.8]);
    let y = apply(Op::ChannelDropout, &x);
    for i in 0..6 {
        let ch: Vec<f64> = (0..3)
            .map(|c| y.get(i).get(c).mean(Kind::Float).double_value(&[]))
            .collect();
        assert_eq!(ch.iter().filter(|&&v| v == 0.0).count(), 1, "{ch:?}");
    }
}

#[test]
fn color_jitter() {
    // Saturation and hue do nothing to grey; brightness and contrast move it.
    let x = constant(4, [0.5, 0.5, 0.5]);
    let y = apply(Op::ColorJitter, &x);
    assert!(maxdiff(&y.narrow(1, 0, 1), &y.narrow(1, 2, 1)) < 1e-5);
    assert!(maxdiff(&y, &x) > 1e-3 && maxdiff(&y, &x) < 0.11);
    let t = texture(4);
    assert!(maxdiff(&apply(Op::ColorJitter, &t), &t) > 0.01);
}

#[test]
fn downscale() {
    let t = texture(2);
    let y = apply(Op::Downscale, &t);
    // Constant over 4x4 blocks.
    let blocks = y.view([2, 3, S / 4, 4, S / 4, 4]);
    let spread =
        blocks.amax([3i64, 5].as_slice(), false) - blocks.amin([3i64, 5].as_slice(), false);
    assert!(spread.max().double_value(&[]) < 1e-7);
}

#[test]
fn fancy_pca() {
    // Grey has no colour variance: unchanged. A coloured image shifts by one colour per image.
    let g = ramp(2, 0.2, 0.8);
    assert!(maxdiff(&apply(Op::FancyPca, &g), &g) < 0.02);
    let t = texture(2);
    let d = apply(Op::FancyPca, &t) - &t;
    let per_pixel_spread =
        d.amax([2i64, 3].as_slice(), false) - d.amin([2i64, 3].as_slice(), false);
    assert!(per_pixel_spread.max().double_value(&[]) < 1e-5);
    assert!(d.abs().max().double_value(&[]) > 1e-4);
}

#[test]
fn gauss_noise() {
    let x = constant(4, [0.5, 0.5, 0.5]);
    let d = apply(Op::GaussNoise, &x) - &x;
    for i in 0..4 {
        let s = std(&d.get(i)) * 255.0;
        assert!(
            s > 10f64.sqrt() * 0.9 && s < 50f64.sqrt() * 1.1,
            "std {s} (8-bit)"
        );
        assert!(mean(&d.get(i)).abs() < 0.01);
    }
}

#[test]
fn iso_noise() {
    let t = texture(2);
    let d = apply(Op::IsoNoise, &t) - &t;
    assert!(std(&d) > 1e-3 && mean(&d).abs() < 0.02);
}

#[test]
fn multiplicative_noise() {
    let x = constant(2, [0.5, 0.5, 0.5]);
    let r = apply(Op::MultiplicativeNoise, &x) / &x;
    assert!(r.min().double_value(&[]) >= 0.9 - 1e-6 && r.max().double_value(&[]) <= 1.1 + 1e-6);
    assert!(std(&r) > 0.02, "per-pixel multipliers");
}

#[test]
fn hue_saturation_value() {
    let x = constant(4, [0.5, 0.5, 0.5]);
    let y = apply(Op::HueSaturationValue, &x);
    // Grey has no hue: only the value (+-20/255) and saturation move it.
    assert!((mean(&y) - 0.5).abs() <= 20.0 / 255.0 + 1e-4 || maxdiff(&y, &x) < 0.2);
    let (h, s, v) = rgb_to_hsv(&texture(1));
    assert!(
        maxdiff(&hsv_to_rgb(&h, &s, &v), &texture(1)) < 1e-5,
        "HSV round trip"
    );
}

#[test]
fn image_compression() {
    let t = texture(2);
    let y = apply(Op::ImageCompression, &t);
    assert!(maxdiff(&y, &t) < 0.05, "quality 99-100 is near lossless");
    let q = (&t * 255.0).round() / 255.0;
    assert!(maxdiff(&y, &q) > 0.0 || maxdiff(&y, &t) > 0.0);
}

#[test]
fn invert() {
    let t = texture(2);
    assert!(maxdiff(&apply(Op::InvertImg, &t), &(-&t + 1.0)) < 1e-7);
}

#[test]
fn posterize() {
    let y = apply(Op::Posterize, &ramp(1, 0.0, 1.0)) * 255.0;
    let r = (&y - (&y / 16.0).round() * 16.0)
        .abs()
        .max()
        .double_value(&[]);
    assert!(r < 1e-3, "values are multiples of 16");
}

#[test]
fn brightness_contrast() {
    // An affine map: y = a x + b with one (a, b) per image.
    let x = ramp(1, 0.3, 0.7);
    let y = apply(Op::RandomBrightnessContrast, &x);
    let (x0, x1) = (
        x.double_value(&[0, 0, 0, 0]),
        x.double_value(&[0, 0, 0, S - 1]),
    );
    let (y0, y1) = (
        y.double_value(&[0, 0, 0, 0]),
        y.double_value(&[0, 0, 0, S - 1]),
    );
    let a = (y1 - y0) / (x1 - x0);
    let b = y0 - a * x0;
    assert!(
        (0.8 - 1e-4..=1.2 + 1e-4).contains(&a) && b.abs() <= 0.2 + 1e-4,
        "a {a} b {b}"
    );
    let pred = &x * a + b;
    assert!(maxdiff(&pred.clamp(0.0, 1.0), &y) < 1e-5);
}

#[test]
fn rgb_shift() {
    let x = constant(3, [0.5, 0.5, 0.5]);
    let d = apply(Op::RgbShift, &x) - &x;
    let spread = d.amax([2i64, 3].as_slice(), false) - d.amin([2i64, 3].as_slice(), false);
    assert!(
        spread.max().double_value(&[]) < 1e-6,
        "one shift per channel"
    );
    assert!(d.abs().max().double_value(&[]) <= 20.0 / 255.0 + 1e-6);
}

#[test]
fn random_gamma() {
    let x = ramp(1, 0.2, 0.8);
    let y = apply(Op::RandomGamma, &x);
    let g = y.log() / x.log();
    assert!(std(&g) < 1e-4, "one gamma");
    let g = mean(&g);
    assert!((0.8..=1.2).contains(&g), "gamma {g}");
}

#[test]
fn random_rain() {
    // Streaks on black; a white image dims to x0.7.
    let y = apply(Op::RandomRain, &constant(2, [0.0, 0.0, 0.0]));
    assert!(y.max().double_value(&[]) > 0.01);
    let w = apply(Op::RandomRain, &constant(2, [1.0, 1.0, 1.0]));
    assert!((mean(&w) - 0.7).abs() < 0.02, "{}", mean(&w));
}

#[test]
fn random_shadow() {
    let y = apply(Op::RandomShadow, &constant(4, [1.0, 1.0, 1.0]));
    let dark = y.lt(0.75);
    assert!(dark.sum(Kind::Int64).int64_value(&[]) > 0);
    assert_eq!(
        dark.narrow(2, 0, S / 2 - 1)
            .sum(Kind::Int64)
            .int64_value(&[]),
        0,
        "shadow in the lower half"
    );
    let vals = y.masked_select(&dark);
    assert!((vals - 0.5).abs().max().double_value(&[]) < 1e-6);
}

#[test]
fn random_snow() {
    let y = apply(Op::RandomSnow, &constant(2, [0.2, 0.2, 0.2]));
    assert!((mean(&y) - 0.5).abs() < 1e-5, "dark pixels x2.5");
    let b = constant(2, [0.9, 0.9, 0.9]);
    assert!(
        maxdiff(&apply(Op::RandomSnow, &b), &b) < 1e-7,
        "bright pixels unchanged"
    );
}

#[test]
fn random_sun_flare() {
    let y = apply(Op::RandomSunFlare, &constant(2, [0.0, 0.0, 0.0]));
    assert!(y.max().double_value(&[]) > 0.5);
    assert!(mean(&y.narrow(2, 0, S / 4)) > mean(&y.narrow(2, 3 * S / 4, S / 4)) - 0.05);
}

#[test]
fn random_tone_curve() {
    let x = ramp(2, 0.0, 1.0);
    let y = apply(Op::RandomToneCurve, &x);
    assert!(
        y.double_value(&[0, 0, 0, 0]).abs() < 1e-6
            && (y.double_value(&[0, 0, 0, S - 1]) - 1.0).abs() < 1e-6
    );
    assert!(maxdiff(&y, &x) > 1e-3);
}

#[test]
fn random_fog() {
    let x = constant(2, [0.2, 0.2, 0.2]);
    let y = apply(Op::RandomFog, &x);
    assert!(mean(&y) > 0.25, "haze brightens");
    assert!(
        (&y - &x).min().double_value(&[]) >= -1e-6,
        "towards white only"
    );
}

#[test]
fn solarize() {
    let x = ramp(1, 0.0, 1.0);
    let y = apply(Op::Solarize, &x);
    let want = (-&x + 1.0).where_self(&x.ge(0.5), &x);
    assert!(maxdiff(&y, &want) < 1e-7);
}

#[test]
fn every_op_is_tested_and_listed_once() {
    assert_eq!(Op::ALL.len(), 33);
    let mut names: Vec<String> = Op::ALL.iter().map(|o| format!("{o:?}")).collect();
    names.dedup();
    assert_eq!(names.len(), 33);
}

#[test]
fn pipeline_draws_four_of_33_and_flips_at_085() {
    let _turn = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = ChaCha8Rng::seed_from_u64(5);
    tch::manual_seed(5);
    let imgs = texture(64);
    let cfg = AugmentConfig::default();
    let (y, applied) = augment(&imgs, 28, &cfg, &mut r);
    assert_eq!(y.size(), vec![64, 3, 28, 28]);
    assert!(applied.ops.iter().all(|o| o.len() == 4));
    assert!(applied.ops.iter().all(|o| {
        let mut v: Vec<String> = o.iter().map(|x| format!("{x:?}")).collect();
        v.dedup();
        v.len() == 4
    }));
    let frac = applied.hflip.iter().filter(|&&f| f).count() as f64 / 64.0;
    assert!((frac - 0.85).abs() < 0.15, "hflip {frac}");
    // Normalised: roughly zero-centred after ImageNet normalisation of mid-grey-ish inputs.
    assert!(y.mean(Kind::Float).double_value(&[]).abs() < 1.5);
    // Same seed, same views.
    let mut r2 = ChaCha8Rng::seed_from_u64(5);
    tch::manual_seed(5);
    let (y2, _) = augment(&imgs, 28, &cfg, &mut r2);
    assert!(maxdiff(&y, &y2) == 0.0, "reproducible");
}

#[test]
fn colour_transforms_keep_every_outline() {
    let _seeded = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    // A disc on a background, two colours: a transform of colour and exposure alone gives
    // every pixel of the disc one value and every pixel of the background another, so the
    // outline is where it was. The fine-tuning pool's blurs and noise do not.
    let y = Tensor::arange(S, (Kind::Float, Device::Cpu)).view([1, 1, S, 1]);
    let x = Tensor::arange(S, (Kind::Float, Device::Cpu)).view([1, 1, 1, S]);
    let disc = ((&x - 15.5).square() + (&y - 15.5).square()).le(81.0);
    let n = 24;
    let cell = constant(n, [0.6, 0.3, 0.4]);
    let images = cell.where_self(&disc, &constant(n, [0.9, 0.85, 0.8]));
    let cfg = AugmentConfig {
        crop_scale: (1.0, 1.0),
        crop_ratio: (1.0, 1.0),
        ops_per_image: 2,
        flip_p: 0.0,
    };
    // The largest spread of one channel's values over the disc's or the background's pixels.
    let spread = |out: &Tensor| {
        [disc.shallow_clone(), disc.logical_not()]
            .iter()
            .map(|part| {
                let part = part.expand([n, 3, S, S], false);
                let inside = |v: f64| out.where_self(&part, &Tensor::from(v));
                let hi = inside(f64::NEG_INFINITY).amax([2i64, 3].as_slice(), false);
                let lo = inside(f64::INFINITY).amin([2i64, 3].as_slice(), false);
                (hi - lo).max().double_value(&[])
            })
            .fold(0.0, f64::max)
    };
    let mut r = rng();
    let (out, applied) = augment_with(&images, S, &cfg, &Op::COLOUR, &mut r);
    for ops in &applied.ops {
        assert_eq!(ops.len(), 2);
        assert!(ops.iter().all(|op| Op::COLOUR.contains(op)), "{ops:?}");
    }
    assert!(spread(&out) < 1e-4, "colour pool: spread {}", spread(&out));
    let changed = (&out - augment_with(&images, S, &cfg, &[], &mut r).0)
        .abs()
        .max()
        .double_value(&[]);
    assert!(changed > 0.05, "colour pool changed nothing: {changed}");
    let (out, _) = augment_with(&images, S, &cfg, &Op::FINETUNE, &mut r);
    assert!(
        spread(&out) > 0.05,
        "fine-tuning pool: spread {}",
        spread(&out)
    );
}
