//! `analyze` end to end on a synthetic field with a small signed bundle.

use reddino_edge::cells;
use reddino_edge::crop::{find_and_crop, CropPolicy};
use reddino_edge::infer::TractBackend;
use reddino_edge::offline::analyze::{analyze_image, AnalyzeConfig};
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Limits, NewBundle, SigningKey, TrustedKeys};
use reddino_models::preprocess::{square_crop_rect, Normalization, OwnerMap};
use reddino_models::synth::{render, FieldSpec, SourcePreset};
use reddino_models::taxonomy::default_class_names;
use reddino_models::weights::{LinearHead, Tensor, VitWeights};

#[test]
fn analyze_counts_every_found_cell_once() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let w = VitWeights::random(&VitConfig::preset(Preset::Tiny, 28).unwrap(), 1, 1.0).unwrap();
    let names = default_class_names();
    let c = names.len();
    let head = LinearHead {
        class_names: names.clone(),
        weight: Tensor::new(
            vec![c, 192],
            (0..c * 192)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02)
                .collect(),
        ),
        bias: Tensor::new(vec![c], vec![0.0; c]),
        size: None,
    };
    let dir = tmp.path().join("b");
    bundle::write_dir(
        &NewBundle {
            name: "t".into(),
            version: "1".into(),
            description: String::new(),
            weights: &w,
            head: Some(&head),
            normalization: Normalization::default(),
            crop_min_side: 0.0,
            crop_margin: 0.0,
            blank_neighbours: false,
            cell_finder: String::new(),
            test_time_views: 1,
        },
        &dir,
        &key,
    )
    .unwrap();
    let mut trusted = TrustedKeys::new();
    trusted.add(&key.public_key_base64()).unwrap();
    let b = bundle::open(&dir, &trusted, &Limits::default()).unwrap();
    let mut backend = TractBackend::from_bundle(&b, 4, 1).unwrap();
    let field = render(&FieldSpec::new(
        640,
        480,
        3,
        SourcePreset::by_name("wright_100x").unwrap(),
    ))
    .unwrap();
    let cfg = AnalyzeConfig {
        min_confidence: 0.0,
        ..AnalyzeConfig::default()
    };
    let report = analyze_image(
        "f",
        &field.image,
        &mut backend,
        &names,
        &Normalization::default(),
        &cfg,
    )
    .unwrap();
    let found = cells::find(&field.image, &cfg.cells).len() as u64;
    assert!(found > 10);
    assert_eq!(report.cells.len() as u64, found);
    assert_eq!(report.counts.values().sum::<u64>(), found);
    assert_eq!(report.counts["uncertain"], 0);
    for cell in &report.cells {
        assert!(names.contains(&cell.class));
        assert!(cell.confidence > 0.0 && cell.confidence <= 1.0);
    }
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["cells"][0]["bbox"].as_array().unwrap().len() == 4);
}

#[test]
fn a_model_trained_on_blanked_crops_gets_blanked_crops() {
    let mut source = SourcePreset::by_name("mgg_100x").unwrap();
    reddino_models::synth::set_touching(std::slice::from_mut(&mut source), 0.6).unwrap();
    let field = render(&FieldSpec::new(640, 480, 11, source)).unwrap();
    let finder = cells::CellFinderConfig::default();
    let (found, plain) = find_and_crop(
        &field.image,
        &finder,
        &CropPolicy {
            margin: 1.3,
            min_side: 0.6,
            blank_neighbours: false,
        },
    );
    let (same_cells, blanked) = find_and_crop(
        &field.image,
        &finder,
        &CropPolicy {
            margin: 1.3,
            min_side: 0.6,
            blank_neighbours: true,
        },
    );
    assert_eq!(found, same_cells);
    assert_eq!(plain.len(), blanked.len());
    let (_, owners) = cells::find_with_owners(&field.image, &finder);
    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
    let floor = 0.6 * reddino_models::preprocess::median_box_side(&boxes);
    let (mut alone, mut crowded) = (0, 0);
    for (i, (p, b)) in plain.iter().zip(&blanked).enumerate() {
        let [left, top, side] = square_crop_rect(640, 480, boxes[i], 1.3, floor);
        let neighbour = (top..top + side).any(|y| {
            (left..left + side).any(|x| {
                let o = owners.ids[(y * 640 + x) as usize];
                o != OwnerMap::BACKGROUND && o != i as u32
            })
        });
        if neighbour {
            crowded += 1;
            assert_ne!(
                p, b,
                "cell {i}: a neighbour in the crop, and the crop unchanged"
            );
        } else {
            alone += 1;
            assert_eq!(p, b, "cell {i}: alone in its crop, and the crop changed");
        }
    }
    assert!(alone > 0 && crowded > 0, "{alone} alone, {crowded} crowded");
}
