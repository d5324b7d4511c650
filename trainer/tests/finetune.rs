//! Fine-tuning: a small ViT learns two shapes, the head carries the folder's class names, and
//! the scoring path (the edge's preprocessing) agrees with the training metrics.

use std::path::Path;

use image::{Rgb, RgbImage};
use reddino_models::arch::VitConfig;
use reddino_models::weights::VitWeights;
use reddino_trainer::finetune::{classify_set, finetune, FinetuneConfig, PixelPool};
use reddino_trainer::labelled::LabelledSet;
use reddino_trainer::report::score_report;
use tch::{nn, Device};

/// `root/{source}/{disc,ring}/*.png`: a dark disc or a dark ring (pale centre) on a light
/// background, in varying sizes, positions and tones.
fn shapes(root: &Path, per_class: usize) {
    for (si, source) in ["a", "b"].iter().enumerate() {
        for class in ["disc", "ring"] {
            let dir = root.join(source).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let k = (i * 7 + si * 3) as f32;
                let r = 8.0 + (k % 5.0);
                let (cx, cy) = (24.0 + (k % 3.0) - 1.0, 24.0 + (k % 4.0) - 1.5);
                let tone = 60 + ((i * 37 + si * 50) % 80) as u8;
                let img = RgbImage::from_fn(48, 48, |x, y| {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let d2 = dx * dx + dy * dy;
                    let inside = d2 <= r * r && (class == "disc" || d2 >= 0.3 * r * r);
                    if inside {
                        Rgb([tone + 60, tone, tone + 20])
                    } else {
                        Rgb([225, 220, 215])
                    }
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

fn small_vit() -> VitWeights {
    let cfg = VitConfig {
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        mlp_hidden: 96,
        num_registers: 0,
        img_size: 28,
        layer_scale: true,
    };
    VitWeights::random(&cfg, 1, 0.1).unwrap()
}

/// Settings that learn [`shapes`] in seconds.
fn shapes_config() -> FinetuneConfig {
    FinetuneConfig {
        input_size: 28,
        epochs: 25,
        batch_size: 16,
        lr: 2e-3,
        layer_decay: 1.0,
        ..FinetuneConfig::default()
    }
}

#[test]
fn learns_two_shapes_and_scores_them_the_same_way() {
    let tmp = tempfile::tempdir().unwrap();
    shapes(tmp.path(), 24);
    let set = LabelledSet::scan(tmp.path()).unwrap();
    assert_eq!(set.class_names, ["disc", "ring"]);
    let cfg = shapes_config();
    let mut logged = 0;
    let r = finetune(&small_vit(), &set, &cfg, Device::Cpu, 5, |_| logged += 1).unwrap();
    eprintln!(
        "loss {:.3} -> {:.3}, training accuracy {:.3}",
        r.first_loss, r.last_loss, r.train.accuracy
    );
    assert!(logged > 0);
    assert!(r.last_loss < r.first_loss);
    assert!(r.train.accuracy >= 0.85, "{}", r.train.accuracy);
    assert_eq!(r.head.class_names, set.class_names);
    r.head.validate(48).unwrap();
    // The written backbone + head, through the edge's preprocessing, give the same metrics.
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = reddino_trainer::vit::Vit::from_weights(&vs.root(), &r.backbone, 28).unwrap();
    let (truth, pred) = classify_set(&vit, &r.head, &set, Device::Cpu, 16, 1).unwrap();
    let rep = score_report(&set, &r.head.class_names, &truth, &pred);
    assert!((rep.overall.accuracy - r.train.accuracy).abs() < 0.03);
    assert_eq!(rep.per_source.len(), 2);
}

/// The moving average of the weights, the logit adjustment and stochastic depth each change
/// what is learnt, and each still learns the shapes.
#[test]
fn weight_averaging_logit_adjustment_drop_path_and_mixup_still_learn() {
    let tmp = tempfile::tempdir().unwrap();
    shapes(tmp.path(), 24);
    // One class thinned out: the logit adjustment then has priors to correct.
    let rings: Vec<_> = std::fs::read_dir(tmp.path().join("a/ring"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for p in &rings[..16] {
        std::fs::remove_file(p).unwrap();
    }
    let set = LabelledSet::scan(tmp.path()).unwrap();
    let base = shapes_config();
    let plain = finetune(&small_vit(), &set, &base, Device::Cpu, 100, |_| {}).unwrap();
    for (name, cfg) in [
        (
            "ema",
            FinetuneConfig {
                ema: 0.9,
                ..base.clone()
            },
        ),
        (
            "logit adjustment",
            FinetuneConfig {
                logit_adjust: 1.0,
                ..base.clone()
            },
        ),
        (
            "drop path",
            FinetuneConfig {
                drop_path: 0.2,
                ..base.clone()
            },
        ),
        (
            "mixup",
            FinetuneConfig {
                mixup: 0.4,
                ..base.clone()
            },
        ),
    ] {
        let r = finetune(&small_vit(), &set, &cfg, Device::Cpu, 100, |_| {}).unwrap();
        eprintln!(
            "{name}: training balanced accuracy {:.3}",
            r.train.balanced_accuracy
        );
        assert!(r.train.balanced_accuracy >= 0.8, "{name}: {:?}", r.train);
        assert_ne!(r.head.bias.data, plain.head.bias.data, "{name}");
    }
    // The colour pool draws as many transforms from another set (what they do to a crop is
    // tested with the transforms): another head.
    let colour = FinetuneConfig {
        pixel_pool: PixelPool::Colour,
        ..base.clone()
    };
    let r = finetune(&small_vit(), &set, &colour, Device::Cpu, 100, |_| {}).unwrap();
    assert_ne!(r.head.bias.data, plain.head.bias.data, "colour pool");
}

#[test]
fn bad_settings_and_unknown_classes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    shapes(tmp.path(), 2);
    let set = LabelledSet::scan(tmp.path()).unwrap();
    // What fine-tuning with these settings says when it refuses them.
    let refusal = |cfg: &FinetuneConfig| {
        finetune(&small_vit(), &set, cfg, Device::Cpu, 1, |_| {})
            .err()
            .expect("refused")
    };
    let bad = FinetuneConfig {
        input_size: 30,
        ..FinetuneConfig::default()
    };
    let e = refusal(&bad);
    assert!(e.to_string().contains("multiple of 14"), "{e}");
    for scale in [(0.0, 1.0), (0.8, 0.6), (0.6, 1.2), (f64::NAN, 1.0)] {
        let mut bad = FinetuneConfig::default();
        bad.augment.crop_scale = scale;
        let e = refusal(&bad);
        assert!(
            e.to_string().contains("random crop's area"),
            "{scale:?}: {e}"
        );
    }
    for p in [1.0, -0.1, f64::NAN] {
        let bad = FinetuneConfig {
            drop_path: p,
            ..FinetuneConfig::default()
        };
        let e = refusal(&bad);
        assert!(e.to_string().contains("drop path"), "{p}: {e}");
    }
    for alpha in [-0.5, f64::NAN, f64::INFINITY] {
        let bad = FinetuneConfig {
            mixup: alpha,
            ..FinetuneConfig::default()
        };
        let e = refusal(&bad);
        assert!(e.to_string().contains("mixup's alpha"), "{alpha}: {e}");
    }
    for ema in [1.0, -0.1] {
        let bad = FinetuneConfig {
            ema,
            ..FinetuneConfig::default()
        };
        let e = refusal(&bad);
        assert!(e.to_string().contains("moving average"), "{ema}: {e}");
    }
    // Logit adjustment: negative or not a number, or beside the class weights.
    for (tau, balanced, says) in [
        (-1.0, false, "logit adjustment must be"),
        (f64::NAN, false, "logit adjustment must be"),
        (1.0, true, "choose one"),
    ] {
        let bad = FinetuneConfig {
            logit_adjust: tau,
            balanced,
            ..FinetuneConfig::default()
        };
        let e = refusal(&bad);
        assert!(e.to_string().contains(says), "{tau} {balanced}: {e}");
    }
    // A head that does not know a class of the data.
    let cfg = FinetuneConfig {
        input_size: 28,
        epochs: 1,
        ..FinetuneConfig::default()
    };
    let mut r = finetune(&small_vit(), &set, &cfg, Device::Cpu, 1, |_| {}).unwrap();
    r.head.class_names[1] = "triangle".into();
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = reddino_trainer::vit::Vit::from_weights(&vs.root(), &r.backbone, 28).unwrap();
    let e = classify_set(&vit, &r.head, &set, Device::Cpu, 4, 1).unwrap_err();
    assert!(e.to_string().contains("`ring`"), "{e}");
}

/// Inverse-frequency class weights give each class the same total weight, and a fold chosen
/// by source keeps every class and source name (indices stay comparable across folds).
#[test]
fn balanced_weights_and_source_folds() {
    let w = reddino_trainer::finetune::class_weights(&[0, 0, 0, 1, 2, 2], 4);
    let w = Vec::<f32>::try_from(w).unwrap();
    assert_eq!(w.len(), 4);
    // n / (classes * n_c): 6 / (4 * 3), 6 / (4 * 1), 6 / (4 * 2); no samples: 0.
    for (got, want) in w.iter().zip([0.5, 1.5, 0.75, 0.0]) {
        assert!((got - want).abs() < 1e-6, "{w:?}");
    }
    // Logit adjustment's offsets: tau x ln(n_c / n); a class without samples as half of one.
    let o = reddino_trainer::finetune::prior_offsets(&[0, 0, 0, 1, 2, 2], 4, 2.0);
    let o = Vec::<f32>::try_from(o).unwrap();
    for (got, want) in o.iter().zip([0.5f64, 1.0 / 6.0, 2.0 / 6.0, 0.5 / 6.0]) {
        assert!((*got as f64 - 2.0 * want.ln()).abs() < 1e-5, "{o:?}");
    }
    let tmp = tempfile::tempdir().unwrap();
    shapes(tmp.path(), 3);
    let set = LabelledSet::scan(tmp.path()).unwrap();
    let b = set.select(|s| s == 1);
    assert_eq!(b.files.len(), 6);
    assert!(b.sources.iter().all(|&s| s == 1));
    assert_eq!((b.class_names.len(), b.source_names.len()), (2, 2));
    assert!(b.files.iter().all(|f| f.starts_with(tmp.path().join("b"))));
    let rest = set.select(|s| s != 1);
    assert_eq!(rest.files.len() + b.files.len(), set.files.len());
    // The labels follow their files.
    for (f, &l) in b.files.iter().zip(&b.labels) {
        assert!(f.parent().unwrap().ends_with(&b.class_names[l as usize]));
    }
}

#[test]
fn classes_txt_sets_the_class_order() {
    let tmp = tempfile::tempdir().unwrap();
    shapes(tmp.path(), 2);
    assert_eq!(
        LabelledSet::scan(tmp.path()).unwrap().class_names,
        ["disc", "ring"]
    );
    // The data set's order (as `reddino-edge import` writes it); a listed class without crops
    // is left out.
    std::fs::write(
        tmp.path().join("classes.txt"),
        "ring\nnormal # none here\ndisc\n",
    )
    .unwrap();
    let set = LabelledSet::scan(tmp.path()).unwrap();
    assert_eq!(set.class_names, ["ring", "disc"]);
    for (f, &l) in set.files.iter().zip(&set.labels) {
        assert!(f.parent().unwrap().ends_with(&set.class_names[l as usize]));
    }
    // A class folder the file does not list is refused, naming it.
    std::fs::write(tmp.path().join("classes.txt"), "ring\n").unwrap();
    let e = LabelledSet::scan(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("\"disc\"") && e.contains("classes.txt"), "{e}");
    std::fs::write(tmp.path().join("classes.txt"), "ring\ndisc\nring\n").unwrap();
    let e = LabelledSet::scan(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("classes.txt:3") && e.contains("twice"), "{e}");
}

/// `root/{source}/{small,large}/*.png` with a `crops.csv` as `reddino-edge import` writes it:
/// both classes are the same disc, cut and scaled alike; only the cell's box in its field
/// (the table) tells them apart (36 px against 54 px at 1000x).
fn sizes_only(root: &Path, per_class: usize) {
    let mut csv = String::from("file,field,part,class,x0,y0,x1,y1,label_file,label_line\n");
    for (si, source) in ["a", "b"].iter().enumerate() {
        for (ci, class) in ["small", "large"].iter().enumerate() {
            let dir = root.join(source).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let tone = 60 + ((i * 37 + si * 50) % 80) as u8;
                let r = 8.0 + (i % 3) as f32;
                let img = RgbImage::from_fn(48, 48, |x, y| {
                    let (dx, dy) = (x as f32 - 24.0, y as f32 - 24.0);
                    if dx * dx + dy * dy <= r * r {
                        Rgb([tone + 60, tone, tone + 20])
                    } else {
                        Rgb([225, 220, 215])
                    }
                });
                let file = format!("{source}/{class}/{i}.png");
                img.save(root.join(&file)).unwrap();
                let side = if ci == 0 { 34 + i % 5 } else { 52 + i % 5 };
                // A field name with a comma: the table quotes it.
                csv.push_str(&format!(
                    "{file},\"field {si}, left\",{source},{class},10,20,{},{},labels.txt,{}\n",
                    10 + side,
                    20 + side - i % 3,
                    i + 1
                ));
            }
        }
    }
    std::fs::write(root.join("crops.csv"), csv).unwrap();
}

/// With `cell_size` the head learns what only the cell's measured size tells (the crops are
/// alike), its term is written with the head, and the scoring path adds it as the edge does;
/// the same run without it cannot tell the classes apart.
#[test]
fn the_size_input_tells_cells_apart_that_their_crops_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    sizes_only(tmp.path(), 16);
    let set = LabelledSet::scan(tmp.path()).unwrap();
    assert!(set.boxes.iter().all(Option::is_some));
    let cfg = FinetuneConfig {
        input_size: 28,
        epochs: 15,
        batch_size: 16,
        lr: 2e-3,
        layer_decay: 1.0,
        augment: reddino_trainer::augment::AugmentConfig {
            crop_scale: (1.0, 1.0),
            ops_per_image: 0,
            ..FinetuneConfig::default().augment
        },
        cell_size: Some(0.18),
        ..FinetuneConfig::default()
    };
    let r = finetune(&small_vit(), &set, &cfg, Device::Cpu, 5, |_| {}).unwrap();
    let size = r.head.size.as_ref().expect("a size term");
    assert_eq!(size.um_per_px, 0.18);
    assert_eq!(size.weight.len(), 2);
    assert!(r.train.accuracy >= 0.95, "{}", r.train.accuracy);
    let back =
        reddino_models::weights::LinearHead::from_bytes(&r.head.to_bytes().unwrap(), "m").unwrap();
    assert_eq!(back, r.head);
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = reddino_trainer::vit::Vit::from_weights(&vs.root(), &r.backbone, 28).unwrap();
    let (truth, pred) = classify_set(&vit, &r.head, &set, Device::Cpu, 16, 1).unwrap();
    let right = truth.iter().zip(&pred).filter(|(t, p)| t == p).count();
    assert!(right as f64 >= 0.95 * truth.len() as f64, "{right}");

    let without = FinetuneConfig {
        cell_size: None,
        ..cfg
    };
    let r = finetune(&small_vit(), &set, &without, Device::Cpu, 5, |_| {}).unwrap();
    assert!(r.head.size.is_none());
    assert!(r.train.accuracy <= 0.75, "{}", r.train.accuracy);
}

/// The size input needs every crop's box: crops without a table, or a table with a bad
/// coordinate, are refused with the file (and line).
#[test]
fn the_size_input_without_boxes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    shapes(tmp.path(), 2);
    let set = LabelledSet::scan(tmp.path()).unwrap();
    let e = set.size_features(0.18).unwrap_err().to_string();
    assert!(e.contains("reddino-edge import"), "{e}");
    let cfg = FinetuneConfig {
        input_size: 28,
        epochs: 1,
        cell_size: Some(0.18),
        ..FinetuneConfig::default()
    };
    let e = finetune(&small_vit(), &set, &cfg, Device::Cpu, 1, |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("reddino-edge import"), "{e}");
    let bad_scale = FinetuneConfig {
        cell_size: Some(-1.0),
        ..cfg
    };
    let e = finetune(&small_vit(), &set, &bad_scale, Device::Cpu, 1, |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("micrometres per pixel"), "{e}");

    // A table that lists some crops only: the others are named.
    let csv = "file,field,part,class,x0,y0,x1,y1\na/disc/0.png,1,a,disc,0,0,40,40\n";
    std::fs::write(tmp.path().join("crops.csv"), csv).unwrap();
    let set = LabelledSet::scan(tmp.path()).unwrap();
    let e = set.size_features(0.18).unwrap_err().to_string();
    assert!(
        e.contains("disc/1.png") && e.contains("box is unknown"),
        "{e}"
    );
    // A coordinate that is not a number: refused at the scan, with the table's line.
    let csv = "file,field,part,class,x0,y0,x1,y1\na/disc/0.png,1,a,disc,0,0,4x0,40\n";
    std::fs::write(tmp.path().join("crops.csv"), csv).unwrap();
    let e = LabelledSet::scan(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("crops.csv:2") && e.contains("\"4x0\""), "{e}");
}
