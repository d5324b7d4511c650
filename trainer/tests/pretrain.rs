//! Pretraining on the CPU: the tiny preset on synthetic smear patches learns (the loss falls,
//! nothing is NaN, a kNN probe on its features beats random-init features), resuming is exact,
//! and a non-finite loss stops the run with a message naming the step.

use std::path::Path;
use std::sync::Arc;

use image::RgbImage;
use reddino_models::synth::SourcePreset;
use reddino_models::synth::{export_crops, CropExport};
use reddino_trainer::config::{Config, InitWeights, PosResample};
use reddino_trainer::data::{image_files, Dataset};
use reddino_trainer::eval::knn_accuracy;
use reddino_trainer::probe::embed_images;
use reddino_trainer::synth::write_smears;
use reddino_trainer::train::Trainer;
use tch::Device;

/// libtorch's generator and thread pool are process-wide: runs take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny(dir: &Path, smears: &Path) -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.data.path = smears.to_path_buf();
    c.data.workers = 2;
    c.train.out_dir = dir.join("run");
    c.train.threads = 2;
    c.train.device = "cpu".into();
    c
}

fn smears(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("smears");
    write_smears(&p, 2, 672, 448, 1).unwrap();
    p
}

/// Synthetic smears in `dir`, their dataset, and the tiny CPU config reading them.
fn setup(dir: &Path) -> (Arc<Dataset>, Config) {
    let smear_dir = smears(dir);
    let data = Dataset::scan(&smear_dir, reddino_trainer::config::DataKind::Smears, 224).unwrap();
    (Arc::new(data), tiny(dir, &smear_dir))
}

/// Labelled cell crops: (images, labels, source names).
fn crops(dir: &Path, per_class: usize) -> (Vec<RgbImage>, Vec<i64>) {
    let out = dir.join("crops");
    let mut cfg = CropExport::new(out.clone(), per_class, 9);
    cfg.sources = vec![SourcePreset::by_name("wright_100x").unwrap()];
    cfg.field_size = (640, 480);
    export_crops(&cfg, |_, _, _| {}).unwrap();
    let mut classes: Vec<String> = Vec::new();
    let (mut imgs, mut labels) = (Vec::new(), Vec::new());
    for f in image_files(&out).unwrap() {
        let class = f
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let id = match classes.iter().position(|c| *c == class) {
            Some(i) => i,
            None => {
                classes.push(class);
                classes.len() - 1
            }
        };
        imgs.push(image::open(&f).unwrap().to_rgb8());
        labels.push(id as i64);
    }
    (imgs, labels)
}

fn probe(trainer: &Trainer, imgs: &[RgbImage], labels: &[i64]) -> f64 {
    let f = embed_images(&trainer.teacher.backbone, imgs, Device::Cpu, 64);
    let (tr, te): (Vec<usize>, Vec<usize>) = (0..imgs.len()).partition(|i| i % 2 == 0);
    let pick = |ix: &[usize]| {
        let t = tch::Tensor::from_slice(&ix.iter().map(|&i| i as i64).collect::<Vec<_>>());
        (
            f.index_select(0, &t),
            ix.iter().map(|&i| labels[i]).collect::<Vec<_>>(),
        )
    };
    let (ftr, ytr) = pick(&tr);
    let (fte, yte) = pick(&te);
    knn_accuracy(&ftr, &ytr, &fte, &yte, 20)
}

