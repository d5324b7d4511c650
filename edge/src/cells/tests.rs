//! The finder's unit tests: each step on small drawn masks and fields.

use super::*;
use reddino_models::synth::{render, set_touching, ClassMix, FieldSpec, SourcePreset, NUM_CLASSES};
use reddino_models::taxonomy::DEFAULT_CLASSES;

#[test]
fn finds_cells_on_synthetic_fields_from_every_source() {
    let mut total = Match {
        true_positives: 0,
        detections: 0,
        truths: 0,
    };
    for source in SourcePreset::all() {
        let mut m = Match {
            true_positives: 0,
            detections: 0,
            truths: 0,
        };
        for seed in 0..2 {
            let field = render(&FieldSpec::new(1280, 960, 100 + seed, source.clone())).unwrap();
            let found: Vec<(f32, f32)> = find(&field.image, &CellFinderConfig::default())
                .iter()
                .map(|c| c.center)
                .collect();
            let truth: Vec<((f32, f32), f32)> =
                field.cells.iter().map(|c| (c.center, c.radius)).collect();
            let r = match_centres(&found, &truth);
            m.true_positives += r.true_positives;
            m.detections += r.detections;
            m.truths += r.truths;
        }
        eprintln!(
            "{}: recall {:.4} precision {:.4} ({} cells)",
            source.name,
            m.recall(),
            m.precision(),
            m.truths
        );
        total.true_positives += m.true_positives;
        total.detections += m.detections;
        total.truths += m.truths;
        assert!(
            m.recall() >= 0.97 && m.precision() >= 0.97,
            "{}: {m:?}",
            source.name
        );
    }
    eprintln!(
        "all: recall {:.4} precision {:.4}",
        total.recall(),
        total.precision()
    );
}

#[test]
fn touching_cells_of_different_sizes_keep_their_own_pixels() {
    // A big and a small disc overlapping by 3 px, and lone discs for the typical size.
    let discs = [
        (90.0, 100.0, 22.0),
        (124.0, 100.0, 15.0),
        (240.0, 60.0, 18.0),
        (240.0, 150.0, 18.0),
        (40.0, 160.0, 18.0),
    ];
    let img = RgbImage::from_fn(320, 210, |x, y| {
        let inside = discs.iter().any(|&(cx, cy, r): &(f32, f32, f32)| {
            (x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy) <= r
        });
        image::Rgb(if inside {
            [185, 95, 115]
        } else {
            [235, 228, 232]
        })
    });
    let found = find(&img, &CellFinderConfig::default());
    assert_eq!(found.len(), discs.len(), "{found:?}");
    for &(cx, cy, r) in &discs[..2] {
        let cell = found
            .iter()
            .find(|c| (c.center.0 - cx).hypot(c.center.1 - cy) < 0.3 * r)
            .unwrap_or_else(|| panic!("no cell at ({cx}, {cy}): {found:?}"));
        // The box is the disc's (cut at the contact line on the neighbour's side), never
        // a box reaching around the neighbour.
        let [x0, y0, x1, y1] = cell.bbox;
        assert!(
            (y0 as f32 - (cy - r)).abs() <= 2.0 && (y1 as f32 - (cy + r)).abs() <= 2.0,
            "cell at ({cx}, {cy}) r {r}: box {:?}",
            cell.bbox
        );
        assert!(
            x0 as f32 >= cx - r - 2.0 && x1 as f32 <= cx + r + 2.0,
            "{:?}",
            cell.bbox
        );
    }
}

/// A synthetic field of the 40x source (small packed cells).
fn field_40x(width: u32, height: u32, seed: u64) -> reddino_models::synth::Field {
    render(&FieldSpec::new(
        width,
        height,
        seed,
        SourcePreset::by_name("field_40x").unwrap(),
    ))
    .unwrap()
}

#[test]
fn the_owner_map_gives_each_cell_its_own_pixels() {
    let field = field_40x(640, 480, 21);
    // Cut off the field's margins, so that cells lie across the frame's edge.
    let img = image::imageops::crop_imm(&field.image, 37, 29, 640 - 74, 480 - 58).to_image();
    let cfg = CellFinderConfig::default();
    let (found, owners) = find_with_owners(&img, &cfg);
    assert_eq!(found, find(&img, &cfg));
    let w = img.width() as usize;
    assert_eq!(owners.ids.len(), w * img.height() as usize);
    let mut area = vec![0u32; found.len()];
    let mut other = 0;
    for (p, &id) in owners.ids.iter().enumerate() {
        let (x, y) = ((p % w) as u32, (p / w) as u32);
        match id {
            OwnerMap::BACKGROUND => {}
            OwnerMap::OTHER => other += 1,
            i => {
                let [x0, y0, x1, y1] = found[i as usize].bbox;
                assert!((x0..x1).contains(&x) && (y0..y1).contains(&y), "cell {i}");
                area[i as usize] += 1;
            }
        }
    }
    for (c, a) in found.iter().zip(&area) {
        assert_eq!(c.area, *a, "{c:?}");
    }
    // Cells cut by the frame's edge are left out but still own their pixels.
    assert!(other > 0);
    // Tiles own nothing.
    let tiles = CellFinderConfig {
        mode: Mode::Tiles,
        ..cfg
    };
    let (t, owners) = find_with_owners(&img, &tiles);
    assert!(!t.is_empty());
    assert!(owners.ids.iter().all(|&id| id == OwnerMap::BACKGROUND));
}

/// The field's true cells, and the detections and their quality against the truth without
/// and with the neck split.
fn with_and_without_necks(spec: &FieldSpec) -> (usize, [(usize, Match); 2]) {
    let field = render(spec).unwrap();
    let truth: Vec<((f32, f32), f32)> = field.cells.iter().map(|c| (c.center, c.radius)).collect();
    let runs = [0.0, CellFinderConfig::default().split_necks].map(|split_necks| {
        let cfg = CellFinderConfig {
            split_necks,
            drop_border: false,
            ..CellFinderConfig::default()
        };
        let found: Vec<(f32, f32)> = find(&field.image, &cfg).iter().map(|c| c.center).collect();
        (found.len(), match_centres(&found, &truth))
    });
    (truth.len(), runs)
}

#[test]
fn a_sickle_or_a_fragment_against_a_round_cell_is_a_cell_of_its_own() {
    // Crowded fields of discocytes, schistocytes and sickles.
    let mut mix = [0.0; NUM_CLASSES];
    for class in ["discocyte", "schistocyte", "drepanocyte"] {
        mix[DEFAULT_CLASSES.iter().position(|c| *c == class).unwrap()] = 1.0;
    }
    let mut source = SourcePreset::by_name("giemsa_60x").unwrap();
    set_touching(std::slice::from_mut(&mut source), 0.6).unwrap();
    let (mut off, mut on) = ((0, 0), (0, 0));
    for seed in 0..2 {
        let mut spec = FieldSpec::new(1280, 960, 300 + seed, source.clone());
        spec.mix = ClassMix(mix);
        let (_, [(_, a), (_, b)]) = with_and_without_necks(&spec);
        off = (off.0 + a.true_positives, off.1 + a.truths);
        on = (on.0 + b.true_positives, on.1 + b.truths);
    }
    let recall = |(tp, n): (usize, usize)| tp as f64 / n as f64;
    eprintln!(
        "recall without the neck split {:.4}, with {:.4}",
        recall(off),
        recall(on)
    );
    assert!(
        on.0 >= off.0 + 10,
        "cells found: {} without the neck split, {} with it (of {})",
        off.0,
        on.0,
        on.1
    );
}

#[test]
fn fields_of_one_class_are_not_cut_up() {
    // Cells placed apart (sickles and tear drops still reach past their spacing and meet).
    let mut source = SourcePreset::by_name("giemsa_60x").unwrap();
    set_touching(std::slice::from_mut(&mut source), 0.0).unwrap();
    // Not white cells: in a field of nothing else the typical cell is a white cell, and its
    // lobed nucleus is cut up with or without this split; among red cells they are found
    // whole (the count test in tests/demo_model.rs).
    for (class, name) in DEFAULT_CLASSES
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != "wbc")
    {
        let mut mix = [0.0; NUM_CLASSES];
        mix[class] = 1.0;
        let mut spec = FieldSpec::new(1280, 960, 400 + class as u64, source.clone());
        spec.mix = ClassMix(mix);
        let (truth, [(off, _), (on, _)]) = with_and_without_necks(&spec);
        eprintln!("{name}: {truth} cells, {off} detections without the neck split, {on} with it");
        // Never further from the truth than without the split, give or take one cell in a
        // hundred (a tear drop's tail cut off now and then).
        assert!(
            100 * on.abs_diff(truth) <= 100 * off.abs_diff(truth) + truth,
            "{name}: {truth} cells, {off} detections without the neck split, {on} with it"
        );
    }
}

