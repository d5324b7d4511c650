//! The trainer against its references (written by scripts/test.sh into $REDDINO_REFERENCE_DIR):
//! the tch ViT against timm's `vit_small_patch14_dinov2` forward, and the losses against
//! DINOv2's formulas computed with torch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reddino_models::weights::VitWeights;
use reddino_trainer::loss::{
    dino_loss, ibot_loss, koleo_loss, max_abs_diff, sinkhorn_knopp, Center,
};
use reddino_trainer::vit::Vit;
use tch::{nn, Device, Kind, Tensor};

fn reference_dir() -> Option<PathBuf> {
    match std::env::var_os("REDDINO_REFERENCE_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None if std::env::var_os("REDDINO_REQUIRE_REFERENCE").is_some() => {
            panic!("REDDINO_REQUIRE_REFERENCE is set but REDDINO_REFERENCE_DIR is not; run scripts/test.sh")
        }
        None => {
            eprintln!("skipped: REDDINO_REFERENCE_DIR not set (scripts/test.sh sets it)");
            None
        }
    }
}

fn read(dir: &Path, name: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .into_iter()
        .collect()
}

fn parity(dir: &Path, weights: &str, io: &str, img_size: usize) -> f64 {
    let w = VitWeights::load(&dir.join(weights)).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = Vit::from_weights(&vs.root(), &w, img_size).unwrap();
    let io = read(dir, io);
    let got = tch::no_grad(|| vit.embed(&io["pixels"]));
    assert_eq!(got.size(), io["embedding"].size());
    max_abs_diff(&got, &io["embedding"])
}

#[test]
fn vit_small_matches_timm() {
    let Some(dir) = reference_dir() else { return };
    let d = parity(
        &dir,
        "vit_small.safetensors",
        "vit_small_224_io.safetensors",
        224,
    );
    eprintln!("vit_small 224: max |tch - timm| = {d:.2e}");
    assert!(d < 1e-4, "vit_small 224 differs from timm by {d}");
    // Position embedding resampled to 112 as timm does.
    let d = parity(
        &dir,
        "vit_small.safetensors",
        "vit_small_112_io.safetensors",
        112,
    );
    eprintln!("vit_small 112: max |tch - timm| = {d:.2e}");
    assert!(d < 1e-4, "vit_small 112 differs from timm by {d}");
    // Register tokens (timm no_embed_class layout).
    let d = parity(
        &dir,
        "vit_reg_56.safetensors",
        "vit_reg_56_io.safetensors",
        56,
    );
    eprintln!("vit_reg 56: max |tch - timm| = {d:.2e}");
    assert!(d < 1e-4, "register model differs from timm by {d}");
}