#[test]
fn tiny_preset_learns_on_synthetic_smears() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg) = setup(dir.path());
    let (imgs, labels) = crops(dir.path(), 24);

    let mut trainer = Trainer::new(cfg).unwrap();
    let random_acc = probe(&trainer, &imgs, &labels);
    let steps = trainer.cfg.total_steps();
    let summary = trainer.run(data, None, false).unwrap();
    assert_eq!(summary.steps, steps);

    // Loss per logged step, from metrics.jsonl.
    let text = std::fs::read_to_string(trainer.cfg.train.out_dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["total"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let n = losses.len() / 4;
    let head: f64 = losses[..n].iter().sum::<f64>() / n as f64;
    let tail: f64 = losses[losses.len() - n..].iter().sum::<f64>() / n as f64;
    eprintln!("loss: first quarter {head:.4}, last quarter {tail:.4}; {losses:?}");
    assert!(
        tail < head - 0.05,
        "loss did not fall: {head:.4} -> {tail:.4}"
    );

    let trained_acc = probe(&trainer, &imgs, &labels);
    eprintln!("20-NN accuracy on {} synthetic crops: random init {random_acc:.3}, trained {trained_acc:.3}", imgs.len());
    assert!(
        trained_acc > random_acc,
        "trained {trained_acc} <= random {random_acc}"
    );

    // The checkpoint's backbone is a reddino-models checkpoint.
    let ckpt = summary.checkpoint.unwrap();
    let w = reddino_models::weights::VitWeights::load(&ckpt.join("backbone.safetensors")).unwrap();
    assert_eq!(w.config.embed_dim, 192);
}

#[test]
fn resume_is_exact() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (data, mut cfg) = setup(dir.path());
    cfg.train.batch_size = 4;
    cfg.train.epoch_length = 4; // warmup, last-layer freeze and teacher-temp warmup all in play
    cfg.train.epochs = 3;
    cfg.train.checkpoint_every = 100;

    let mut a_cfg = cfg.clone();
    a_cfg.train.out_dir = dir.path().join("a");
    let mut a = Trainer::new(a_cfg).unwrap();
    a.run(data.clone(), Some(10), false).unwrap();

    let mut b_cfg = cfg.clone();
    b_cfg.train.out_dir = dir.path().join("b");
    let mut b = Trainer::new(b_cfg.clone()).unwrap();
    b.run(data.clone(), Some(6), false).unwrap();
    drop(b);
    let mut b = Trainer::new(b_cfg.clone()).unwrap();
    assert!(b.resume().unwrap());
    assert_eq!(b.step, 6);
    b.run(data.clone(), Some(10), false).unwrap();

    let (sa, sb) = (a.student.named(), b.student.named());
    let (ta, tb) = (a.teacher.named(), b.teacher.named());
    for ((name, x), (_, y)) in sa.iter().zip(&sb).chain(ta.iter().zip(&tb)) {
        let same = x.equal(y);
        assert!(
            same,
            "{name} differs after resume (max diff {})",
            (x - y).abs().max().double_value(&[])
        );
    }
    // And training actually moved the parameters.
    let fresh = Trainer::new(b_cfg.clone()).unwrap();
    let moved = fresh
        .student
        .named()
        .iter()
        .zip(&sb)
        .any(|((_, x), (_, y))| !x.equal(y));
    assert!(moved);

    // A different configuration is refused.
    let mut other = b_cfg.clone();
    other.optim.base_lr *= 2.0;
    let mut c = Trainer::new(other).unwrap();
    let err = c.resume().unwrap_err().to_string();
    assert!(err.contains("different configuration"), "{err}");
}

#[test]
fn non_finite_loss_stops_with_the_step() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (data, mut cfg) = setup(dir.path());
    cfg.train.batch_size = 2;
    cfg.train.checkpoint_every = 2;
    let mut t = Trainer::new(cfg).unwrap();
    t.run(data.clone(), Some(3), false).unwrap();
    // Poison a weight: the next forward gives NaN.
    tch::no_grad(|| {
        let (_, w) = t
            .student
            .named()
            .into_iter()
            .find(|(n, _)| n == "backbone.norm.weight")
            .unwrap();
        let _ = w.shallow_clone().fill_(f64::NAN);
    });
    let err = format!("{:#}", t.run(data, Some(6), false).unwrap_err());
    assert!(err.contains("at step 3"), "{err}");
    assert!(
        err.contains("step_00000003"),
        "names the last good checkpoint: {err}"
    );
}