#[test]
fn a_platelet_on_a_red_cells_rim_is_a_cell_of_its_own() {
    // Red discs (one with a platelet on its rim, one with a parasite inside), a lone
    // platelet, and a white cell: pale blue cytoplasm around a dark blue nucleus.
    const RED: [u8; 3] = [185, 95, 115];
    const BLUE: [u8; 3] = [80, 90, 180];
    let red = [
        (60.0, 60.0, 18.0),
        (140.0, 60.0, 18.0),
        (60.0, 150.0, 18.0),
        (140.0, 150.0, 18.0),
    ];
    let platelet_on_rim = (60.0 + 18.0, 60.0, 4.5);
    let parasite = (140.0, 150.0, 4.0);
    let lone_platelet = (220.0, 60.0, 4.5);
    let (wbc, nucleus) = ((240.0, 150.0, 24.0), (240.0, 150.0, 12.0));
    let within = |(cx, cy, r): (f32, f32, f32), x: u32, y: u32| {
        (x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy) <= r
    };
    let img = RgbImage::from_fn(300, 210, |x, y| {
        image::Rgb(
            if [platelet_on_rim, parasite, lone_platelet, nucleus]
                .iter()
                .any(|&d| within(d, x, y))
            {
                BLUE
            } else if within(wbc, x, y) {
                [190, 200, 228]
            } else if red.iter().any(|&d| within(d, x, y)) {
                RED
            } else {
                [235, 228, 232]
            },
        )
    });
    let found = find(&img, &CellFinderConfig::default());
    let at = |(cx, cy, _): (f32, f32, f32)| {
        found
            .iter()
            .filter(|c| (c.center.0 - cx).hypot(c.center.1 - cy) < 3.0)
            .count()
    };
    assert_eq!(found.len(), 7, "{found:?}");
    for d in red
        .iter()
        .copied()
        .chain([platelet_on_rim, lone_platelet, wbc])
    {
        assert_eq!(at(d), 1, "{d:?}: {found:?}");
    }
    // Without the split the platelet stays part of its red cell.
    let off = CellFinderConfig {
        split_blue: 0.0,
        ..CellFinderConfig::default()
    };
    assert_eq!(find(&img, &off).len(), 6);
}

#[test]
fn a_thin_tip_cut_by_the_opening_rejoins_its_cell() {
    // A red disc with a two-pixel-wide spike pointing right, and a lone two-pixel speck.
    const RED: [u8; 3] = [185, 95, 115];
    let img = RgbImage::from_fn(160, 120, |x, y| {
        let disc = (x as f32 + 0.5 - 60.0).hypot(y as f32 + 0.5 - 60.0) <= 18.0;
        let spike = (70..90).contains(&x) && (59..61).contains(&y);
        let speck = (120..122).contains(&x) && (30..32).contains(&y);
        image::Rgb(if disc || spike || speck {
            RED
        } else {
            [235, 228, 232]
        })
    });
    let off = CellFinderConfig {
        grow_steps: 0,
        ..CellFinderConfig::default()
    };
    let (plain, grown) = (find(&img, &off), find(&img, &CellFinderConfig::default()));
    let ([plain], [grown]) = (&plain[..], &grown[..]) else {
        panic!("one cell each: {plain:?} {grown:?}")
    };
    // The opening leaves the disc alone; the spike grows back three pixels.
    assert_eq!(plain.bbox, [42, 42, 78, 78]);
    assert_eq!(grown.bbox, [42, 42, 81, 78]);
    assert_eq!(grown.area, plain.area + 2 * 3);
}

#[test]
fn growing_changes_boxes_not_which_cells_are_found() {
    // Fields with white cells, whose grainy cytoplasm leaves specks around them: a speck
    // too small to count stays out even when it could grow. Cells at the frame's border
    // kept, so that both runs keep the same objects.
    let source = SourcePreset::by_name("giemsa_60x").unwrap();
    let plain_cfg = CellFinderConfig {
        grow_steps: 0,
        drop_border: false,
        ..CellFinderConfig::default()
    };
    let grown_cfg = CellFinderConfig {
        drop_border: false,
        ..CellFinderConfig::default()
    };
    for seed in [1000, 1001, 1003] {
        let field = render(&FieldSpec::new(1280, 960, seed, source.clone())).unwrap();
        let plain = find(&field.image, &plain_cfg);
        let grown = find(&field.image, &grown_cfg);
        assert_eq!(plain.len(), grown.len(), "seed {seed}");
        let inside =
            |a: [u32; 4], b: [u32; 4]| b[0] <= a[0] && b[1] <= a[1] && a[2] <= b[2] && a[3] <= b[3];
        for p in &plain {
            assert!(
                grown
                    .iter()
                    .any(|g| inside(p.bbox, g.bbox) && g.area >= p.area),
                "seed {seed}: no grown cell holds {p:?}"
            );
        }
    }
}

#[test]
fn grown_boxes_of_irregular_cells_come_closer_to_their_true_boxes() {
    // Fragments, crenated cells and tear drops, apart, at the two magnifications where thin
    // parts are a pixel or two wide.
    let ratio = |cfg: &CellFinderConfig, source: &SourcePreset, class: usize| {
        let mut mix = [0.0; NUM_CLASSES];
        mix[class] = 1.0;
        let mut spec = FieldSpec::new(1280, 960, 500 + class as u64, source.clone());
        spec.mix = ClassMix(mix);
        let field = render(&spec).unwrap();
        let found = find(&field.image, cfg);
        let mut pairs = Vec::new();
        for (i, c) in found.iter().enumerate() {
            let [x0, y0, x1, y1] = c.bbox;
            for (j, t) in field.cells.iter().enumerate() {
                if (x0 as f32..x1 as f32).contains(&t.center.0)
                    && (y0 as f32..y1 as f32).contains(&t.center.1)
                {
                    let d = (c.center.0 - t.center.0).hypot(c.center.1 - t.center.1);
                    pairs.push((d, i, j));
                }
            }
        }
        let side = |b: [u32; 4]| (b[2] - b[0]).max(b[3] - b[1]) as f64;
        let matched = greedy_pairs(pairs, found.len(), field.cells.len());
        let sum: f64 = matched
            .iter()
            .map(|&(i, j)| side(found[i].bbox) / side(field.cells[j].bbox))
            .sum();
        sum / matched.len() as f64
    };
    let off = CellFinderConfig {
        grow_steps: 0,
        ..CellFinderConfig::default()
    };
    for name in ["giemsa_60x", "field_40x"] {
        let mut source = SourcePreset::by_name(name).unwrap();
        set_touching(std::slice::from_mut(&mut source), 0.0).unwrap();
        for class in ["schistocyte", "echinocyte", "dacrocyte"] {
            let c = DEFAULT_CLASSES.iter().position(|n| *n == class).unwrap();
            let (plain, grown) = (
                ratio(&off, &source, c),
                ratio(&CellFinderConfig::default(), &source, c),
            );
            eprintln!("{name} {class}: box side / true side {plain:.3} -> {grown:.3}");
            assert!(
                grown > plain + 0.01 && grown < 1.01,
                "{name} {class}: {plain:.3} -> {grown:.3}"
            );
        }
    }
}

const BACKGROUND: [u8; 3] = [235, 228, 232];
const STAIN: [u8; 3] = [185, 95, 115];

/// A field of `w` x `h` with the pixels for which `cell` holds stained.
fn field(w: u32, h: u32, cell: impl Fn(f32, f32) -> bool) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb(if cell(x as f32 + 0.5, y as f32 + 0.5) {
            STAIN
        } else {
            BACKGROUND
        })
    })
}

#[test]
fn specks_that_outnumber_the_cells_are_debris() {
    // Four cells (radius 18) and, between them, sixty specks of stain (radius 3): wide enough
    // to pass the opening, and so many that the median object is a speck.
    let cells = [(60.0, 60.0), (180.0, 60.0), (60.0, 260.0), (180.0, 260.0)];
    let at = |i: u16| {
        (
            f32::from(12 + 24 * (i % 10)),
            f32::from(112 + 16 * (i / 10)),
        )
    };
    let specks: Vec<(f32, f32)> = (0..60).map(at).collect();
    let img = field(240, 320, |x, y| {
        cells.iter().any(|c| (x - c.0).hypot(y - c.1) <= 18.0)
            || specks.iter().any(|s| (x - s.0).hypot(y - s.1) <= 3.0)
    });
    let truth: Vec<((f32, f32), f32)> = cells.iter().map(|&c| (c, 18.0)).collect();
    let score = |cfg: &CellFinderConfig| {
        let found: Vec<(f32, f32)> = find(&img, cfg).iter().map(|c| c.center).collect();
        match_centres(&found, &truth)
    };
    let real = score(&CellFinderConfig::real_smear());
    assert_eq!((real.true_positives, real.detections), (4, 4), "{real:?}");
    // Against the median object alone, the specks stay.
    let median_only = score(&CellFinderConfig {
        min_cell_fraction: 0.0,
        ..CellFinderConfig::real_smear()
    });
    assert_eq!(median_only.true_positives, 4, "{median_only:?}");
    assert!(median_only.detections > 50, "{median_only:?}");
}