#[test]
fn timm_small_exports_to_a_bundle_the_edge_opens() {
    use reddino_models::bundle::{self, Limits, NewBundle, SigningKey, TrustedKeys};
    let Some(dir) = reference_dir() else { return };
    let w = VitWeights::load(&dir.join("vit_small.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let k = SigningKey::generate().unwrap();
    let pubf = tmp.path().join("k.pub");
    std::fs::write(&pubf, k.public_key_file().unwrap()).unwrap();
    let mut trusted = TrustedKeys::new();
    trusted.add_file(&pubf).unwrap();
    let spec = reddino_trainer::export::ExportSpec {
        bundle: NewBundle {
            crop_min_side: 0.0,
            blank_neighbours: false,
            cell_finder: String::new(),
            ..NewBundle::new("timm-small", "1", String::new(), &w, None)
        },
        input_size: 112,
    };
    let (_, diff) = reddino_trainer::export::export(&spec, &k, &tmp.path().join("b")).unwrap();
    assert!(diff < 1e-4, "{diff}");
    let b = bundle::open(&tmp.path().join("b"), &trusted, &Limits::default()).unwrap();
    assert!(b.self_test().unwrap() < 1e-4);
}

#[test]
fn weights_round_trip_through_models() {
    let Some(dir) = reference_dir() else { return };
    let w = VitWeights::load(&dir.join("vit_small.safetensors")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = Vit::from_weights(&vs.root(), &w, 224).unwrap();
    let back = vit.to_weights().unwrap();
    for (k, t) in w.tensors() {
        assert_eq!(back.get(k).unwrap().data, t.data, "{k}");
    }
}

#[test]
fn pos_embed_interpolation_matches_dinov2() {
    let Some(dir) = reference_dir() else { return };
    let r = read(&dir, "dinov2_losses.safetensors");
    let cfg = reddino_models::arch::VitConfig {
        embed_dim: 8,
        depth: 1,
        num_heads: 2,
        mlp_hidden: 16,
        num_registers: 0,
        img_size: 224,
        layer_scale: true,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let vit = Vit::new(&vs.root(), &cfg, 1).unwrap();
    tch::no_grad(|| {
        let (_, p) = vit
            .named_vars()
            .into_iter()
            .find(|(n, _)| n == "pos_embed")
            .unwrap();
        p.shallow_clone().copy_(&r["pos"]);
    });
    let same = vit.pos_for_grid(16);
    assert!(same.equal(&r["pos"]));
    let d = max_abs_diff(&vit.pos_for_grid(7), &r["pos_7"]);
    assert!(
        d < 1e-5,
        "interpolated pos_embed differs from DINOv2's by {d}"
    );
}

#[test]
fn losses_match_dinov2() {
    let Some(dir) = reference_dir() else { return };
    let r = read(&dir, "dinov2_losses.safetensors");
    let temps = Vec::<f32>::try_from(&r["temps"]).unwrap();
    let (tt, st) = (temps[0] as f64, temps[1] as f64);
    let masks = r["masks"].to_kind(Kind::Bool);
    let b = masks.size()[0];
    let n_masked = masks.sum(Kind::Int64).int64_value(&[]);

    let sk = sinkhorn_knopp(&r["t_cls"], tt, 3, b as f64);
    assert!(max_abs_diff(&sk, &r["sk_cls"]) < 1e-6, "sinkhorn cls");
    // Rows sum to 1 (a distribution per sample); with enough iterations every prototype gets
    // the same mass, B/K (3 iterations only approach it).
    let rows = sk.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    assert!(max_abs_diff(&rows, &Tensor::ones_like(&rows)) < 1e-5);
    let k = sk.size()[1];
    let converged = sinkhorn_knopp(&r["t_cls"], tt, 100, b as f64);
    let cols = converged.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
    let d = max_abs_diff(&cols, &(Tensor::ones_like(&cols) * (b as f64 / k as f64)));
    assert!(d < 1e-4, "column sums off by {d}");
    let skp = sinkhorn_knopp(&r["t_patch"], tt, 3, n_masked as f64);
    assert!(
        max_abs_diff(&skp, &r["sk_patch"]) < 1e-6,
        "sinkhorn patches"
    );

    let dino = dino_loss(&r["s_cls"], &sk, st);
    assert!(
        max_abs_diff(&dino, &r["dino"].squeeze()) < 1e-5,
        "dino {dino}"
    );

    let per_image = masks
        .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        .clamp_min(1.0);
    let weights = per_image
        .reciprocal()
        .expand_as(&masks)
        .flatten(0, 1)
        .index_select(0, &masks.flatten(0, 1).nonzero().flatten(0, -1));
    let ibot = ibot_loss(&r["s_patch"], &skp, &weights, b, st);
    assert!(
        max_abs_diff(&ibot, &r["ibot"].squeeze()) < 1e-5,
        "ibot {ibot}"
    );

    let koleo = koleo_loss(&r["feats"]);
    assert!(
        max_abs_diff(&koleo, &r["koleo"].squeeze()) < 1e-5,
        "koleo {koleo}"
    );

    // Running-mean centering: first call uses a zero centre -> plain tempered softmax.
    let mut c = Center::new(k, 0.9, Device::Cpu);
    let p = c.softmax_centered(&r["t_cls"], tt);
    assert!(max_abs_diff(&p, &r["centered"]) < 1e-6);
    c.update(&r["t_cls"]);
    let _ = c.softmax_centered(&r["t_cls"], tt);
    let mean = r["t_cls"].mean_dim([0i64].as_slice(), true, Kind::Float);
    assert!(
        max_abs_diff(&c.center, &(mean * 0.1)) < 1e-6,
        "centre after one update"
    );
}

#[test]
fn probes_agree_with_scikit_learn() {
    use reddino_trainer::eval::{knn_predict, metrics, Knn, LinearProbe};
    let Some(dir) = reference_dir() else { return };
    let r = read(&dir, "sklearn_probes.safetensors");
    let ytr = Vec::<i64>::try_from(&r["y_train"]).unwrap();
    let yte = Vec::<i64>::try_from(&r["y_test"]).unwrap();
    let want = Vec::<f64>::try_from(&r["acc"]).unwrap();
    let l2 = Vec::<f64>::try_from(&r["l2"]).unwrap()[0];
    let classes = 6;
    // The trainer's default is RedDino's regularisation.
    let default = reddino_trainer::eval::default_l2(48, classes, ytr.len());
    assert!((l2 - default).abs() < 1e-12 * l2, "{l2} vs {default}");
    // RedDino's folds: scikit-learn's unshuffled StratifiedKFold, sample for sample.
    let folds = Vec::<i64>::try_from(&r["kfold5"]).unwrap();
    let ours = reddino_trainer::eval::stratified_kfold(&ytr, 5).unwrap();
    assert_eq!(ours.iter().map(|&f| f as i64).collect::<Vec<_>>(), folds);
    let probe = LinearProbe::fit(&r["x_train"], &ytr, classes, l2, 1000);
    let lr = metrics(&yte, &probe.predict(&r["x_test"]), classes).accuracy;
    let k1 = metrics(
        &yte,
        &knn_predict(
            &r["x_train"],
            &ytr,
            &r["x_test"],
            1,
            Knn::Euclidean,
            classes,
        ),
        classes,
    )
    .accuracy;
    let k20 = metrics(
        &yte,
        &knn_predict(
            &r["x_train"],
            &ytr,
            &r["x_test"],
            20,
            Knn::Euclidean,
            classes,
        ),
        classes,
    )
    .accuracy;
    eprintln!(
        "accuracy ours / scikit-learn: logistic {lr:.4} / {:.4} ({} L-BFGS iterations), 1-NN {k1:.4} / {:.4}, 20-NN {k20:.4} / {:.4}",
        want[0], probe.iterations, want[1], want[2]
    );
    assert!(probe.converged);
    assert!(
        (lr - want[0]).abs() <= 0.01,
        "logistic regression {lr} vs {}",
        want[0]
    );
    assert!((k1 - want[1]).abs() <= 0.01, "1-NN {k1} vs {}", want[1]);
    assert!((k20 - want[2]).abs() <= 0.01, "20-NN {k20} vs {}", want[2]);
}
