//! The ONNX Runtime backend with the CPU provider against tract on the same bundles (the demo
//! model and a random ViT-S), and the clear start errors for a missing, wrong or unusable
//! library. The library is the PyPI wheel's libonnxruntime that scripts/test.sh installs
//! (REDDINO_ONNXRUNTIME_LIB); without it the comparison is skipped unless
//! REDDINO_REQUIRE_ONNXRUNTIME is set, as the test command does.
#![cfg(feature = "onnxruntime")]

use std::path::{Path, PathBuf};
use std::process::Command;

use reddino_edge::infer::{self, BackendKind, BackendSpec, Provider};
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Limits, NewBundle, SigningKey, TrustedKeys};
use reddino_models::taxonomy::default_class_names;
use reddino_models::weights::VitWeights;

fn library() -> Option<PathBuf> {
    let found = std::env::var_os("REDDINO_ONNXRUNTIME_LIB").map(PathBuf::from);
    if found.is_none() {
        assert!(
            std::env::var_os("REDDINO_REQUIRE_ONNXRUNTIME").is_none(),
            "REDDINO_REQUIRE_ONNXRUNTIME is set but REDDINO_ONNXRUNTIME_LIB is not"
        );
        eprintln!("REDDINO_ONNXRUNTIME_LIB not set: skipping (scripts/test.sh sets it)");
    }
    found
}

fn ort_spec(lib: &Path, batch: usize) -> BackendSpec {
    BackendSpec {
        kind: BackendKind::Onnxruntime,
        providers: vec![Provider::Cpu],
        library: Some(lib.to_path_buf()),
        ..BackendSpec::tract(batch, 1)
    }
}

/// Pixels of `n` images in roughly the normalised range.
fn pixels(n: usize, size: usize, seed: u64) -> Vec<f32> {
    (0..n * 3 * size * size)
        .map(|i| {
            let x = (i as u64)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed)
                >> 33;
            (x % 2000) as f32 / 500.0 - 2.0
        })
        .collect()
}

/// Largest absolute difference between the two backends' embeddings and logits over full and
/// short batches.
fn compare(bundle: &bundle::Bundle, lib: &Path, batch: usize) -> f32 {
    let mut tract = infer::open(&BackendSpec::tract(batch, 1), bundle).unwrap();
    let mut ort = infer::open(&ort_spec(lib, batch), bundle).unwrap();
    assert_eq!(ort.name(), "onnxruntime");
    assert_eq!(ort.provider(), "cpu");
    assert!(
        ort.describe().contains("cpu provider"),
        "{}",
        ort.describe()
    );
    let size = bundle.manifest().input_size;
    let mut worst = 0f32;
    for (n, seed) in [(batch, 1), (1, 2), (batch.max(2) - 1, 3)] {
        let x = pixels(n, size, seed);
        let a = tract.run(&x, n).unwrap();
        let b = ort.run(&x, n).unwrap();
        assert_eq!((a.n, a.dim, a.classes), (b.n, b.dim, b.classes));
        assert_eq!(a.embeddings.len(), b.embeddings.len());
        let la = a.logits.unwrap();
        let lb = b.logits.unwrap();
        assert_eq!(la.len(), lb.len());
        for (x, y) in a
            .embeddings
            .iter()
            .chain(&la)
            .zip(b.embeddings.iter().chain(&lb))
        {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[test]
fn onnxruntime_cpu_matches_tract_on_the_demo_model_and_a_vit_s() {
    let Some(lib) = library() else { return };
    let tmp = tempfile::tempdir().unwrap();

    let (demo, key) = reddino_edge::model::demo_model(tmp.path()).unwrap();
    let b = reddino_edge::model::open_bundle(&demo, &[key]).unwrap();
    let diff = compare(&b, &lib, 8);
    eprintln!("demo model: max |onnxruntime - tract| = {diff:e}");
    assert!(
        diff <= 1e-4,
        "demo model: onnxruntime and tract differ by {diff}"
    );

    let key = SigningKey::generate().unwrap();
    let cfg = VitConfig::preset(Preset::Small, 56).unwrap();
    let w = VitWeights::random(&cfg, 11, 1.0).unwrap();
    let head = reddino_edge::model::pattern_head(default_class_names(), cfg.embed_dim, 11, 0.1);
    let dir = tmp.path().join("vit-s");
    bundle::write_dir(
        &NewBundle::new("vit-s", "1", "random ViT-S", &w, Some(&head)),
        &dir,
        &key,
    )
    .unwrap();
    let mut trusted = TrustedKeys::new();
    trusted.add(&key.public_key_file().unwrap()).unwrap();
    let b = bundle::open(&dir, &trusted, &Limits::default()).unwrap();
    let diff = compare(&b, &lib, 4);
    eprintln!("random ViT-S: max |onnxruntime - tract| = {diff:e}");
    assert!(
        diff <= 1e-4,
        "ViT-S: onnxruntime and tract differ by {diff}"
    );
}

/// `analyze --backend onnxruntime` with `library`: its exit status and stderr.
fn analyze_with(library: &Path, providers: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
        .args(["analyze", "--shipped", "demo", "--backend", "onnxruntime"])
        .arg("--providers")
        .arg(providers)
        .arg("--onnxruntime-library")
        .arg(library)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/data/chula-rbc-12-heldout/images/251.jpg"),
        )
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_or_wrong_library_is_a_clear_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("lib/libonnxruntime.so.1.20.0");
    let (code, err) = analyze_with(&missing, "cpu");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("no such file"),
        "{err}"
    );

    // Not a shared library at all.
    let junk = tmp.path().join("libonnxruntime.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    let (code, err) = analyze_with(&junk, "cpu");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&junk.display().to_string()), "{err}");

    // A real shared library that is not ONNX Runtime (the C library every process maps).
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if let Some(libc) = libc {
        let (code, err) = analyze_with(&libc, "cpu");
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("not an ONNX Runtime library"), "{err}");
    }
}

#[test]
fn providers_that_cannot_run_are_reported_and_the_next_is_used() {
    let Some(lib) = library() else { return };
    // The PyPI CPU wheel has neither TensorRT nor CUDA: both are reported, the CPU runs.
    let (code, err) = analyze_with(&lib, "tensorrt,cuda,cpu");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the tensorrt provider is not used"), "{err}");
    assert!(err.contains("the cuda provider is not used"), "{err}");
    assert!(err.contains("cpu provider"), "{err}");
    // Without the CPU in the list, nothing can run: an error that lists each reason.
    let (code, err) = analyze_with(&lib, "cuda");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no ONNX Runtime provider could run the model; cuda:"),
        "{err}"
    );
}

