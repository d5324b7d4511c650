//! Labelled crop folders through the evaluation protocols.

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::synth::{export_crops, CropExport, SourcePreset};
use reddino_models::weights::VitWeights;
use reddino_trainer::eval::Knn;
use reddino_trainer::labelled::LabelledSet;
use reddino_trainer::report::{evaluate, markdown, Protocol};
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
    // Counts are drawn in the cells and the class names beside the rows and above the columns.
    let names = ["discocyte".to_string(), "wbc".to_string()];
    let heat = reddino_trainer::report::confusion_png(&[vec![5, 0], vec![0, 3]], &names);
    let (ox, oy, cell) = reddino_trainer::report::confusion_layout(&names, 5);
    assert_eq!(heat.get_pixel(ox + 3, oy + 3).0, [8, 48, 107]);
    assert_eq!(heat.get_pixel(ox + cell + 3, oy + 3).0, [255, 255, 255]);
    let ink = |x0: u32, y0: u32, x1: u32, y1: u32, colour: [u8; 3]| {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| heat.get_pixel(x, y).0 == colour)
            .count()
    };
    // White digits in the dark diagonal cells, none in the empty ones.
    assert!(ink(ox, oy, ox + cell, oy + cell, [255, 255, 255]) > 5);
    assert_eq!(
        ink(ox + cell + 1, oy + 1, ox + 2 * cell, oy + cell, [0, 0, 0]),
        0
    );
    // Row names left of the grid ("discocyte" is longer than "wbc"), column names above it.
    let row0 = ink(0, oy, ox, oy + cell, [0, 0, 0]);
    let row1 = ink(0, oy + cell, ox, oy + 2 * cell, [0, 0, 0]);
    assert!(row0 > row1 && row1 > 10, "{row0} {row1}");
    assert!(
        ink(ox, 14, ox + cell, oy, [0, 0, 0]) > ink(ox + cell, 14, ox + 2 * cell, oy, [0, 0, 0])
    );
    // The scatter plot carries its colour key.
    let names3: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let scatter = reddino_trainer::report::scatter_png(&[[0.0, 0.0], [1.0, 1.0]], &[0, 2], &names3);
    assert!(scatter.width() > 512);
    assert_eq!(scatter.get_pixel(516, 12 + 2 * 14).0, [44, 160, 44]);
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

/// The random-weights baseline must depend on the image: with DINOv2's LayerScale init (1e-5)
/// a fresh ViT gives every image nearly the same CLS feature and scores chance whatever the
/// data; the baseline (gammas at 1) spreads images apart.
#[test]
fn random_baseline_features_depend_on_the_image() {
    let cfg = VitConfig::preset(Preset::Tiny, 56).unwrap();
    let imgs: Vec<image::RgbImage> = (0..8u32)
        .map(|k| {
            image::RgbImage::from_fn(56, 56, |x, y| {
                let v = ((x * (k + 1) + y * (7 - k)) % 256) as u8;
                image::Rgb([v, 255 - v, (k * 30) as u8])
            })
        })
        .collect();
    // Spread of the features across images, relative to their size.
    let spread = |vit: &Vit| {
        let f = reddino_trainer::probe::embed_images(vit, &imgs, Device::Cpu, 8);
        let std = f
            .std_dim(0, true, false)
            .mean(tch::Kind::Float)
            .double_value(&[]);
        let size = f.abs().mean(tch::Kind::Float).double_value(&[]);
        std / size
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let fresh = spread(&Vit::new(&vs.root(), &cfg, 1).unwrap());
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let baseline = spread(&Vit::random_baseline(&vs.root(), &cfg, 1).unwrap());
    assert!(fresh < 0.01, "a fresh ViT's CLS hardly varies: {fresh}");
    assert!(
        baseline > 0.2,
        "the baseline's CLS varies with the image: {baseline}"
    );
}
