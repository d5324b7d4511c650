//! The shipped demo model (models/demo/) on a synthetic source it was not trained on
//! (giemsa_60x; training used wright_100x, mgg_100x and field_40x), render seeds outside the
//! training range. Targets (docs/models/demo.md):
//! - balanced accuracy >= 0.90 on cell crops cut as the trainer cuts them;
//! - `analyze` on whole held-out fields: per-class counts within 10% of the truth for every
//!   class with >= 20 cells.
//!
//! `target_analyze_counts_*` asserts the second; `floor_analyze_counts_*` also holds the shipped
//! model's mean error, so that a worse model (or a change to the finder, crops or
//! preprocessing) cannot ship unnoticed while every class stays just inside 10%.
//!
//! The counts are taken over twenty-four fields in two sets of twelve (about 18 700 cells),
//! computed once for both tests. On four fields, which model looked best depended on the render
//! seeds (1.2.0 had 10 of 13 classes within 10% on 910 000-910 003 and 7 of 13 on
//! 920 000-920 003); on twelve, a model could still pass on one set and miss on the other
//! (docs/models/demo.md).

use image::imageops::FilterType;
use image::RgbImage;
use reddino_edge::cells::greedy_pairs;
use reddino_edge::infer::{classify_crops, Backend, TractBackend};
use reddino_edge::model::{demo_model, is_demo_key, DEMO_PUBLIC_KEY};
use reddino_edge::offline::analyze::{analyze_image, AnalyzeConfig};
use reddino_models::bundle::{self, Bundle, Limits, TrustedKeys};
use reddino_models::preprocess::{blanked_crop, median_box_side, square_crop_at_least, CropPolicy};
use reddino_models::synth::{render, ClassMix, FieldSpec, SourcePreset, NUM_CLASSES};
use reddino_models::taxonomy::DEFAULT_CLASSES;

const HELD_OUT: &str = "giemsa_60x";

fn open_demo(dir: &std::path::Path) -> Bundle {
    let (tar, key) = demo_model(dir).unwrap();
    let mut trusted = TrustedKeys::new();
    trusted.add_file(&key).unwrap();
    let b = bundle::open(&tar, &trusted, &Limits::default()).unwrap();
    b.self_test().unwrap();
    b
}

/// Index of every default class in the bundle's class list.
fn class_map(b: &Bundle) -> Vec<usize> {
    let names = &b.manifest().class_names;
    DEFAULT_CLASSES
        .iter()
        .map(|c| {
            names
                .iter()
                .position(|n| n == c)
                .unwrap_or_else(|| panic!("the demo model lacks class {c}"))
        })
        .collect()
}

#[test]
fn demo_model_is_signed_with_the_marked_demo_key() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open_demo(tmp.path());
    assert_eq!(b.manifest().name, "reddino-demo");
    assert_eq!(b.manifest().class_names.len(), NUM_CLASSES);
    assert!(DEMO_PUBLIC_KEY.contains("DEMO key"));
    assert!(is_demo_key(DEMO_PUBLIC_KEY));
    // Another key is not the demo key, whatever its comment says.
    let other = reddino_models::bundle::SigningKey::generate()
        .unwrap()
        .public_key_file()
        .unwrap()
        .replacen("minisign public key", "RedDino DEMO key", 1);
    assert!(!is_demo_key(&other));
}

