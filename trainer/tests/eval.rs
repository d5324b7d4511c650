//! Labelled crop folders through the evaluation protocols.

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::synth::{export_crops, CropExport, SourcePreset};
use reddino_models::weights::VitWeights;
use reddino_trainer::eval::Knn;
use reddino_trainer::report::{evaluate, markdown, LabelledSet, Protocol};
use reddino_trainer::vit::Vit;
use tch::{nn, Device};

#[test]
fn protocols_on_synthetic_crops() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CropExport::new(dir.path().join("crops"), 6, 3);
    cfg.sources = vec![
        SourcePreset::by_name("wright_100x").unwrap(),
        SourcePreset::by_name("giemsa_60x").unwrap(),
    ];
    cfg.field_size = (640, 480);
    export_crops(&cfg, |_, _, _| {}).unwrap();
    let set = LabelledSet::scan(&dir.path().join("crops")).unwrap();
    assert_eq!(set.source_names, vec!["giemsa_60x", "wright_100x"]);
    let classes = set.class_names.len();
    assert_eq!(set.files.len(), 2 * 6 * classes);

    let w = VitWeights::random(&VitConfig::preset(Preset::Tiny, 56).unwrap(), 1, 0.5).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = Vit::from_weights(&vs.root(), &w, 56).unwrap();
    let f = set.embed(&vit, Device::Cpu, 32).unwrap();
    assert_eq!(f.size(), vec![set.files.len() as i64, 192]);

    let split = evaluate(&f, &set, &Protocol::Split { test_every: 3 }, Knn::Euclidean).unwrap();
    let held: usize = split.linear.confusion.iter().flatten().sum();
    assert_eq!(held, set.files.len() / 3, "every 3rd sample of each class");
    let kfold = evaluate(&f, &set, &Protocol::KFold { k: 4, seed: 0 }, Knn::Euclidean).unwrap();
    assert_eq!(
        kfold.knn1.confusion.iter().flatten().sum::<usize>(),
        set.files.len(),
        "every sample tested once"
    );
    let loso = evaluate(
        &f,
        &set,
        &Protocol::LeaveOneSourceOut,
        Knn::Cosine { temperature: 0.07 },
    )
    .unwrap();
    assert_eq!(loso.per_source.len(), 2);
    let plots = reddino_trainer::report::write_plots(dir.path(), &f, &set, &split).unwrap();
    for png in ["confusion.png", "pca_class.png", "pca_source.png"] {
        let img = image::open(dir.path().join(png)).unwrap();
        assert!(img.width() > 100, "{png}");
    }
    assert!(plots.contains("![pca by class](pca_class.png)") && plots.contains("#1f77b4"));
    // The heat map: a perfect diagonal is dark on the diagonal, white elsewhere.
    let heat = reddino_trainer::report::confusion_png(&[vec![5, 0], vec![0, 3]]);
    assert_eq!(heat.get_pixel(16, 16).0, [8, 48, 107]);
    assert_eq!(heat.get_pixel(48, 16).0, [255, 255, 255]);
    let md = markdown("t", &set, &[split, kfold, loso]);
    assert!(
        md.contains("leave-one-source-out per held-out source") && md.contains("| giemsa_60x |")
    );

    // One source: leave-one-source-out is refused with the reason.
    let one = LabelledSet::scan(&dir.path().join("crops/wright_100x")).unwrap();
    let f1 = one.embed(&vit, Device::Cpu, 32).unwrap();
    let err = evaluate(&f1, &one, &Protocol::LeaveOneSourceOut, Knn::Euclidean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least two sources"), "{err}");
}