#[test]
fn opaque_grey_marks_are_no_cells_and_the_cells_against_them_stay() {
    // Six cells (radius 18); a near-black needle 9 pixels wide (an eyepiece pointer) lying
    // across the bottoms of the top three, and a black bar (a scale bar) apart below.
    let cells = [(60.0, 60.0), (180.0, 60.0), (300.0, 60.0)];
    let cells: Vec<(f32, f32)> = cells
        .iter()
        .chain(&[(60.0, 200.0), (180.0, 200.0), (300.0, 200.0)])
        .copied()
        .collect();
    let img = RgbImage::from_fn(360, 300, |x, y| {
        let (x, y) = (x as f32 + 0.5, y as f32 + 0.5);
        let needle = (20.0..340.0).contains(&x) && (75.0..84.0).contains(&y);
        let bar = (150.0..220.0).contains(&x) && (260.0..268.0).contains(&y);
        image::Rgb(if needle || bar {
            [22, 22, 28]
        } else if cells.iter().any(|c| (x - c.0).hypot(y - c.1) <= 18.0) {
            STAIN
        } else {
            BACKGROUND
        })
    });
    let truth: Vec<((f32, f32), f32)> = cells.iter().map(|&c| (c, 18.0)).collect();
    let score = |cfg: &CellFinderConfig| {
        let found: Vec<(f32, f32)> = find(&img, cfg).iter().map(|c| c.center).collect();
        match_centres(&found, &truth)
    };
    let real = score(&CellFinderConfig::real_smear());
    assert_eq!((real.true_positives, real.detections), (6, 6), "{real:?}");
    // The marks are found side by side on the pool's threads: the same cells and pixels.
    let cfg = CellFinderConfig::real_smear();
    assert!(find_on(1, &img, &cfg) == find_on(3, &img, &cfg));
    // Kept, the marks' basins are counted as cells.
    let kept = score(&CellFinderConfig {
        drop_neutral: 0.0,
        ..CellFinderConfig::real_smear()
    });
    assert!(kept.detections > 6, "{kept:?}");
}

#[test]
fn a_pallor_behind_a_broken_rim_is_filled() {
    // A ring cell (rim 7 pixels wide, pallor as bright as the background) whose rim is cut
    // by a 4-pixel slit from its pallor to the outside (wider than smoothing shuts).
    let img = field(120, 120, |x, y| {
        let d = (x - 60.0).hypot(y - 60.0);
        let slit = x > 60.0 && (y - 60.0).abs() < 2.0;
        (14.0..=21.0).contains(&d) && !slit
    });
    let disc = std::f32::consts::PI * 21.0 * 21.0;
    // Unsmoothed: on a noiseless field the smoothed density grows every cell by a pixel.
    let real = CellFinderConfig {
        smooth: false,
        ..CellFinderConfig::real_smear()
    };
    let closed = find(&img, &real);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert!(closed[0].area as f32 > 0.9 * disc, "{closed:?}");
    let open = find(
        &img,
        &CellFinderConfig {
            close_gaps: 0,
            ..real
        },
    );
    let area: u32 = open.iter().map(|c| c.area).sum();
    assert!((area as f32) < 0.75 * disc, "without closing: {open:?}");
}

#[test]
fn a_clump_of_overlapping_cells_is_split_into_its_cells() {
    // Lone cells set the typical size; three cells overlapping in a row leave only shallow
    // saddles between their distance peaks.
    let mut centres = vec![(40.0, 40.0), (120.0, 40.0), (200.0, 40.0), (280.0, 40.0)];
    centres.extend([(100.0, 130.0), (111.0, 130.0), (122.0, 130.0)]);
    let img = field(320, 180, |x, y| {
        centres.iter().any(|c| (x - c.0).hypot(y - c.1) <= 16.0)
    });
    let truth: Vec<((f32, f32), f32)> = centres.iter().map(|&c| (c, 16.0)).collect();
    let score = |cfg: &CellFinderConfig| {
        let found: Vec<(f32, f32)> = find(&img, cfg).iter().map(|c| c.center).collect();
        match_centres(&found, &truth)
    };
    let split = score(&CellFinderConfig::real_smear());
    assert_eq!(split.true_positives, 7, "{split:?}");
    assert_eq!(split.detections, 7, "{split:?}");
    let whole = score(&CellFinderConfig {
        clump_area: 0.0,
        ..CellFinderConfig::real_smear()
    });
    assert!(
        whole.true_positives < 7,
        "without the clump split: {whole:?}"
    );
}

#[test]
fn background_blocks_follow_the_cells_size() {
    // A 40x field: small packed cells, some twenty to a block of 96 pixels, against about
    // two to a block of 2.4 radii (30 pixels).
    let field = field_40x(1280, 960, 1000);
    let truth: Vec<((f32, f32), f32)> = field.cells.iter().map(|c| (c.center, c.radius)).collect();
    let score = |cfg: &CellFinderConfig| {
        let found: Vec<(f32, f32)> = find(&field.image, cfg).iter().map(|c| c.center).collect();
        match_centres(&found, &truth)
    };
    let scaled = score(&CellFinderConfig::real_smear());
    let fixed = score(&CellFinderConfig {
        background_radii: 0.0,
        ..CellFinderConfig::real_smear()
    });
    assert!(
        scaled.true_positives >= fixed.true_positives + 4,
        "blocks scaled to the cells {scaled:?}, fixed blocks {fixed:?}"
    );
    assert!(scaled.precision() >= 0.98, "{scaled:?}");
}

#[test]
fn a_known_pixel_size_sets_the_background_blocks() {
    // 0.3 um per pixel: cells of radius 12.5 pixels, blocks of 2.4 radii (30 pixels) from the
    // start, with no first look.
    let field = field_40x(640, 480, 1001);
    let known = CellFinderConfig {
        um_per_px: 0.3,
        ..CellFinderConfig::real_smear()
    };
    let centres = |cfg: &CellFinderConfig| -> Vec<(f32, f32)> {
        find(&field.image, cfg).iter().map(|c| c.center).collect()
    };
    let scaled = centres(&known);
    let fixed = |block| {
        centres(&CellFinderConfig {
            background_radii: 0.0,
            background_block: block,
            ..known.clone()
        })
    };
    assert_eq!(scaled, fixed(30));
    assert_ne!(
        scaled,
        fixed(96),
        "the blocks' size changes the cells found"
    );
}

#[test]
fn light_falling_off_to_the_edge_is_no_stain_at_the_edge() {
    // No cells: the light falls from 230 at the left edge by a tenth over the width (and a
    // little down the rows). A block's 90th percentile is its bright side's light, the same
    // bias in every block; held at the outer blocks' beyond their centres, the background at
    // the dim edges is the light half a block in, and the edge reads as stain.
    let (w, h) = (384u32, 320u32); // whole blocks of 64
    let img = RgbImage::from_fn(w, h, |x, y| {
        let v = 230.0 * (1.0 - 0.1 * x as f32 / w as f32 - 0.02 * y as f32 / h as f32);
        image::Rgb([v.round() as u8; 3])
    });
    let ln = foreground::ln_table();
    // The density over the last four columns, against that over the frame's middle.
    let edge_excess = |extrapolate: bool| {
        let bg = foreground::Background::of(&img, 64, 1.0, extrapolate);
        let od = foreground::optical_density(&img, &bg, &ln, [1.0; 3]);
        let mean = |x0: u32, x1: u32| {
            let mut sum = 0.0;
            for y in 0..h {
                for x in x0..x1 {
                    sum += od[(y * w + x) as usize];
                }
            }
            sum / ((x1 - x0) * h) as f32
        };
        mean(w - 4, w) - mean(w / 2 - 2, w / 2 + 2)
    };
    let followed = edge_excess(true);
    assert!(
        followed.abs() < 0.006,
        "{followed} over the middle's density"
    );
    // Held at the outer block's light from its centre on, 30 px before the edge: about 0.008
    // per channel.
    let held = edge_excess(false);
    assert!(
        held > 0.015,
        "{held} over the middle's density with the light held"
    );
}

#[test]
fn channels_are_weighed_by_their_contrast_over_noise() {
    // Pale cells that darken green alone, on a sensor whose red and blue are noisy.
    let noise = |x: u32, y: u32, c: u32| {
        let mut v = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ (c * 83_492_791))
            .wrapping_mul(2_654_435_761);
        v ^= v >> 15;
        (v % 31) as i32 - 15
    };
    let centres = [(50.0, 50.0), (130.0, 50.0), (50.0, 130.0), (130.0, 130.0)];
    let img = RgbImage::from_fn(180, 180, |x, y| {
        let inside = centres
            .iter()
            .any(|c: &(f32, f32)| (x as f32 + 0.5 - c.0).hypot(y as f32 + 0.5 - c.1) <= 18.0);
        let g = if inside { 200 } else { 228 } + noise(x, y, 1) / 5;
        image::Rgb([
            (220 + noise(x, y, 0)) as u8,
            g as u8,
            (220 + noise(x, y, 2)) as u8,
        ])
    });
    let truth: Vec<((f32, f32), f32)> = centres.iter().map(|&c| (c, 18.0)).collect();
    let score = |weigh: bool| {
        let cfg = CellFinderConfig {
            weigh_channels: weigh,
            smooth: false,
            ..CellFinderConfig::real_smear()
        };
        let found: Vec<(f32, f32)> = find(&img, &cfg).iter().map(|c| c.center).collect();
        match_centres(&found, &truth)
    };
    let weighed = score(true);
    assert_eq!(
        (weighed.true_positives, weighed.detections),
        (4, 4),
        "{weighed:?}"
    );
    let summed = score(false);
    assert!(summed.true_positives < 4, "summed channels: {summed:?}");
}

