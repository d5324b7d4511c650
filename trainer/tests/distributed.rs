//! Multi-process pretraining over torch.distributed's Gloo process group on the loopback
//! interface, launched as torchrun launches it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
//! two processes give the loss curve of one process on the same global batch (and resume a
//! one-process checkpoint), and a rank that dies makes the other stop with a clear error
//! instead of waiting for ever.
//!
//! Needs the trainer built with its c10d shim (Gloo's headers at build time, libgloo-dev);
//! skipped otherwise, unless REDDINO_REQUIRE_DISTRIBUTED=1 (the test command sets it).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reddino_trainer::synth::write_smears;

const BIN: &str = env!("CARGO_BIN_EXE_reddino-trainer");

fn available() -> bool {
    if reddino_trainer::distributed::AVAILABLE {
        return true;
    }
    if std::env::var("REDDINO_REQUIRE_DISTRIBUTED").is_ok_and(|v| v == "1") {
        panic!("REDDINO_REQUIRE_DISTRIBUTED=1 but the trainer was built without its c10d shim (install libgloo-dev and rebuild)");
    }
    eprintln!("skipped: the trainer was built without its c10d shim (libgloo-dev)");
    false
}

/// A tiny run whose augmentations draw nothing that depends on the batch split (whole-image
/// crops, no pixel transforms, no flips): one process and two see the same views. No warmup
/// and a high learning rate, so that every step moves the weights (lr 3e-3 at batch 4).
fn config(dir: &Path, smears: &Path, name: &str, steps: usize) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"preset = "tiny"
[data]
path = "{}"
workers = 1
[train]
out_dir = "{}"
batch_size = 4
epochs = 1
epoch_length = {steps}
log_every = 1
checkpoint_every = 1000
threads = 1
device = "cpu"
dist_timeout_s = 60
[optim]
base_lr = 0.05
warmup_epochs = 0
freeze_last_layer_epochs = 0
[augment]
crop_scale = [1.0, 1.0]
crop_ratio = [1.0, 1.0]
ops_per_image = 0
flip_p = 0.0
"#,
            smears.display(),
            dir.join(name).display()
        ),
    )
    .unwrap();
    path
}

/// Synthetic smear fields to train on, in `dir/smears`.
fn smears(dir: &Path) -> PathBuf {
    let smears = dir.join("smears");
    write_smears(&smears, 2, 672, 448, 1).unwrap();
    smears
}

/// `pretrain` as one process (no launcher variables) with `args`; panics with its stderr when
/// it fails.
fn single(cfg: &Path, args: &[&str]) {
    let out = Command::new(BIN)
        .arg("pretrain")
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rank(cfg: &Path, rank: usize, world: usize, port: u16) -> Child {
    Command::new(BIN)
        .args(["pretrain", "--resume", "--config"])
        .arg(cfg)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("GLOO_SOCKET_IFNAME", "lo")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `limit`; kills it past that. (exit success, stderr).
fn wait(mut child: Child, limit: Duration) -> (Option<bool>, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s.success());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["total"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn two_gloo_processes_follow_one_process_on_the_same_global_batch() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let smears = smears(dir.path());
    let steps = 5;
    let one = config(dir.path(), &smears, "one", steps);
    let two = config(dir.path(), &smears, "two", steps);

    single(&one, &[]);

    // The second run starts as one process for 2 steps, then resumes its checkpoint as two
    // processes: a checkpoint resumes on any world size.
    single(&two, &["--steps", "2"]);
    let port = free_port();
    let r0 = rank(&two, 0, 2, port);
    let r1 = rank(&two, 1, 2, port);
    let (s1, e1) = wait(r1, Duration::from_secs(300));
    let (s0, e0) = wait(r0, Duration::from_secs(60));
    assert_eq!(s0, Some(true), "rank 0: {e0}");
    assert_eq!(s1, Some(true), "rank 1: {e1}");
    assert!(e0.contains("rank 0 of 2"), "{e0}");
    assert!(e0.contains("2 per process x 2"), "{e0}");
    assert!(e0.contains("resumed at step 2"), "{e0}");

    let (a, b) = (
        losses(&dir.path().join("one")),
        losses(&dir.path().join("two")),
    );
    assert_eq!(a.len(), steps);
    assert_eq!(b.len(), steps, "rank 0 alone writes the metrics");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "step {}: one process {x}, two processes {y}\n{a:?}\n{b:?}",
            i + 1
        );
    }
    // The weights too: rank 0's checkpoint against the single process's.
    let read = |run: &str| {
        let dir = dir.path().join(run).join("checkpoints");
        let last = std::fs::read_to_string(dir.join("last")).unwrap();
        reddino_models::weights::VitWeights::load(
            &dir.join(last.trim()).join("backbone.safetensors"),
        )
        .unwrap()
    };
    let (wa, wb) = (read("one"), read("two"));
    let mut worst = 0f32;
    for (k, t) in wa.tensors() {
        let u = wb.get(k).unwrap();
        for (x, y) in t.data.iter().zip(&u.data) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("losses {a:?} vs {b:?}; weights differ by up to {worst}");
    assert!(worst < 1e-4, "teacher weights differ by up to {worst}");
    // Only rank 0 wrote: one checkpoint folder, one metrics file.
    assert!(dir.path().join("two/config.toml").is_file());
}

#[test]
fn a_dead_rank_stops_the_others_with_an_error() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let smears = smears(dir.path());
    let cfg = config(dir.path(), &smears, "run", 100_000);
    let port = free_port();
    let r0 = rank(&cfg, 0, 2, port);
    let mut r1 = rank(&cfg, 1, 2, port);
    // Wait until training runs (rank 0 has logged a step), then kill rank 1.
    let metrics = dir.path().join("run/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = Instant::now();
    let (s0, e0) = wait(r0, Duration::from_secs(120));
    assert_eq!(s0, Some(false), "rank 0 did not fail: {e0}");
    assert!(
        killed.elapsed() < Duration::from_secs(90),
        "rank 0 took {:?} to notice",
        killed.elapsed()
    );
    eprintln!("rank 0 said:\n{e0}");
    assert!(e0.contains("rank 0 of 2") && e0.contains("failed"), "{e0}");
}
