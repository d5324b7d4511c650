//! The cell finder on real smear fields: the four Chula RBC-12 sample fields in the tree
//! (`tests/data/chula-rbc-12`: a pale field with a pointer, a very pale one, clumps of
//! overlapping cells, a strong stain with a scale bar), scored against their point labels.

use std::path::PathBuf;

use reddino_edge::cells::CellFinderConfig;
use reddino_edge::offline::quality::{score_point_set, Fields, Look, Summary};

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/chula-rbc-12")
}

fn summary(cfg: &CellFinderConfig, scale: f32) -> Summary {
    summary_of(
        cfg,
        Look {
            scale,
            ..Look::AS_IS
        },
    )
}

fn summary_of(cfg: &CellFinderConfig, look: Look) -> Summary {
    let scores = score_point_set(&sample(), Fields::All, look, 13, cfg, None, |_, _| {})
        .expect("sample fields");
    assert_eq!(scores.len(), 4);
    Summary::of(&scores)
}

#[test]
fn finds_the_labelled_cells_of_real_fields() {
    let s = summary(&CellFinderConfig::real_smear(), 1.0);
    assert_eq!(s.labels, 461);
    assert!(
        s.interior_recall >= 0.97,
        "interior recall {}",
        s.interior_recall
    );
    assert!(s.border_recall >= 0.9, "border recall {}", s.border_recall);
    // Field 42 is clumps of overlapping cells: most of the merges are there.
    assert!(s.merged_share <= 0.03, "merged {}", s.merged_share);
    // Field 222 leaves cells unlabelled: over the interior the count stays near the labels.
    assert!(
        (0.9..=1.25).contains(&s.median_interior_ratio),
        "median interior ratio {}",
        s.median_interior_ratio
    );
}

#[test]
fn the_real_smear_profile_is_what_finds_them() {
    // The synthetic microscope's finder (the default profile) on the same fields.
    let plain = CellFinderConfig::default();
    let before = summary(&plain, 1.0);
    let now = summary(&CellFinderConfig::real_smear(), 1.0);
    assert!(
        now.interior_recall >= before.interior_recall + 0.08,
        "{} now, {} before",
        now.interior_recall,
        before.interior_recall
    );
    assert!(now.merged_share < before.merged_share);
}

#[test]
fn finds_them_at_a_simulated_lower_magnification() {
    let s = summary(&CellFinderConfig::real_smear(), 0.5);
    assert!(
        s.interior_recall >= 0.95,
        "interior recall at 0.5x {}",
        s.interior_recall
    );
    // Smoothing and closing the rims' gaps whatever the cells' size shut the gaps between the
    // small packed cells of field 42: its clumps read as one cell each.
    let always = summary(
        &CellFinderConfig {
            smooth_min_radius: 0.0,
            ..CellFinderConfig::real_smear()
        },
        0.5,
    );
    assert!(
        always.interior_recall < s.interior_recall - 0.1,
        "{} with smoothing and closing at any size",
        always.interior_recall
    );
}

#[test]
fn a_known_pixel_size_gives_the_cell_size() {
    // 640x480 fields at 1000x: about 0.19 um per pixel (cells about 40 pixels across).
    let cfg = CellFinderConfig {
        um_per_px: 0.19,
        ..CellFinderConfig::real_smear()
    };
    let s = summary(&cfg, 1.0);
    assert!(
        s.interior_recall >= 0.96,
        "interior recall {}",
        s.interior_recall
    );
    // A wrong pixel size (cells taken for three times their size) does worse: the setting is used.
    let wrong = summary(
        &CellFinderConfig {
            um_per_px: 0.06,
            ..CellFinderConfig::real_smear()
        },
        1.0,
    );
    assert!(
        wrong.interior_recall < s.interior_recall,
        "{} with a wrong pixel size",
        wrong.interior_recall
    );
}

/// Interior recall of the real-smear profile on the sample fields seen as `look`, which must
/// reach `least`, and of the profile with one setting undone, which must fall more than
/// `margin` below it.
fn holds_where_the_old_setting_fails(look: Look, least: f64, old: CellFinderConfig, margin: f64) {
    let now = summary_of(&CellFinderConfig::real_smear(), look).interior_recall;
    assert!(now >= least, "interior recall {now} as {}", look.name());
    let before = summary_of(&old, look).interior_recall;
    assert!(
        before < now - margin,
        "{before} with the old setting against {now}, as {}",
        look.name()
    );
}

#[test]
fn finds_them_in_a_paler_stain() {
    // The same fields with each pixel's optical density halved (a smear stained half as
    // strongly; field 34 is pale already). A threshold of six noise widths whatever the
    // cells' contrast (and at least 0.1) cuts the pale cells' rims into specks, and the
    // typical radius read from them is a speck's.
    holds_where_the_old_setting_fails(
        Look {
            stain: 0.5,
            ..Look::AS_IS
        },
        0.95,
        CellFinderConfig {
            contrast_fraction: 0.0,
            ..CellFinderConfig::real_smear()
        },
        0.05,
    );
}

#[test]
fn finds_them_under_light_falling_off_to_the_corners() {
    // The corners get half the centre's light (a camera whose optics vignette). With a block
    // 0.2 darker than its neighbours taken as covered by a cell, towards the corners every
    // block is, the background there is its brighter neighbours', and whole corners read as
    // stain.
    holds_where_the_old_setting_fails(
        Look {
            vignette: 0.5,
            ..Look::AS_IS
        },
        0.95,
        // Dimmed alike in every channel, corners read as stain are grey: the opaque-mark
        // filter would clear most of them, so it is undone too.
        CellFinderConfig {
            background_covered: 0.2,
            drop_neutral: 0.0,
            ..CellFinderConfig::real_smear()
        },
        0.3,
    );
}

#[test]
fn counts_no_cell_on_a_pointer_or_a_scale_bar() {
    // A black eyepiece pointer and a scale bar with its legend drawn into each field (the
    // labels under them dropped). Field 1's own pointer is grey and half transparent.
    let marked = Look {
        marks: true,
        ..Look::AS_IS
    };
    let now = summary_of(&CellFinderConfig::real_smear(), marked);
    assert_eq!(now.on_marks, 0);
    assert!(
        now.interior_recall >= 0.95,
        "interior recall {}",
        now.interior_recall
    );
    // Taken as stain, the marks come back as cells: the pointer in pieces, the bar, letters.
    let before = summary_of(
        &CellFinderConfig {
            drop_neutral: 0.0,
            ..CellFinderConfig::real_smear()
        },
        marked,
    );
    assert!(before.on_marks >= 3, "{} on the marks", before.on_marks);
}