#[test]
fn channel_weights_from_bins_counted_with_the_samples_are_the_weights_of_the_samples() {
    // Against the weights computed from collected samples, one histogram at a time: the
    // sample fields and noisy drawn fields of odd sizes (cells pale in green, strong in all
    // channels, none), on one and three threads, with the background's blocks of both looks.
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/chula-rbc-12");
    let mut imgs: Vec<RgbImage> = ["1", "222", "34", "42"]
        .iter()
        .map(|f| {
            image::open(format!("{data}/images/{f}.jpg"))
                .unwrap()
                .to_rgb8()
        })
        .collect();
    let mut next_u32 = lcg(5);
    for (w, h, shade) in [
        (181, 97, [0, 30, 0]),
        (64, 9, [40, 60, 30]),
        (300, 211, [0, 0, 0]),
        (17, 15, [5, 25, 5]),
    ] {
        let mask = random_blobs(&mut next_u32, w, h, w * h / 400 + 1, 80, 2);
        let noise: Vec<u32> = (0..w * h * 3).map(|_| next_u32() % 21).collect();
        imgs.push(RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb(std::array::from_fn(|c| {
                (215 + noise[i * 3 + c] - shade[c] * mask[i] as u32) as u8
            }))
        }));
    }
    let ln = foreground::ln_table();
    for (k, img) in imgs.iter().enumerate() {
        for block in [96, 48] {
            let bg = foreground::Background::of(img, block, 0.2, false);
            let want = reference_channel_weights(img, &bg, &ln);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| foreground::channel_weights(img, &bg, &ln));
                assert_eq!(
                    got.map(f32::to_bits),
                    want.map(f32::to_bits),
                    "image {k}, blocks of {block}, {threads} threads: {got:?} against {want:?}"
                );
            }
        }
    }
}

/// The channel weights as they were computed before their histograms were counted with the
/// samples: the samples collected, then each histogram from a copy of its values.
fn reference_channel_weights(
    img: &RgbImage,
    bg: &foreground::Background,
    ln: &[f32; 256],
) -> [f32; 3] {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    // Rows of 2x2 means side by side (each row's in order: the same samples on any pool).
    let (sw, sh) = (w / 2, h / 2);
    let mut samples: Vec<[f32; 3]> = vec![[0f32; 3]; sw * sh];
    samples
        .par_chunks_mut(sw.max(1))
        .enumerate()
        .for_each(|(sy, out)| {
            let y = 2 * sy;
            let b = bg.row(y);
            for (sx, o) in out.iter_mut().enumerate() {
                let x = 2 * sx;
                let bb = &b[(x / bg.block as usize).min(bg.gw - 1)];
                let mut v = [0f32; 3];
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let i = ((y + dy) * w + x + dx) * 3;
                    for c in 0..3 {
                        v[c] += bb[c] - ln[raw[i + c] as usize];
                    }
                }
                *o = v.map(|s| s * 0.25);
            }
        });
    const PLAIN: [f32; 3] = [1.0, 1.0, 1.0];
    if samples.len() < 64 {
        return PLAIN;
    }
    let sums: Vec<f32> = samples.iter().map(|v| v[0] + v[1] + v[2]).collect();
    let (mode, sigma) = foreground::mode_and_noise(&sums);
    let stained = mode + 6.0 * sigma.max(1e-3);
    let mut signal = [0f64; 3];
    let mut n = 0usize;
    for (v, &s) in samples.iter().zip(&sums) {
        if s > stained {
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
        let channel: Vec<f32> = samples.iter().map(|v| v[c]).collect();
        let (m, noise) = foreground::mode_and_noise(&channel);
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

#[test]
fn the_vectorised_box_mean_is_the_box_mean_it_replaces() {
    // Against the mean summed over each pixel's neighbours slice by slice, bit for bit: maps
    // one to three pixels wide or high and larger ones, values of both signs, on one and three
    // threads.
    let mut next_u32 = lcg(17);
    for (w, h) in [
        (1, 1),
        (1, 5),
        (5, 1),
        (2, 2),
        (3, 3),
        (2, 7),
        (64, 3),
        (37, 41),
        (640, 48),
    ] {
        let v: Vec<f32> = (0..w * h)
            .map(|_| (next_u32() % 100_000) as f32 / 12_345.0 - 2.5)
            .collect();
        let want = reference_box3(&v, w);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| foreground::box3(&v, w));
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{w}x{h} on {threads} threads"
            );
        }
    }
}

/// The 3x3 mean as it was before its rows and columns were summed from slices side by side.
fn reference_box3(v: &[f32], w: usize) -> Vec<f32> {
    let h = v.len() / w;
    let mut rows = vec![0f32; v.len()];
    let pairs = v.par_chunks_exact(w).zip(rows.par_chunks_exact_mut(w));
    pairs.for_each(|(src, dst)| {
        for (x, d) in dst.iter_mut().enumerate() {
            let (a, b) = (x.saturating_sub(1), (x + 2).min(w));
            *d = src[a..b].iter().sum::<f32>() / (b - a) as f32;
        }
    });
    let mut out = vec![0f32; v.len()];
    out.par_chunks_exact_mut(w)
        .enumerate()
        .for_each(|(y, dst)| {
            let (a, b) = (y.saturating_sub(1), (y + 2).min(h));
            let k = 1.0 / (b - a) as f32;
            for yy in a..b {
                for (d, s) in dst.iter_mut().zip(&rows[yy * w..(yy + 1) * w]) {
                    *d += s;
                }
            }
            dst.iter_mut().for_each(|d| *d *= k);
        });
    out
}

#[test]
fn the_opened_mask_in_bands_is_the_opening_of_the_whole_mask() {
    // Against the erosion and dilation of the whole mask, row pass then column pass: random
    // masks one to three pixels wide or high, shorter and longer than a band, with and without
    // a band's worth of rows left over, on one and three threads; and the filter alone.
    let mut next_u32 = lcg(23);
    for (w, h) in [
        (1, 1),
        (1, 40),
        (40, 1),
        (2, 2),
        (3, 3),
        (7, 31),
        (9, 32),
        (33, 33),
        (50, 97),
        (640, 70),
    ] {
        for density in [20, 50, 80] {
            let mask: Vec<u8> = (0..w * h)
                .map(|_| (next_u32() % 100 < density) as u8)
                .collect();
            let eroded = reference_filter3(&mask, w, true);
            assert_eq!(
                foreground::filter3(&mask, w, true),
                eroded,
                "{w}x{h} eroded"
            );
            assert_eq!(
                foreground::filter3(&mask, w, false),
                reference_filter3(&mask, w, false),
                "{w}x{h} dilated"
            );
            let want = reference_filter3(&eroded, w, false);
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| {
                    foreground::opened_mask(w, h, |y, row| {
                        row.copy_from_slice(&mask[y * w..(y + 1) * w])
                    })
                });
                assert_eq!(got, want, "{w}x{h} at {density}% on {threads} threads");
            }
        }
    }
}

/// The 3x3 filter as it was before the rows of a band were filtered on their own: rows, then
/// columns, over the whole mask.
fn reference_filter3(mask: &[u8], w: usize, erode: bool) -> Vec<u8> {
    // One copy of the loops per filter: the pick inlines and the rows vectorise.
    if erode {
        reference_filter3_with(mask, w, u8::min, false)
    } else {
        reference_filter3_with(mask, w, u8::max, false)
    }
}

#[inline(always)]
fn reference_filter3_with(
    mask: &[u8],
    w: usize,
    pick: impl Fn(u8, u8) -> u8 + Copy + Sync,
    parallel: bool,
) -> Vec<u8> {
    let h = mask.len() / w;
    // Rows: each pixel with its left and right neighbours (the frame edge counts as neither).
    let row = |(src, dst): (&[u8], &mut [u8])| {
        dst.copy_from_slice(src);
        if w > 1 {
            for (d, (&l, &r)) in dst[1..w - 1]
                .iter_mut()
                .zip(src[..w - 2].iter().zip(&src[2..]))
            {
                *d = pick(*d, pick(l, r));
            }
            dst[0] = pick(src[0], src[1]);
            dst[w - 1] = pick(src[w - 1], src[w - 2]);
        }
    };
    let mut tmp = vec![0u8; mask.len()];
    if parallel {
        let rows = mask.par_chunks_exact(w).zip(tmp.par_chunks_exact_mut(w));
        rows.for_each(row);
    } else {
        mask.chunks_exact(w)
            .zip(tmp.chunks_exact_mut(w))
            .for_each(row);
    }
    // Columns: each row with the rows above and below.
    let tmp = &tmp;
    let col = |(y, dst): (usize, &mut [u8])| {
        dst.copy_from_slice(&tmp[y * w..(y + 1) * w]);
        if y > 0 {
            for (d, &s) in dst.iter_mut().zip(&tmp[(y - 1) * w..y * w]) {
                *d = pick(*d, s);
            }
        }
        if y + 1 < h {
            for (d, &s) in dst.iter_mut().zip(&tmp[(y + 1) * w..(y + 2) * w]) {
                *d = pick(*d, s);
            }
        }
    };
    let mut out = vec![0u8; mask.len()];
    if parallel {
        out.par_chunks_exact_mut(w).enumerate().for_each(col);
    } else {
        out.chunks_exact_mut(w).enumerate().for_each(col);
    }
    out
}

