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

    let split = evaluate(&f, &set, &Protocol::REDDINO_SPLIT, Knn::Euclidean).unwrap();
    let held: usize = split.linear.confusion.iter().flatten().sum();
    assert_eq!(
        held,
        set.files.len().div_ceil(5),
        "a stratified 20% held out"
    );
    let kfold = evaluate(&f, &set, &Protocol::KFold { k: 4 }, Knn::Euclidean).unwrap();
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
    assert!(plots.contains("![pca by class](pca_class.png)"));
    // The heat map: a perfect diagonal is dark blue on the diagonal and white elsewhere, with
    // the counts in the cells and the class names along the axes (longer names, a wider
    // picture).
    let count =
        |img: &image::RgbImage, colour: [u8; 3]| img.pixels().filter(|p| p.0 == colour).count();
    let names = ["discocyte".to_string(), "wbc".to_string()];
    let heat = reddino_trainer::report::confusion_png(&[vec![5, 0], vec![0, 3]], &names).unwrap();
    let dark = reddino_trainer::report::heat_colour(1.0);
    assert_eq!(dark, [8, 48, 107]);
    let dark_px = count(&heat, dark);
    assert!(dark_px > 2 * 30 * 30, "two dark cells: {dark_px} px");
    let empty = reddino_trainer::report::confusion_png(&[vec![0, 0], vec![0, 0]], &names).unwrap();
    assert_eq!(count(&empty, dark), 0);
    // White digits inside the dark cells: fewer dark pixels than two full cells.
    let full = reddino_trainer::report::confusion_png(&[vec![5, 0], vec![0, 0]], &names).unwrap();
    assert!(count(&full, dark) < dark_px);
    let long = ["a much longer class name".to_string(), "wbc".to_string()];
    let wide = reddino_trainer::report::confusion_png(&[vec![5, 0], vec![0, 3]], &long).unwrap();
    assert!(wide.width() > heat.width(), "room for the names");
    let ink = |img: &image::RgbImage| {
        img.pixels()
            .filter(|p| p.0[0] < 100 && p.0[1] < 100 && p.0[2] < 100 && p.0 != dark)
            .count()
    };
    assert!(ink(&heat) > 200, "names and captions drawn");
    // The scatter plot carries a legend of every name, even one without points.
    let names3: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let scatter =
        reddino_trainer::report::scatter_png("t", &[[0.0, 0.0], [1.0, 1.0]], &[0, 2], &names3)
            .unwrap();
    assert!(
        count(&scatter, reddino_trainer::report::PALETTE[1]) > 10,
        "the legend's b"
    );
    assert!(
        count(&scatter, reddino_trainer::report::PALETTE[2])
            > count(&scatter, reddino_trainer::report::PALETTE[1])
    );
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