#[test]
fn continued_pretraining_starts_from_the_checkpoint() {
    use reddino_models::arch::{Preset, VitConfig};
    use reddino_models::weights::VitWeights;
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // A tiny checkpoint at 224 px; the run trains at 112, so the position embedding is resampled.
    let w = VitWeights::random(&VitConfig::preset(Preset::Tiny, 224).unwrap(), 5, 0.5).unwrap();
    let path = dir.path().join("init.safetensors");
    w.save(&path).unwrap();
    let mut cfg = tiny(dir.path(), dir.path());
    cfg.model.init = InitWeights::File(path.clone());
    // timm's antialiased resampling when asked for.
    cfg.model.init_pos_resample = PosResample::BicubicAntialias;
    let t = Trainer::new(cfg.clone()).unwrap();
    let mut at112 = w.clone();
    at112.resize_input(112).unwrap();
    let got = t.student.backbone.to_weights().unwrap();
    for (k, v) in at112.tensors() {
        assert_eq!(got.get(k).unwrap().data, v.data, "{k}");
    }
    let teacher = t.teacher.backbone.to_weights().unwrap();
    assert_eq!(
        teacher.get("blocks.3.mlp.fc2.weight").unwrap().data,
        w.get("blocks.3.mlp.fc2.weight").unwrap().data
    );
    // RedDino's: bicubic without antialiasing, what DINOv2's interpolate_pos_encoding gives
    // at 112 px from the stored 16 x 16 grid (checked against DINOv2 in tests/reference.rs).
    cfg.model.init_pos_resample = PosResample::Bicubic;
    assert_eq!(
        Config::preset("tiny").unwrap().model.init_pos_resample,
        PosResample::Bicubic
    );
    let t = Trainer::new(cfg.clone()).unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let stored = reddino_trainer::vit::Vit::new(&vs.root(), &w.config, 1).unwrap();
    stored.load(&w).unwrap();
    let want = tch::no_grad(|| stored.pos_for_grid(8));
    assert_eq!(want.size(), [1, 65, 192]);
    let want = Vec::<f32>::try_from(want.flatten(0, -1)).unwrap();
    let mut plain = Vec::new();
    for net in [&t.student, &t.teacher] {
        plain = net
            .backbone
            .to_weights()
            .unwrap()
            .get("pos_embed")
            .unwrap()
            .data
            .clone();
        let d = plain
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d < 1e-7,
            "pos_embed differs from interpolate_pos_encoding's by {d}"
        );
    }
    let aa = &at112.get("pos_embed").unwrap().data;
    let gap = plain
        .iter()
        .zip(aa)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        gap > 1e-3,
        "the two resamplings agree ({gap}): the option does nothing"
    );

    // A checkpoint of another size is refused, naming both.
    let small = VitWeights::random(&VitConfig::preset(Preset::Small, 56).unwrap(), 1, 0.5).unwrap();
    let bad = dir.path().join("small.safetensors");
    small.save(&bad).unwrap();
    cfg.model.init = InitWeights::File(bad);
    let err = Trainer::new(cfg.clone()).err().unwrap().to_string();
    assert!(err.contains("384-d") && err.contains("192-d"), "{err}");
    cfg.model.init = InitWeights::File(dir.path().join("missing.safetensors"));
    let err = format!("{:#}", Trainer::new(cfg.clone()).err().unwrap());
    assert!(err.contains("missing.safetensors"), "{err}");
    // `dinov2` names the same-size published file in weights_dir, and says what to do
    // when it is not there.
    cfg.model.init = InitWeights::Dinov2;
    cfg.model.weights_dir = dir.path().join("weights");
    let err = format!("{:#}", Trainer::new(cfg.clone()).err().unwrap());
    assert!(
        err.contains("weights/dinov2_vitt14.safetensors") && err.contains("scratch"),
        "{err}"
    );
    std::fs::create_dir_all(&cfg.model.weights_dir).unwrap();
    w.save(&cfg.model.weights_dir.join("dinov2_vitt14.safetensors"))
        .unwrap();
    let t = Trainer::new(cfg).unwrap();
    let teacher = t.teacher.backbone.to_weights().unwrap();
    assert_eq!(
        teacher.get("blocks.3.mlp.fc2.weight").unwrap().data,
        w.get("blocks.3.mlp.fc2.weight").unwrap().data
    );
}

#[test]
fn local_crops_train_the_student_at_98_px() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (data, mut cfg) = setup(dir.path());
    cfg.train.batch_size = 4;
    cfg.model.img_size = 112;
    cfg.ssl.local_crops = 2;
    cfg.ssl.local_crop_size = 56;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    let images = reddino_trainer::data::to_tensor(
        &reddino_trainer::data::Loader::new(data.clone(), 0, 4, 0, 1, 1)
            .next()
            .unwrap(),
        Device::Cpu,
    );
    let batch = t.make_batch(&images);
    assert_eq!(batch.locals.as_ref().unwrap().size(), vec![8, 3, 56, 56]);
    let (with_local, _, _) = t.optimize(&batch).unwrap();
    assert!(with_local.total.is_finite());
    // The local views reach the gradient: the same step without them gives other gradients
    // (both trainers start from the same seeded weights and see the same global crops).
    cfg.ssl.local_crops = 0;
    let mut u = Trainer::new(cfg).unwrap();
    let mut b2 = u.make_batch(&images);
    b2.locals = None;
    let (without, _, _) = u.optimize(&b2).unwrap();
    assert!(without.total.is_finite());
    let differs = t
        .student
        .named()
        .iter()
        .zip(u.student.named())
        .filter(|(a, _)| a.0.starts_with("backbone.blocks"))
        .any(|((_, x), (_, y))| !x.grad().equal(&y.grad()));
    assert!(differs, "local crops did not change the gradient");
    t.run(data, Some(3), false).unwrap();
}