/// Fills the pallor of a cell whose stained rim is broken by gaps up to `2 x radius` pixels

#[test]
fn tiles_cover_the_frame_without_overlap() {
    let t = tiles(500, 300, 224);
    assert_eq!(t.len(), 2);
    assert_eq!(t[1].bbox, [224, 0, 448, 224]);
}

#[test]
fn blank_and_tiny_frames_have_no_cells() {
    let img = RgbImage::from_pixel(200, 100, image::Rgb([230, 230, 230]));
    assert!(find(&img, &CellFinderConfig::default()).is_empty());
    assert!(find(&RgbImage::new(2, 2), &CellFinderConfig::default()).is_empty());
}

/// Finds `img`'s cells and owner map on a pool of `threads` threads.
fn find_on(threads: usize, img: &RgbImage, cfg: &CellFinderConfig) -> (Vec<Cell>, OwnerMap) {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(|| find_with_owners(img, cfg))
}

#[test]
fn the_same_cells_and_pixels_on_any_number_of_threads() {
    let real = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/chula-rbc-12/images"
    );
    let mut fields: Vec<(RgbImage, CellFinderConfig)> = ["1.jpg", "222.jpg"]
        .iter()
        .map(|f| {
            let img = image::open(format!("{real}/{f}")).unwrap().to_rgb8();
            (img, CellFinderConfig::real_smear())
        })
        .collect();
    for (i, source) in SourcePreset::all().into_iter().take(3).enumerate() {
        let field = render(&FieldSpec::new(640, 480, 300 + i as u64, source)).unwrap();
        fields.push((field.image, CellFinderConfig::default()));
    }
    for (k, (img, cfg)) in fields.iter().enumerate() {
        let one = find_on(1, img, cfg);
        assert!(one.0.len() > 20, "field {k}: {} cells", one.0.len());
        for threads in [2, 5] {
            let many = find_on(threads, img, cfg);
            assert!(
                one.0 == many.0,
                "field {k}: cells differ on {threads} threads"
            );
            assert!(
                one.1 == many.1,
                "field {k}: owner maps differ on {threads} threads"
            );
        }
    }
}

#[test]
fn an_object_reaching_into_a_ring_through_its_gap_keeps_only_its_outer_part() {
    // A ring (radii 11-15 around (30, 30)) open at the bottom by a 5 px gap, and a 1 px bar
    // from inside the ring out through the gap, touching the ring nowhere. Closing the
    // ring's gap (radius 3) fills the ring's inside, and the bar's part there with it; the
    // rest of the bar is an object of its own, however the components are built.
    let (w, h) = (60usize, 64usize);
    let mut mask = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f32 - 30.0, y as f32 - 30.0);
            let r = (dx * dx + dy * dy).sqrt();
            let gap = (28..=32).contains(&x) && y > 30;
            if (11.0..=15.0).contains(&r) && !gap {
                mask[y * w + x] = 1;
            }
        }
    }
    let bar: Vec<usize> = (22..60).map(|y| y * w + 30).collect();
    for &j in &bar {
        mask[j] = 1;
    }
    for threads in [1, 3] {
        let objs = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| watershed::objects(&mask, w, 3, usize::MAX));
        assert_eq!(
            objs.len(),
            2,
            "{threads} threads: the ring and the bar's outer part"
        );
        let (ring, rest) = (&objs[0], &objs[1]);
        // The bar's inner part (y 22..=37, inside the inner radius 11 of the ring's hole) is
        // the ring's; the outer part starts below it.
        assert!(
            rest.y0 + 4 > 38,
            "{threads} threads: the rest starts at y {}",
            rest.y0 + 4
        );
        assert_eq!(rest.x0 + 4, 30, "{threads} threads: the bar's column");
        assert_eq!(
            rest.area,
            60 - (rest.y0 + 4),
            "{threads} threads: rest of {}",
            rest.area
        );
        assert!(
            ring.area > 600,
            "{threads} threads: the ring with its inside, {}",
            ring.area
        );
    }
}

#[test]
fn components_from_runs_are_the_flood_fills_of_the_mask() {
    // Random masks of every density, against a flood fill from each unvisited pixel in
    // raster order (8-connected): the same components, in the same order.
    let mut next_u32 = lcg(11);
    for round in 0..60 {
        let (w, h) = (1 + next_u32() as usize % 40, 1 + next_u32() as usize % 30);
        let p = [10, 30, 50, 70, 95][round % 5];
        let mask: Vec<u8> = (0..w * h).map(|_| (next_u32() % 100 < p) as u8).collect();
        let mut want: Vec<Vec<usize>> = Vec::new();
        let mut seen = vec![false; w * h];
        for start in 0..w * h {
            if mask[start] == 0 || seen[start] {
                continue;
            }
            seen[start] = true;
            let mut comp = vec![start];
            let mut next = 0;
            while next < comp.len() {
                let (x, y) = (comp[next] % w, comp[next] / w);
                next += 1;
                for ny in y.saturating_sub(1)..(y + 2).min(h) {
                    for nx in x.saturating_sub(1)..(x + 2).min(w) {
                        let j = ny * w + nx;
                        if mask[j] != 0 && !seen[j] {
                            seen[j] = true;
                            comp.push(j);
                        }
                    }
                }
            }
            comp.sort_unstable();
            want.push(comp);
        }
        let (runs, comps) = watershed::components(&mask, w);
        let got: Vec<Vec<usize>> = comps
            .iter()
            .map(|c| {
                let mut px: Vec<usize> = runs[c.clone()]
                    .iter()
                    .flat_map(|r| (r.x0..r.x1).map(move |x| r.y as usize * w + x as usize))
                    .collect();
                px.sort_unstable();
                px
            })
            .collect();
        assert_eq!(got, want, "round {round}: {w}x{h} at density {p}%");
    }
}

#[test]
fn runs_found_eight_bytes_at_a_time_are_the_runs_pixel_by_pixel() {
    // Rows of every length up to 70 (words and a remainder), of bytes 0, 1, 127, 128 and 255
    // in runs of random lengths, against the runs read pixel by pixel.
    let mut next_u32 = lcg(5);
    for round in 0..400 {
        let len = round % 71;
        let mut row = Vec::with_capacity(len);
        while row.len() < len {
            let v = [0u8, 1, 127, 128, 255][next_u32() as usize % 5];
            let n = 1 + next_u32() as usize % [1, 3, 12][round % 3];
            row.extend(std::iter::repeat_n(v, n.min(len - row.len())));
        }
        // The scan first, both ways (a wrong one could keep `push_runs` in place).
        for foreground in [true, false] {
            for from in 0..len {
                let want = row[from..].iter().position(|&v| (v != 0) == foreground);
                assert_eq!(watershed::first_byte(&row[from..], foreground), want);
            }
        }
        for foreground in [true, false] {
            let mut want = Vec::new();
            let mut x = 0;
            while x < len {
                if (row[x] != 0) != foreground {
                    x += 1;
                    continue;
                }
                let x0 = x;
                while x < len && (row[x] != 0) == foreground {
                    x += 1;
                }
                want.push((x0 as u32, x as u32));
            }
            let mut got = Vec::new();
            watershed::push_runs(&row, 3, foreground, &mut got);
            assert!(got.iter().all(|r| r.y == 3));
            let got: Vec<(u32, u32)> = got.iter().map(|r| (r.x0, r.x1)).collect();
            assert_eq!(got, want, "{row:?}, foreground {foreground}");
        }
    }
}

#[test]
fn a_row_of_pixels_adds_to_a_basin_as_its_pixels_one_by_one() {
    // Runs anywhere in a frame (its edges included), against `add` of each pixel: the same
    // box, area, border flag and centre.
    let mut next_u32 = lcg(9);
    let (w, h) = (97u32, 31u32);
    for _ in 0..300 {
        let (mut runs, mut pixels) = (Acc::EMPTY, Acc::EMPTY);
        for _ in 0..1 + next_u32() % 6 {
            let y = next_u32() % h;
            let x0 = next_u32() % w;
            let x1 = x0 + 1 + next_u32() % (w - x0);
            runs.add_run(x0, x1, y, w, h);
            for x in x0..x1 {
                pixels.add(x, y, w, h);
            }
        }
        let key = |a: &Acc| (a.x0, a.y0, a.x1, a.y1, a.sx, a.sy, a.n, a.border);
        assert_eq!(key(&runs), key(&pixels));
        assert_eq!(runs.centre(), pixels.centre());
        // The centre as it was computed before: `x + 0.5` summed in f64 pixel by pixel.
        let mut a = Acc::EMPTY;
        let (mut sx, mut sy) = (0f64, 0f64);
        for _ in 0..1 + next_u32() % 2000 {
            let (x, y) = (next_u32() % 4000, next_u32() % 3000);
            a.add(x, y, 4000, 3000);
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
        }
        let n = a.n as f64;
        assert_eq!(a.centre(), ((sx / n) as f32, (sy / n) as f32));
    }
}