/// Balanced accuracy of the demo model on held-out crops (40 per class).
fn held_out_balanced_accuracy() -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let b = open_demo(tmp.path());
    let map = class_map(&b);
    let mut backend = TractBackend::from_bundle(&b, 32, 0).unwrap();
    let source = SourcePreset::by_name(HELD_OUT).unwrap();
    // Crops as `reddino-models synth crops` cuts them (box x 1.3, 96 px, the model's minimum
    // side against the median cell of a default-mix field, neighbours blanked when the model
    // says so), uniform class mix.
    let floor = b.manifest().crop_min_side
        * median_box_side(
            &render(&FieldSpec::new(1280, 960, 899_999, source.clone()))
                .unwrap()
                .cells
                .iter()
                .map(|c| c.bbox)
                .collect::<Vec<_>>(),
        );
    let per_class = 40;
    let mut crops: Vec<RgbImage> = Vec::new();
    let mut truth: Vec<usize> = Vec::new();
    let mut have = [0usize; NUM_CLASSES];
    let mut seed = 900_000;
    while have.iter().any(|&n| n < per_class) {
        let mut spec = FieldSpec::new(1280, 960, seed, source.clone());
        spec.mix = ClassMix::uniform();
        let field = render(&spec).unwrap();
        let owners = b.manifest().blank_neighbours.then(|| field.owner_map());
        for (j, cell) in field.cells.iter().enumerate() {
            if have[cell.class] >= per_class {
                continue;
            }
            let c = match &owners {
                Some(o) => blanked_crop(&field.image, o, j as u32, cell.bbox, 1.3, floor),
                None => square_crop_at_least(&field.image, cell.bbox, 1.3, floor),
            };
            crops.push(image::imageops::resize(&c, 96, 96, FilterType::Triangle));
            truth.push(cell.class);
            have[cell.class] += 1;
        }
        seed += 1;
        assert!(
            seed < 900_050,
            "could not collect {per_class} crops per class"
        );
    }
    let preds = classify_crops(
        &crops,
        &mut backend as &mut dyn Backend,
        &b.manifest().class_names,
        &b.manifest().normalization(),
        0.0,
    )
    .unwrap();
    let mut correct = [0usize; NUM_CLASSES];
    for (p, &t) in preds.iter().zip(&truth) {
        if p.class == Some(map[t]) {
            correct[t] += 1;
        }
    }
    let recall: Vec<f64> = correct
        .iter()
        .map(|&c| c as f64 / per_class as f64)
        .collect();
    let balanced = recall.iter().sum::<f64>() / NUM_CLASSES as f64;
    for (c, r) in DEFAULT_CLASSES.iter().zip(&recall) {
        eprintln!("{c:<12} recall {r:.3}");
    }
    eprintln!(
        "{HELD_OUT}: balanced accuracy {balanced:.3} on {} crops",
        truth.len()
    );
    balanced
}

#[test]
fn target_held_out_crops_balanced_accuracy_at_least_0_90() {
    let b = held_out_balanced_accuracy();
    assert!(
        b >= 0.90,
        "balanced accuracy {b:.3} on the held-out source is below 0.90"
    );
}

/// Render seeds of the count fields: two sets of twelve.
const COUNT_FIELDS: [std::ops::Range<u64>; 2] = [910_000..910_012, 940_000..940_012];