/// RedDino's runs update the teacher even on a step whose fp16 gradients overflowed (the
/// scaler skips only the optimiser): the student stays, the teacher moves towards it.
#[test]
fn a_skipped_step_still_updates_the_teacher() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(dir.path(), dir.path())).unwrap();
    tch::no_grad(|| {
        for (_, v) in t.student.named() {
            let _ = v.shallow_clone().g_add_scalar_(0.5);
        }
    });
    let s0 = t.student.named();
    let s0: Vec<tch::Tensor> = s0.iter().map(|(_, v)| v.copy()).collect();
    let t0: Vec<tch::Tensor> = t.teacher.named().iter().map(|(_, v)| v.copy()).collect();
    let mut sched = t.schedules.at(0);
    sched.momentum = 0.9;
    sched.lr = 0.1;
    t.apply_updates(&sched, true);
    for (((name, s), s_before), (t_after, t_before)) in t
        .student
        .named()
        .iter()
        .zip(&s0)
        .zip(t.teacher.named().iter().map(|(_, v)| v).zip(&t0))
    {
        assert!(
            s.equal(s_before),
            "{name}: the student changed on a skipped step"
        );
        let want = t_before * 0.9 + s_before * 0.1;
        let d = (t_after - want).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{name}: teacher off the EMA by {d}");
    }
}

/// `data.channel_order = "bgr"` feeds the networks blue first: a BGR run on an image equals
/// an RGB run on the image with its channels reversed, step for step.
#[test]
fn bgr_runs_see_the_channels_reversed() {
    use reddino_trainer::config::ChannelOrder;
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(dir.path(), dir.path());
    cfg.train.batch_size = 2;
    tch::manual_seed(3);
    let images = tch::Tensor::rand([2, 3, 112, 112], (tch::Kind::Float, Device::Cpu));
    let mut rgb = Trainer::new(cfg.clone()).unwrap();
    let a = rgb.train_step(&images.flip([1])).unwrap().0.total;
    cfg.data.channel_order = ChannelOrder::Bgr;
    let mut bgr = Trainer::new(cfg.clone()).unwrap();
    let b = bgr.train_step(&images).unwrap().0.total;
    assert_eq!(a, b);
    let mut bgr = Trainer::new(cfg).unwrap();
    let c = bgr.train_step(&images.flip([1])).unwrap().0.total;
    assert_ne!(a, c, "the channel order changed nothing");
}

#[test]
fn a_fresh_backbone_starts_at_the_configured_layer_scale() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (_, mut cfg) = setup(dir.path());
    let gammas = |t: &Trainer| -> Vec<f64> {
        [&t.student, &t.teacher]
            .into_iter()
            .flat_map(|n| n.named())
            .filter(|(k, _)| k.ends_with(".gamma"))
            .flat_map(|(_, g)| Vec::<f64>::try_from(g.to_kind(tch::Kind::Double)).unwrap())
            .collect()
    };
    let default = gammas(&Trainer::new(cfg.clone()).unwrap());
    assert!(!default.is_empty());
    assert!(
        default.iter().all(|&g| (g - 1e-5).abs() < 1e-9),
        "{default:?}"
    );
    cfg.model.layerscale_init = 1.0;
    let one = gammas(&Trainer::new(cfg.clone()).unwrap());
    assert_eq!(one.len(), default.len());
    assert!(one.iter().all(|&g| g == 1.0), "{one:?}");
    // From a file: the key is read, and a value that cannot start a run is refused by name.
    let base = dir.path();
    let parse = |s: &str| Config::from_toml(&format!("preset = \"tiny\"\n[model]\n{s}"), base);
    assert_eq!(
        parse("layerscale_init = 0.5")
            .unwrap()
            .model
            .layerscale_init,
        0.5
    );
    assert_eq!(
        parse("").unwrap().model.layerscale_init,
        reddino_trainer::vit::LAYERSCALE_INIT
    );
    let err = format!("{:#}", parse("layerscale_init = 0.0").unwrap_err());
    assert!(err.contains("model.layerscale_init"), "{err}");
}

#[test]
fn the_model_cards_pretraining_configs_parse() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/models");
    let read = |name: &str| {
        let text = std::fs::read_to_string(docs.join(name)).unwrap();
        Config::from_toml(&text, Path::new("work")).unwrap_or_else(|e| panic!("{name}: {e:#}"))
    };
    let shipped = read("chula-pretrain.toml");
    assert_eq!(shipped.total_steps(), 300);
    assert_eq!(
        shipped.vit().unwrap().depth,
        8,
        "reddino-chula's 8 blocks (0.3.0 and 0.4.0)"
    );
    let dino = read("chula-pretrain-dino.toml");
    assert_eq!(dino.total_steps(), 3000);
    assert_eq!(
        (dino.model.layerscale_init, dino.augment.ops_per_image),
        (1.0, 0)
    );
    read("demo-pretrain.toml");
}