#[test]
fn the_objects_are_the_objects_of_a_scan_of_the_whole_mask() {
    // Rings (some broken, some with a dot or a blob inside, some touching) over speckled
    // blobs, against the plain scan: a flood from each unvisited mask pixel in raster order,
    // its object built, and every pixel of its filled window visited. The same objects in the
    // same order, with and without closing the rims' gaps, with every hole filled or only
    // small ones.
    let mut next_u32 = lcg(23);
    for round in 0..40 {
        let (w, h) = (20 + next_u32() as usize % 60, 20 + next_u32() as usize % 50);
        let mut mask = random_blobs(&mut next_u32, w, h, 2 + round % 4, 40, [0, 2, 6][round % 3]);
        for _ in 0..1 + next_u32() % 5 {
            let (cx, cy) = (
                (next_u32() as usize % w) as f32,
                (next_u32() as usize % h) as f32,
            );
            let outer = 5.0 + (next_u32() % 60) as f32 / 10.0;
            let inner = outer - 1.5 - (next_u32() % 20) as f32 / 10.0;
            let gap = next_u32() % 2 == 0;
            let dot = next_u32() % 2 == 0;
            // A bar from inside the ring out through its gap: partly inside the filled ring
            // when the gap is closed.
            let bar = gap && next_u32() % 2 == 0;
            for y in 0..h {
                for x in 0..w {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let d = (dx * dx + dy * dy).sqrt();
                    let on_ring = d <= outer && d >= inner && !(gap && dx > 0.0 && dy.abs() < 2.5);
                    let on_bar = bar && dy.abs() < 0.5 && dx >= 0.0 && dx <= outer + 4.0;
                    if on_ring || on_bar || (dot && d <= 1.5) {
                        mask[y * w + x] = 1;
                    }
                }
            }
        }
        for close_gaps in [0, 2] {
            for max_hole in [usize::MAX, 12, 40] {
                let got = watershed::objects(&mask, w, close_gaps, max_hole);
                let want = reference_objects(&mask, w, close_gaps, max_hole);
                let key = |o: &watershed::Object| {
                    (
                        o.x0,
                        o.y0,
                        o.w,
                        o.h,
                        o.dt2.clone(),
                        o.peak,
                        o.largest_hole,
                        o.area,
                    )
                };
                let got: Vec<_> = got.iter().map(key).collect();
                let want: Vec<_> = want.iter().map(key).collect();
                assert_eq!(
                    got, want,
                    "round {round}, close_gaps {close_gaps}, max_hole {max_hole}"
                );
            }
        }
    }
}

/// The objects of `mask` as a scan alone finds them.
fn reference_objects(
    mask: &[u8],
    w: usize,
    close_gaps: u32,
    max_hole: usize,
) -> Vec<watershed::Object> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut pixels = vec![((start % w) as u32, (start / w) as u32)];
        watershed::spread(mask, w, &mut pixels, 0, |j| {
            !std::mem::replace(&mut seen[j], true)
        });
        let runs: Vec<watershed::Run> = pixels
            .iter()
            .map(|&(x, y)| watershed::Run {
                y,
                x0: x,
                x1: x + 1,
            })
            .collect();
        let (obj, local) = watershed::build_object(&runs, mask, w, close_gaps, max_hole);
        for ly in 0..obj.h {
            for lx in 0..obj.w {
                if local[ly * obj.w + lx] != 0 {
                    seen[(obj.y0 + ly) * w + obj.x0 + lx] = true;
                }
            }
        }
        out.push(obj);
    }
    out
}

#[test]
fn density_histograms_count_each_value_in_its_bin() {
    // Against one bin per value computed the plain way: values below, inside and above the
    // range, on bin edges, NaN and infinities, and lengths that leave partial blocks.
    let mut next_u32 = lcg(11);
    for (round, len) in [0usize, 1, 3, 63, 64, 65, 1000, 70_001]
        .into_iter()
        .enumerate()
    {
        let (bins, scale) = if round % 2 == 0 {
            (1024, 128.0)
        } else {
            (8192, 1024.0)
        };
        let values: Vec<f32> = (0..len)
            .map(|i| match i % 11 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => f32::NEG_INFINITY,
                3 => -foreground::HIST_OFFSET - 1.0,
                4 => (next_u32() % bins as u32) as f32 / scale - foreground::HIST_OFFSET,
                5 => 1e9,
                _ => (next_u32() % 20_000) as f32 / 2_000.0 - 3.0,
            })
            .collect();
        let mut want = vec![0u32; bins];
        for &v in &values {
            let b = (((v + foreground::HIST_OFFSET) * scale).max(0.0) as usize).min(bins - 1);
            want[b] += 1;
        }
        let got = foreground::density_histogram(&values, bins, scale);
        assert_eq!(got, want, "{len} values in {bins} bins");
    }
}

#[test]
fn the_distance_transform_is_exact() {
    // Random masks against the brute-force nearest background pixel (squared Euclidean); rows
    // up to 50 wide (every run short) and up to 200 (long runs take the envelope).
    let mut next_u32 = lcg(3);
    let here = distance::Lanes::here();
    for round in 0..80 {
        let widest = if round % 2 == 0 { 50 } else { 200 };
        let (w, h) = (
            1 + next_u32() as usize % widest,
            1 + next_u32() as usize % 40,
        );
        let p = [50, 80, 95, 99, 100][round % 5];
        let mask: Vec<u8> = (0..w * h).map(|_| (next_u32() % 100 < p) as u8).collect();
        let got = distance::squared_distance_with(&mask, w, distance::Lanes::None);
        for lanes in [here, distance::Lanes::Plain] {
            let other = distance::squared_distance_with(&mask, w, lanes);
            assert_eq!(
                other, got,
                "round {round}: {w}x{h}, {lanes:?} against the envelope"
            );
        }
        let background: Vec<(i64, i64)> = (0..w * h)
            .filter(|&i| mask[i] == 0)
            .map(|i| ((i % w) as i64, (i / w) as i64))
            .collect();
        for i in 0..w * h {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            let want = if mask[i] == 0 {
                0
            } else {
                background
                    .iter()
                    .map(|&(bx, by)| ((bx - x).pow(2) + (by - y).pow(2)) as u32)
                    .min()
                    .unwrap_or(u32::MAX)
            };
            assert_eq!(got[i], want, "round {round}: {w}x{h} at ({x}, {y})");
        }
    }
}

#[test]
fn an_object_with_one_seed_is_one_basin_as_the_flood_makes_it() {
    // Random blobs (discs, touching pairs, noisy outlines): where the flood starts a single
    // basin, the short cut gives the flood's labels; both kinds of object occur (specks
    // aside).
    let mut next_u32 = lcg(5);
    let (mut single, mut several) = (0, 0);
    for round in 0..300 {
        let (w, h) = (12 + next_u32() as usize % 50, 12 + next_u32() as usize % 40);
        let mask = random_blobs(
            &mut next_u32,
            w,
            h,
            1 + round % 3,
            80,
            2 * (round % 3) as u32,
        );
        for obj in watershed::objects(&mask, w, 0, usize::MAX) {
            match (watershed::single_seed(&obj), obj.area >= 30) {
                (true, true) => single += 1,
                (false, _) => several += 1,
                (true, false) => {} // specks
            }
            // Clumps off, and on (a small typical cell: most blobs are clumps).
            for (cell, clump_area) in [(0.0, 0.0), (40.0, 1.3)] {
                let want = watershed::flood_and_split_clump(&obj, 1.2, cell, clump_area);
                let got = watershed::flood_clump(&obj, 1.2, cell, clump_area);
                assert_eq!(got, want, "round {round}: clump {cell} x {clump_area}");
            }
        }
    }
    assert!(
        single > 50 && several > 50,
        "{single} single, {several} several"
    );
}

#[test]
fn the_replayed_flood_and_the_counted_merges_match_the_floods_and_merges_they_replace() {
    // Random blobs (discs, touching clumps, noisy outlines), flooded at several dynamics and
    // their small basins merged at several sizes: labels and counts exactly as one flood per
    // dynamics and one pass over the window per merge give them; objects with several basins,
    // and merges, occur.
    let mut next_u32 = lcg(11);
    let (mut meetings, mut merged) = (0, 0);
    for round in 0..200 {
        let (w, h) = (16 + next_u32() as usize % 60, 16 + next_u32() as usize % 50);
        let mask = random_blobs(
            &mut next_u32,
            w,
            h,
            1 + round % 5,
            90,
            2 * (round % 3) as u32,
        );
        for obj in watershed::objects(&mask, w, 0, usize::MAX) {
            let order = watershed::flood_order(&obj);
            let drain = watershed::Drain::of(&obj, &order);
            for h_dyn in [0.15, 0.3, 0.6, 1.2, 2.4] {
                let want = reference_flood(&obj, &order, h_dyn);
                let got = drain.flood(h_dyn);
                assert_eq!(got, want, "round {round}: dynamics {h_dyn}");
                let basins = got
                    .0
                    .iter()
                    .filter(|&&l| l != u32::MAX)
                    .collect::<std::collections::HashSet<_>>();
                meetings += (basins.len() > 1) as usize;
                for min_px in [4, 16, 60] {
                    let (mut a, mut b) = (got.0.clone(), got.0.clone());
                    let n = reference_merge_small(&mut a, got.1, obj.w, min_px);
                    let m = watershed::merge_small(&mut b, got.1, obj.w, min_px);
                    assert_eq!(
                        (m, &b),
                        (n, &a),
                        "round {round}: dynamics {h_dyn}, {min_px} px"
                    );
                    merged += (n < basins.len()) as usize;
                }
            }
        }
    }
    assert!(
        meetings > 100 && merged > 50,
        "{meetings} floods of several basins, {merged} merges"
    );
}

