//! Export: the ONNX run by tract matches the tch model, and the signed bundle opens and passes
//! its self-test where the edge would open it.

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Limits, NewBundle, SigningKey, TrustedKeys};
use reddino_models::weights::{LinearHead, Tensor, VitWeights};
use reddino_trainer::export::{check_onnx, export, ExportSpec};

fn key(dir: &std::path::Path) -> (SigningKey, TrustedKeys) {
    let k = SigningKey::generate().unwrap();
    let pubf = dir.join("k.pub");
    std::fs::write(&pubf, k.public_key_file().unwrap()).unwrap();
    let mut t = TrustedKeys::new();
    t.add_file(&pubf).unwrap();
    (k, t)
}

/// timm-layout random weights of a preset (224 px checkpoint, as published) exported at 56 px
/// with a head: the ONNX matches tch, and the signed bundle opens, verifies and passes its
/// self-test through the runtime the edge uses.
fn preset_exports_and_opens(preset: Preset) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = VitConfig::preset(preset, 224).unwrap();
    let w = VitWeights::random(&cfg, 11, 0.5).unwrap();
    let d = cfg.embed_dim;
    let head = LinearHead {
        class_names: vec!["x".into(), "y".into()],
        weight: Tensor::new(
            vec![2, d],
            (0..2 * d).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect(),
        ),
        bias: Tensor::new(vec![2], vec![0.0, 0.1]),
        size: None,
    };
    let (k, trusted) = key(dir.path());
    let out = dir.path().join("bundle");
    let (_, diff) = export(
        &ExportSpec {
            bundle: NewBundle {
                crop_min_side: 0.0,
                blank_neighbours: false,
                cell_finder: String::new(),
                ..NewBundle::new(preset.name(), "1", String::new(), &w, Some(&head))
            },
            input_size: 56,
        },
        &k,
        &out,
    )
    .unwrap();
    drop(w);
    eprintln!("{}: max |tract - tch| = {diff:e}", preset.name());
    assert!(diff < 1e-4);
    // The large ONNX is 1.2 GB: it is opened where it was written rather than packed and
    // unpacked again, which would hold two more copies on disk at once.
    let b = if preset == Preset::Large {
        bundle::open(&out, &trusted, &Limits::default()).unwrap()
    } else {
        let tar = dir.path().join("bundle.tar");
        bundle::pack(&out, &tar).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        bundle::open(&tar, &trusted, &Limits::default()).unwrap()
    };
    assert_eq!(b.manifest().arch.embed_dim, d);
    assert!(b.self_test().unwrap() < 1e-4);
}

#[test]
fn timm_small_base_and_large_export_to_bundles_the_edge_opens() {
    for preset in [Preset::Small, Preset::Base, Preset::Large] {
        preset_exports_and_opens(preset);
    }
}

#[test]
fn tiny_with_head_exports_at_112_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let w = VitWeights::random(&VitConfig::preset(Preset::Tiny, 224).unwrap(), 3, 0.5).unwrap();
    let head = LinearHead {
        class_names: vec!["a".into(), "b".into(), "c".into()],
        weight: Tensor::new(
            vec![3, 192],
            (0..576).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect(),
        ),
        bias: Tensor::new(vec![3], vec![0.1, -0.2, 0.3]),
        size: None,
    };
    let (k, trusted) = key(dir.path());
    let out = dir.path().join("bundle");
    let (m, diff) = export(
        &ExportSpec {
            bundle: NewBundle {
                crop_min_side: 1.0,
                crop_margin: 1.1,
                blank_neighbours: true,
                cell_finder: "real-smear".into(),
                test_time_views: 8,
                ..NewBundle::new("t", "1", "test", &w, Some(&head))
            },
            input_size: 112,
        },
        &k,
        &out,
    )
    .unwrap();
    eprintln!("max |tract - tch| = {diff:e}");
    assert!(diff < 1e-4);
    assert_eq!(m.class_names.len(), 3);
    let b = bundle::open(&out, &trusted, &Limits::default()).unwrap();
    assert!(b.self_test().unwrap() < 1e-4);
    // The crop policy travels in the signed manifest.
    assert_eq!(b.manifest().crop_min_side, 1.0);
    assert_eq!(b.manifest().crop_margin, 1.1);
    assert!(b.manifest().blank_neighbours);
    assert_eq!(b.manifest().cell_finder, "real-smear");
    // So do the test-time views; the check above held the graph's mean over the eight
    // views to tch's.
    assert_eq!(b.manifest().test_time_views, 8);
    // Three views, or a margin the edge could not cut at, are refused before anything is
    // written.
    let out3 = dir.path().join("three");
    let refused = |bundle| {
        let spec = ExportSpec {
            bundle,
            input_size: 112,
        };
        let e = export(&spec, &k, &out3).unwrap_err().to_string();
        assert!(!out3.exists());
        e
    };
    let plain = NewBundle::new("t", "1", "test", &w, Some(&head));
    let e = refused(NewBundle {
        test_time_views: 3,
        ..plain.clone()
    });
    assert!(e.contains("test-time views"), "{e}");
    let e = refused(NewBundle {
        crop_margin: 0.5,
        ..plain
    });
    assert!(e.contains("crop_margin"), "{e}");
}

#[test]
fn mismatching_head_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let w = VitWeights::random(&VitConfig::preset(Preset::Tiny, 56).unwrap(), 3, 0.5).unwrap();
    let head = LinearHead {
        class_names: vec!["a".into()],
        weight: Tensor::new(vec![1, 10], vec![0.0; 10]),
        bias: Tensor::new(vec![1], vec![0.0]),
        size: None,
    };
    let (k, _) = key(dir.path());
    let out = dir.path().join("bundle");
    let spec = ExportSpec {
        bundle: NewBundle {
            crop_min_side: 0.0,
            blank_neighbours: false,
            cell_finder: String::new(),
            ..NewBundle::new("t", "1", String::new(), &w, Some(&head))
        },
        input_size: 56,
    };
    assert!(export(&spec, &k, &out).is_err());
    assert!(!out.exists());
    assert!(check_onnx(&w, None, 56, 1).unwrap() < 1e-4);
}