#[test]
fn a_config_naming_a_missing_library_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("edge.toml");
    std::fs::write(
        &cfg,
        "device_id = \"d\"\n[camera]\nsource = \"synthetic\"\n[model]\nbundle = \"m.tar\"\n\
         trusted_keys = [\"k.pub\"]\nbackend = \"onnxruntime\"\n\
         onnxruntime_library = \"lib/libonnxruntime.so\"\n",
    )
    .unwrap();
    let err = reddino_edge::config::Config::load(&cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.onnxruntime_library") && err.contains("does not exist"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        "device_id = \"d\"\n[camera]\nsource = \"synthetic\"\n[model]\nbundle = \"m.tar\"\n\
         trusted_keys = [\"k.pub\"]\nbackend = \"onnxruntime\"\nproviders = [\"cpu\", \"cpu\"]\n",
    )
    .unwrap();
    let err = reddino_edge::config::Config::load(&cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cpu is listed twice"), "{err}");
    std::fs::write(
        &cfg,
        "device_id = \"d\"\n[camera]\nsource = \"synthetic\"\n[model]\nbundle = \"m.tar\"\n\
         trusted_keys = [\"k.pub\"]\nbackend = \"onnxruntime\"\nproviders = [\"opencl\"]\n",
    )
    .unwrap();
    let err = reddino_edge::config::Config::load(&cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("opencl"), "{err}");
}

#[test]
fn model_install_and_compile_open_the_configured_onnxruntime_backend() {
    let Some(lib) = library() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (demo, key) = reddino_edge::model::demo_model(dir).unwrap();
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"ort-test\"\n[camera]\nsource = \"synthetic\"\n[model]\n\
             bundle = {:?}\ntrusted_keys = [{:?}]\nbackend = \"onnxruntime\"\n\
             providers = [\"tensorrt\", \"cpu\"]\nonnxruntime_library = {:?}\n\
             [outbox]\npath = \"state/outbox.db\"\n",
            demo.display().to_string(),
            key.display().to_string(),
            lib.display().to_string()
        ),
    )
    .unwrap();
    let model = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
            .arg("model")
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let out = model(&["install", "--activate", demo.to_str().unwrap()]);
    assert!(out.contains("installed"), "{out}");
    // TensorRT is not on this machine: reported, and the CPU provider opened the model.
    assert!(out.contains("the tensorrt provider is not used"), "{out}");
    assert!(
        out.contains("(cpu provider)") && out.contains("ready in"),
        "{out}"
    );
    let out = model(&["compile"]);
    assert!(out.contains("(cpu provider)"), "{out}");
}