/// The merge as first written, for reference (one pass over the window per merge): merges each basin of fewer than `min_px` pixels into the neighbouring basin it shares the
/// most 4-connected outline with (smallest first), and renumbers the basins `0..n`. Returns
/// the new number of basins.
fn reference_merge_small(labels: &mut [u32], n: usize, w: usize, min_px: usize) -> usize {
    const NONE: u32 = u32::MAX;
    let h = labels.len() / w;
    loop {
        let mut size = vec![0usize; n];
        for &l in labels.iter() {
            if l != NONE {
                size[l as usize] += 1;
            }
        }
        let Some(small) = (0..n)
            .filter(|&l| size[l] > 0 && size[l] < min_px)
            .min_by_key(|&l| size[l])
        else {
            break;
        };
        let mut shared = std::collections::HashMap::<u32, usize>::new();
        for y in 0..h {
            for x in 0..w {
                if labels[y * w + x] as usize != small {
                    continue;
                }
                let mut see = |j: usize| {
                    let l = labels[j];
                    if l != NONE && l as usize != small {
                        *shared.entry(l).or_default() += 1;
                    }
                };
                if x > 0 {
                    see(y * w + x - 1);
                }
                if x + 1 < w {
                    see(y * w + x + 1);
                }
                if y > 0 {
                    see((y - 1) * w + x);
                }
                if y + 1 < h {
                    see((y + 1) * w + x);
                }
            }
        }
        let Some((&into, _)) = shared
            .iter()
            .max_by_key(|(l, c)| (**c, std::cmp::Reverse(**l)))
        else {
            // An isolated small basin: merging stops here (the debris filter judges what is
            // left small).
            break;
        };
        for l in labels.iter_mut() {
            if *l as usize == small {
                *l = into;
            }
        }
    }
    // Renumber the basins left.
    let mut map = vec![NONE; n];
    let mut next = 0u32;
    for l in labels.iter_mut() {
        if *l == NONE {
            continue;
        }
        let m = &mut map[*l as usize];
        if *m == NONE {
            *m = next;
            next += 1;
        }
        *l = *m;
    }
    next as usize
}

/// The flood as first written, for reference (one flood per dynamics): watershed of an object's distance transform by flooding from its peaks; basins whose peak
/// rises less than `h_dyn` above the level where they meet a higher basin are merged into it.
/// Pixels are visited in `order` ([`flood_order`]: from the highest distance down). Returns a
/// basin index per window pixel (`u32::MAX` off the object) and the
/// number of basins.
fn reference_flood(obj: &watershed::Object, order: &[(u32, u32)], h_dyn: f32) -> (Vec<u32>, usize) {
    let (w, h) = (obj.w, obj.h);
    // A window clipped by the frame can hold object pixels on its edge; any other has a
    // background rim, and its object pixels' neighbours need no bounds checks.
    let on_edge = |i: usize| obj.dt2[i] > 0;
    let clipped = (0..w).any(|x| on_edge(x) || on_edge((h - 1) * w + x))
        || (0..h).any(|y| on_edge(y * w) || on_edge(y * w + w - 1));
    let iw = w as isize;
    // The 3x3 neighbourhood row by row, the pixel itself included (as the bounded loops).
    let offsets = [-iw - 1, -iw, -iw + 1, -1, 0, 1, iw - 1, iw, iw + 1];
    let level_of = |d: u32| {
        if d == u32::MAX {
            f32::INFINITY
        } else {
            (d as f32).sqrt()
        }
    };
    let mut comp = vec![u32::MAX; w * h];
    let mut parent: Vec<u32> = Vec::new();
    let mut peak: Vec<f32> = Vec::new();
    let mut roots: Vec<u32> = Vec::with_capacity(8);
    for &(x, y) in order {
        let (x, y) = (x as usize, y as usize);
        let p = y * w + x;
        roots.clear();
        let mut last = u32::MAX;
        // The labelled neighbour highest on the distance map: the pixel drains to its basin.
        // (Taking the basin with the highest peak instead lets a big cell creep along the rim
        // of a smaller touching one, pixel by pixel at the rim's level.)
        let mut uphill = (0u32, u32::MAX);
        let mut around = [0usize; 9];
        let mut n = 0;
        if clipped {
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    around[n] = ny * w + nx;
                    n += 1;
                }
            }
        } else {
            for (a, o) in around.iter_mut().zip(offsets) {
                *a = (p as isize + o) as usize;
            }
            n = 9;
        }
        for &q in &around[..n] {
            let c = comp[q];
            // Labelled pixels lie on the object, where the distance is positive.
            if c != u32::MAX && obj.dt2[q] > uphill.0 {
                uphill = (obj.dt2[q], c);
            }
            // Neighbours mostly share one basin: resolve each once.
            if c != u32::MAX && c != last {
                last = c;
                let r = watershed::find_root(&mut parent, c);
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
        }
        if roots.is_empty() {
            let id = parent.len() as u32;
            parent.push(id);
            peak.push(level_of(obj.dt2[p]));
            comp[p] = id;
            continue;
        }
        if roots.len() == 1 {
            // Inside one basin (most pixels): nothing to merge.
            comp[p] = watershed::find_root(&mut parent, uphill.1);
            continue;
        }
        let level = level_of(obj.dt2[p]);
        roots.sort_unstable_by(|a, b| peak[*b as usize].total_cmp(&peak[*a as usize]));
        let best = roots[0];
        for &r in &roots[1..] {
            let pk = peak[r as usize];
            let dynamics = pk - level;
            // Small objects (platelets) touching a big one keep their own basin when they
            // rise clearly relative to their own size.
            let small_but_distinct = pk >= 2.5 && dynamics >= 1.0 && dynamics >= 0.35 * pk;
            if dynamics < h_dyn && !small_but_distinct {
                parent[r as usize] = best;
            }
        }
        comp[p] = watershed::find_root(&mut parent, uphill.1);
    }
    for c in comp.iter_mut() {
        if *c != u32::MAX {
            *c = watershed::find_root(&mut parent, *c);
        }
    }
    (comp, parent.len())
}

#[test]
fn holes_filled_from_runs_are_the_holes_a_flood_from_the_edge_leaves() {
    // Random masks (sparse to dense, blobs with pallor and rings): the same mask out and the
    // same largest hole as a pixel flood, for holes filled up to several sizes; masks with
    // holes of several sizes occur.
    let mut next_u32 = lcg(23);
    let mut with_holes = 0;
    for round in 0..400 {
        let (w, h) = (1 + next_u32() as usize % 40, 1 + next_u32() as usize % 30);
        let p = [30, 50, 60, 70, 85][round % 5];
        let mask: Vec<u8> = (0..w * h).map(|_| (next_u32() % 100 < p) as u8).collect();
        for max_area in [0, 1, 3, 10, usize::MAX] {
            let (mut a, mut b) = (mask.clone(), mask.clone());
            let want = reference_fill_holes_upto(&mut a, w, max_area);
            let got = foreground::fill_holes_upto(&mut b, w, max_area);
            assert_eq!(
                (got, &b),
                (want, &a),
                "round {round}: {w}x{h}, holes up to {max_area}"
            );
            with_holes += (max_area == usize::MAX && want > 3) as usize;
        }
    }
    assert!(
        with_holes > 20,
        "{with_holes} masks with holes over 3 pixels"
    );
}

/// Hole filling as first written, for reference: the background flooded pixel by pixel from
/// the window's edge, then each hole flooded to measure it.
fn reference_fill_holes_upto(mask: &mut [u8], w: usize, max_area: usize) -> usize {
    let h = mask.len() / w;
    const OUTSIDE: u8 = 2;
    // Pixels as (x, y): no division per pixel.
    let mut stack: Vec<(u32, u32)> = Vec::new();
    let seed = |mask: &mut [u8], x: usize, y: usize, stack: &mut Vec<(u32, u32)>| {
        let i = y * w + x;
        if mask[i] == 0 {
            mask[i] = OUTSIDE;
            stack.push((x as u32, y as u32));
        }
    };
    for x in 0..w {
        seed(mask, x, 0, &mut stack);
        seed(mask, x, h - 1, &mut stack);
    }
    for y in 0..h {
        seed(mask, 0, y, &mut stack);
        seed(mask, w - 1, y, &mut stack);
    }
    while let Some((x, y)) = stack.pop() {
        let (x, y) = (x as usize, y as usize);
        if x > 0 {
            seed(mask, x - 1, y, &mut stack);
        }
        if x + 1 < w {
            seed(mask, x + 1, y, &mut stack);
        }
        if y > 0 {
            seed(mask, x, y - 1, &mut stack);
        }
        if y + 1 < h {
            seed(mask, x, y + 1, &mut stack);
        }
    }
    // The holes: 4-connected regions of background the flood did not reach.
    let mut largest = 0;
    let mut region: Vec<(u32, u32)> = Vec::new();
    for start in 0..mask.len() {
        if mask[start] != 0 {
            continue;
        }
        const HOLE: u8 = 3;
        mask[start] = HOLE;
        region.clear();
        region.push(((start % w) as u32, (start / w) as u32));
        let mut next = 0;
        while next < region.len() {
            let (x, y) = region[next];
            let (x, y) = (x as usize, y as usize);
            next += 1;
            let mut visit = |x: usize, y: usize| {
                let j = y * w + x;
                if mask[j] == 0 {
                    mask[j] = HOLE;
                    region.push((x as u32, y as u32));
                }
            };
            if x > 0 {
                visit(x - 1, y);
            }
            if x + 1 < w {
                visit(x + 1, y);
            }
            if y > 0 {
                visit(x, y - 1);
            }
            if y + 1 < h {
                visit(x, y + 1);
            }
        }
        largest = largest.max(region.len());
        if region.len() > max_area {
            for &(x, y) in &region {
                mask[y as usize * w + x as usize] = OUTSIDE;
            }
        }
    }
    for v in mask.iter_mut() {
        *v = (*v != OUTSIDE) as u8;
    }
    largest
}

