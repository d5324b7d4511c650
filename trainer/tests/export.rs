//! Export: the ONNX run by tract matches the tch model, and the signed bundle opens and passes
//! its self-test where the edge would open it.

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Limits, SigningKey, TrustedKeys};
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
    };
    let (k, trusted) = key(dir.path());
    let out = dir.path().join("bundle");
    let (m, diff) = export(
        &ExportSpec {
            weights: &w,
            head: Some(&head),
            input_size: 112,
            name: "t".into(),
            version: "1".into(),
            description: "test".into(),
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
}

#[test]
fn mismatching_head_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let w = VitWeights::random(&VitConfig::preset(Preset::Tiny, 56).unwrap(), 3, 0.5).unwrap();
    let head = LinearHead {
        class_names: vec!["a".into()],
        weight: Tensor::new(vec![1, 10], vec![0.0; 10]),
        bias: Tensor::new(vec![1], vec![0.0]),
    };
    let (k, _) = key(dir.path());
    let out = dir.path().join("bundle");
    let spec = ExportSpec {
        weights: &w,
        head: Some(&head),
        input_size: 56,
        name: "t".into(),
        version: "1".into(),
        description: String::new(),
    };
    assert!(export(&spec, &k, &out).is_err());
    assert!(!out.exists());
    assert!(check_onnx(&w, None, 56).unwrap() < 1e-4);
}