/// Per default class: (name, true count, counted by `analyze`) over the held-out 1920x1080
/// count fields with the default class mix; computed on first use.
fn held_out_counts() -> &'static [(&'static str, u64, u64)] {
    static COUNTS: std::sync::OnceLock<Vec<(&'static str, u64, u64)>> = std::sync::OnceLock::new();
    COUNTS.get_or_init(count_held_out_fields)
}

fn count_held_out_fields() -> Vec<(&'static str, u64, u64)> {
    let tmp = tempfile::tempdir().unwrap();
    let b = open_demo(tmp.path());
    let map = class_map(&b);
    let names = b.manifest().class_names.clone();
    let mut backend = TractBackend::from_bundle(&b, 32, 0).unwrap();
    let source = SourcePreset::by_name(HELD_OUT).unwrap();
    let cfg = AnalyzeConfig {
        crop: b.manifest().crop_policy(CropPolicy::DEFAULT_MARGIN),
        ..AnalyzeConfig::default()
    };
    let mut truth = [0u64; NUM_CLASSES];
    let mut counted = vec![0u64; names.len()];
    let mut uncertain = 0;
    // Where each true cell went: row = truth, columns = the classes, `uncertain`, not found.
    let mut fate = vec![vec![0u64; names.len() + 2]; NUM_CLASSES];
    let mut unmatched = vec![0u64; names.len() + 1];
    for seed in COUNT_FIELDS.iter().flat_map(|r| r.clone()) {
        // Full-HD fields with the default (clinical-like) class mix.
        let field = render(&FieldSpec::new(1920, 1080, seed, source.clone())).unwrap();
        let (w, h) = (field.image.width(), field.image.height());
        // The analysis leaves out cells cut by the frame edge; so does the truth.
        let truths: Vec<usize> = (0..field.cells.len())
            .filter(|&j| {
                let [x0, y0, x1, y1] = field.cells[j].bbox;
                !(cfg.cells.drop_border && (x0 == 0 || y0 == 0 || x1 >= w || y1 >= h))
            })
            .collect();
        for &j in &truths {
            truth[field.cells[j].class] += 1;
        }
        let report = analyze_image(
            "field",
            &field.image,
            &mut backend as &mut dyn Backend,
            &names,
            &b.manifest().normalization(),
            &cfg,
        )
        .unwrap();
        for (k, n) in &report.counts {
            match names.iter().position(|c| c == k) {
                Some(i) => counted[i] += n,
                None => uncertain += n,
            }
        }
        // Detections matched to true cells: a detection's box must hold the cell's centroid
        // (the centre of a box is far from the centroid of a sickle or a tear drop); nearest
        // first, one to one.
        let mut pairs = Vec::new();
        for (i, c) in report.cells.iter().enumerate() {
            let [x0, y0, x1, y1] = c.bbox;
            let (cx, cy) = ((x0 + x1) as f32 / 2.0, (y0 + y1) as f32 / 2.0);
            for &j in &truths {
                let t = &field.cells[j];
                let inside = (x0 as f32..x1 as f32).contains(&t.center.0)
                    && (y0 as f32..y1 as f32).contains(&t.center.1);
                let d = ((cx - t.center.0).powi(2) + (cy - t.center.1).powi(2)).sqrt();
                if inside {
                    pairs.push((d, i, j));
                }
            }
        }
        let mut used_d = vec![false; report.cells.len()];
        let mut used_t = vec![false; field.cells.len()];
        let column = |class: &str| names.iter().position(|c| c == class).unwrap_or(names.len());
        for (i, j) in greedy_pairs(pairs, report.cells.len(), field.cells.len()) {
            used_d[i] = true;
            used_t[j] = true;
            fate[field.cells[j].class][column(&report.cells[i].class)] += 1;
        }
        for &j in &truths {
            if !used_t[j] {
                fate[field.cells[j].class][names.len() + 1] += 1;
            }
        }
        for (i, c) in report.cells.iter().enumerate() {
            if !used_d[i] {
                unmatched[column(&c.class)] += 1;
            }
        }
    }
    eprintln!(
        "where the true cells went (rows = truth; columns = {names:?}, uncertain, not found):"
    );
    for (c, row) in fate.iter().enumerate() {
        eprintln!("{:<12} {row:?}", DEFAULT_CLASSES[c]);
    }
    eprintln!("detections on no true cell: {unmatched:?}");
    eprintln!("class        truth  counted");
    let rows: Vec<(&'static str, u64, u64)> = DEFAULT_CLASSES
        .iter()
        .enumerate()
        .map(|(c, name)| (*name, truth[c], counted[map[c]]))
        .collect();
    for (name, t, n) in &rows {
        eprintln!(
            "{name:<12} {t:>6} {n:>8}  {:+.1}%",
            100.0 * (*n as f64 - *t as f64) / (*t).max(1) as f64
        );
    }
    eprintln!("uncertain {uncertain}");
    rows
}

/// Relative count errors of the classes with at least 20 true cells.
fn count_errors(rows: &[(&'static str, u64, u64)]) -> Vec<(&'static str, f64)> {
    rows.iter()
        .filter(|(_, t, _)| *t >= 20)
        .map(|(name, t, n)| (*name, (*n as f64 - *t as f64) / *t as f64))
        .collect()
}

#[test]
fn floor_analyze_counts_on_held_out_fields() {
    let errors = count_errors(held_out_counts());
    let mean = errors.iter().map(|(_, e)| e.abs()).sum::<f64>() / errors.len() as f64;
    eprintln!("mean absolute count error {:.1}%", 100.0 * mean);
    assert!(
        mean <= 0.04,
        "mean absolute per-class count error {:.1}% is above 4%",
        100.0 * mean
    );
}

#[test]
fn target_analyze_counts_on_held_out_fields_within_10_percent() {
    let failures: Vec<String> = count_errors(held_out_counts())
        .into_iter()
        .filter(|(_, e)| e.abs() > 0.10)
        .map(|(name, e)| format!("{name} {:+.1}%", 100.0 * e))
        .collect();
    assert!(
        failures.is_empty(),
        "counts more than 10% off the truth: {}",
        failures.join(", ")
    );
}