/// A `w` x `h` mask of `discs` random discs (radii 3 to 3 + `radius_tenths` / 10 pixels,
/// touching and overlapping as they fall), each pixel flipped with a chance of `noise` in 100
/// (noisy outlines, specks, pinholes).
fn random_blobs(
    next_u32: &mut impl FnMut() -> u32,
    w: usize,
    h: usize,
    discs: usize,
    radius_tenths: u32,
    noise: u32,
) -> Vec<u8> {
    let discs: Vec<(f32, f32, f32)> = (0..discs)
        .map(|_| {
            let r = 3.0 + (next_u32() % radius_tenths) as f32 / 10.0;
            let cx = r + (next_u32() as usize % w.max(1)) as f32 * 0.6;
            let cy = r + (next_u32() as usize % h.max(1)) as f32 * 0.6;
            (cx, cy, r)
        })
        .collect();
    (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f32, (i / w) as f32);
            let inside = discs
                .iter()
                .any(|&(cx, cy, r)| (x - cx).powi(2) + (y - cy).powi(2) <= r * r);
            (inside ^ (next_u32() % 100 < noise)) as u8
        })
        .collect()
}

/// A small deterministic generator for random test masks.
fn lcg(seed: u64) -> impl FnMut() -> u32 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    }
}

#[test]
fn at_the_device_scale_the_real_smear_finder_finds_the_cells_its_first_look_finds() {
    // reddino-chula's manifest names the real-smear profile; the device's scale (0.18 um per
    // pixel, the Chula fields': cells of radius 21 px) replaces the first look at each frame.
    let dir = tempfile::tempdir().unwrap();
    let (tar, key) = crate::model::shipped_model(crate::model::Shipped::Chula, dir.path()).unwrap();
    let manifest = crate::model::open_bundle(&tar, &[key])
        .unwrap()
        .manifest()
        .clone();
    let looked = CellFinderConfig::for_device(&manifest, 0.0).unwrap();
    assert_eq!(looked, CellFinderConfig::real_smear());
    let known = CellFinderConfig::for_device(&manifest, 0.18).unwrap();
    assert_eq!(known.um_per_px, 0.18);
    // Scored as `finder-quality` scores them, against the sample fields' labels.
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/chula-rbc-12");
    let (mut found, mut labels) = ([0usize; 2], 0usize);
    for f in ["1", "222", "34", "42"] {
        let img = image::open(format!("{data}/images/{f}.jpg"))
            .unwrap()
            .to_rgb8();
        let points: Vec<(f32, f32)> = std::fs::read_to_string(format!("{data}/labels/{f}.txt"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Vec<f32> = l.split_whitespace().map(|t| t.parse().unwrap()).collect();
                (v[0], v[1])
            })
            .collect();
        let score = |cfg| crate::offline::quality::score_field(f, &img, &points, cfg);
        let (a, b) = (score(&looked), score(&known));
        let n = a.cell_sized as f64;
        assert!(
            (b.cell_sized as f64 - n).abs() <= 0.05 * n,
            "{f}: {} cell-sized detections at the device's scale, {n} with a first look",
            b.cell_sized
        );
        found[0] += a.interior_found;
        found[1] += b.interior_found;
        labels += a.interior;
    }
    let recall = found.map(|k| k as f64 / labels as f64);
    assert!(
        recall[1] >= recall[0] - 0.01,
        "interior recall {:.4} at the device's scale, {:.4} with a first look",
        recall[1],
        recall[0]
    );
}

#[test]
fn the_threshold_follows_the_contrast_of_pale_cells_only() {
    let cfg = CellFinderConfig::real_smear();
    let widths = |stained: f32| foreground::cell_widths(0.02, 0.02, stained, &cfg);
    // Strong cells (contrast 0.6, 30 noise widths): six noise widths, as without the rule.
    assert_eq!(widths(0.62), cfg.noise_widths);
    // Pale cells (contrast 0.2, 10 noise widths): a threshold at 0.35 of their contrast.
    assert!((widths(0.22) - 3.5).abs() < 1e-4, "{}", widths(0.22));
    // Never under `min_widths` (noise), nor a number when there is no noise to measure.
    assert_eq!(widths(0.05), cfg.min_widths);
    assert_eq!(
        foreground::cell_widths(0.0, 0.0, 0.0, &cfg),
        cfg.noise_widths
    );
    // Off: always `noise_widths`.
    let off = CellFinderConfig {
        contrast_fraction: 0.0,
        ..cfg.clone()
    };
    assert_eq!(
        foreground::cell_widths(0.02, 0.02, 0.22, &off),
        off.noise_widths
    );
    // The floor: `min_density` for strong cells, a fraction of a pale cell's contrast.
    assert_eq!(foreground::cell_floor(0.02, 0.62, &cfg), cfg.min_density);
    assert!((foreground::cell_floor(0.02, 0.22, &cfg) - 0.07).abs() < 1e-6);
    assert_eq!(foreground::cell_floor(0.02, 0.0, &cfg), 0.0);
    assert_eq!(foreground::cell_floor(0.02, 0.22, &off), off.min_density);
}

#[test]
fn a_quantile_of_a_histogram_is_the_bin_it_falls_in() {
    // Bins of 1/4 from -2: ten values in bin 10 (0.5..0.75), ninety in bin 2 (-1.5..-1.25).
    let mut hist = vec![0u32; 16];
    hist[2] = 90;
    hist[10] = 10;
    let at = |q: f32| foreground::quantile_of(&hist, 4.0, q);
    assert_eq!(at(0.5), -1.375);
    assert_eq!(at(0.9), -1.375);
    assert_eq!(at(0.91), 0.625);
    assert_eq!(at(0.95), 0.625);
    assert_eq!(
        foreground::quantile_of(&[0; 8], 4.0, 0.95),
        -2.0 + 7.5 / 4.0
    );
}

#[test]
fn boundary_pixels_sorted_by_column_are_the_pixels_sorted_by_x_then_y() {
    let mut next = lcg(11);
    for w in [1usize, 2, 7, 64] {
        // Pixels of a w x 40 window in raster order, about a third of them.
        let raster: Vec<(f32, f32)> = (0..40 * w)
            .filter(|_| next() % 3 == 0)
            .map(|i| ((i % w) as f32, (i / w) as f32))
            .collect();
        let mut sorted = raster.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        assert_eq!(splits::by_column(&raster, w), sorted, "width {w}");
    }
}

#[test]
fn a_pixel_no_bluer_than_red_is_below_the_blue_threshold_whatever_the_rounding() {
    // What `split_blue_parts` skips: b <= r under a background whose red-minus-blue is within
    // the margin below the threshold. Every such pixel must read at most the threshold.
    let ln = ln_table();
    let threshold = 0.25f32;
    let mut next = lcg(5);
    for _ in 0..2000 {
        let g2 = (next() % 5550) as f32 / 1000.0;
        let g0 = (g2 + threshold - splits::BLUE_MARGIN - (next() % 1000) as f32 * 1e-6).max(0.0);
        for r in 0..=255usize {
            let b = (next() as usize) % (r + 1);
            let red_minus_blue = (g0 - ln[r]) - (g2 - ln[b]);
            assert!(
                red_minus_blue <= threshold,
                "g {g0} {g2}, r {r}, b {b}: {red_minus_blue}"
            );
        }
    }
}

#[test]
fn basins_counted_run_by_run_are_basins_counted_pixel_by_pixel() {
    let mut next_u32 = lcg(29);
    for round in 0..200 {
        let n = 1 + next_u32() as usize % 6;
        let len = next_u32() as usize % 400;
        // Runs of one basin or of none, as a window's rows hold them.
        let mut labels = Vec::new();
        while labels.len() < len {
            let l = match next_u32() % (n as u32 + 1) {
                k if k == n as u32 => u32::MAX,
                k => k,
            };
            let run = 1 + next_u32() as usize % 12;
            labels.extend(std::iter::repeat_n(l, run.min(len - labels.len())));
        }
        let mut want = vec![0usize; n];
        for &l in labels.iter().filter(|&&l| l != u32::MAX) {
            want[l as usize] += 1;
        }
        assert_eq!(watershed::basin_sizes(&labels, n), want, "round {round}");
    }
}
