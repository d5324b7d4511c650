//! The model store (`reddino-edge model ...`): installs verify before anything changes, a
//! refused bundle leaves the active model serving, activation and rollback switch atomically,
//! and a kill at any moment of an install or activation leaves a state that starts with a
//! valid model.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use reddino_edge::config::Config;
use reddino_edge::model::store::Store;
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, NewBundle, SigningKey};
use reddino_models::taxonomy::default_class_names;
use reddino_models::weights::VitWeights;

const SIZE: usize = 28;

/// A signed tiny bundle `name`-`version` in `dir`/`folder`.
fn make_bundle(dir: &Path, folder: &str, version: &str, key: &SigningKey, seed: u64) -> PathBuf {
    make_bundle_with_head(dir, folder, version, key, seed, 0.01)
}

/// [`make_bundle`] with the head's weights at `scale` (large: confident predictions; 0: every
/// class equally likely, so every cell is uncertain).
fn make_bundle_with_head(
    dir: &Path,
    folder: &str,
    version: &str,
    key: &SigningKey,
    seed: u64,
    scale: f32,
) -> PathBuf {
    let cfg = VitConfig::preset(Preset::Tiny, SIZE).unwrap();
    let w = VitWeights::random(&cfg, seed, 1.0).unwrap();
    let head = reddino_edge::model::pattern_head(default_class_names(), cfg.embed_dim, seed, scale);
    let out = dir.join(folder);
    bundle::write_dir(
        &NewBundle::new("rbc", version, "store test", &w, Some(&head)),
        &out,
        key,
    )
    .unwrap();
    out
}

/// Edits a bundle's manifest and signs it again with `key`.
fn edit_manifest(dir: &Path, key: &SigningKey, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(bundle::MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    bundle::sign_dir(dir, key).unwrap();
}

struct Device {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    key: SigningKey,
    factory: PathBuf,
}

impl Device {
    fn new() -> Device {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key = SigningKey::generate().unwrap();
        std::fs::write(dir.join("k.pub"), key.public_key_file().unwrap()).unwrap();
        let factory = make_bundle(&dir, "factory", "0.1.0", &key, 1);
        let config = dir.join("edge.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"store-test\"\n[camera]\nsource = \"synthetic\"\n[model]\n\
                 bundle = {:?}\ntrusted_keys = [\"k.pub\"]\n[outbox]\npath = \"state/outbox.db\"\n",
                factory.display().to_string()
            ),
        )
        .unwrap();
        Device {
            _tmp: tmp,
            dir,
            config,
            key,
            factory,
        }
    }

    fn cfg(&self) -> Config {
        Config::load(&self.config).unwrap()
    }

    fn keys(&self) -> Vec<PathBuf> {
        vec![self.dir.join("k.pub")]
    }

    fn store(&self) -> Store {
        Store::open(&self.cfg().model_store()).unwrap()
    }

    /// What `run` would serve: (name, version).
    fn serving(&self) -> String {
        let b = reddino_edge::app::open_model(&self.cfg()).unwrap();
        format!("{}-{}", b.manifest().name, b.manifest().version)
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
            .arg("model")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }
}

#[test]
fn install_activate_rollback_remove() {
    let d = Device::new();
    // The store is `models` beside the outbox; nothing installed: the config's bundle serves.
    assert_eq!(d.cfg().model_store(), d.dir.join("state/models"));
    assert_eq!(d.serving(), "rbc-0.1.0");
    let s = d.store();
    let v1 = make_bundle(&d.dir, "v1", "1.0.0", &d.key, 2);
    let v2 = make_bundle(&d.dir, "v2", "2.0.0", &d.key, 3);
    assert_eq!(s.install(&v1, &d.keys()).unwrap(), "rbc-1.0.0");
    // Installed is not active.
    assert_eq!(s.active().unwrap(), None);
    assert_eq!(d.serving(), "rbc-0.1.0");
    // The same bundle twice is a no-op.
    assert_eq!(s.install(&v1, &d.keys()).unwrap(), "rbc-1.0.0");
    s.activate("rbc-1.0.0", &d.keys()).unwrap();
    assert_eq!(d.serving(), "rbc-1.0.0");
    s.install(&v2, &d.keys()).unwrap();
    s.activate("rbc-2.0.0", &d.keys()).unwrap();
    assert_eq!(d.serving(), "rbc-2.0.0");
    assert_eq!(s.previous().unwrap().as_deref(), Some("rbc-1.0.0"));
    let list = s.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[1].active && list[0].previous && list[0].sha256.len() == 64);

    // Neither the active nor the previous version can be removed.
    let e = s.remove("rbc-2.0.0").unwrap_err().to_string();
    assert!(e.contains("active model"), "{e}");
    let e = s.remove("rbc-1.0.0").unwrap_err().to_string();
    assert!(e.contains("previous model"), "{e}");
    let e = s.activate("rbc-9.9.9", &d.keys()).unwrap_err().to_string();
    assert!(
        e.contains("not installed") && e.contains("rbc-1.0.0, rbc-2.0.0"),
        "{e}"
    );
    let e = s.activate("../../etc", &d.keys()).unwrap_err().to_string();
    assert!(e.contains("not a model version id"), "{e}");

    // Another model under an installed version is refused.
    let imposter = make_bundle(&d.dir, "imposter", "1.0.0", &d.key, 9);
    let e = s.install(&imposter, &d.keys()).unwrap_err().to_string();
    assert!(e.contains("already installed with other contents"), "{e}");

    assert_eq!(s.rollback(&d.keys()).unwrap(), "rbc-1.0.0");
    assert_eq!(d.serving(), "rbc-1.0.0");
    assert_eq!(s.previous().unwrap().as_deref(), Some("rbc-2.0.0"));
    // Rolling back twice returns to where it was.
    assert_eq!(s.rollback(&d.keys()).unwrap(), "rbc-2.0.0");
    let v3 = make_bundle(&d.dir, "v3", "3.0.0", &d.key, 4);
    s.install(&v3, &d.keys()).unwrap();
    s.activate("rbc-3.0.0", &d.keys()).unwrap();
    // rbc-1.0.0 is neither active nor previous now.
    s.remove("rbc-1.0.0").unwrap();
    let ids: Vec<String> = s.list().unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, ["rbc-2.0.0", "rbc-3.0.0"]);
}

#[test]
fn refused_bundles_leave_the_active_model_serving() {
    let d = Device::new();
    let s = d.store();
    let good = make_bundle(&d.dir, "good", "1.0.0", &d.key, 2);
    s.install(&good, &d.keys()).unwrap();
    s.activate("rbc-1.0.0", &d.keys()).unwrap();

    // A changed ONNX file: its hash no longer matches the signed manifest.
    let tampered = make_bundle(&d.dir, "tampered", "2.0.0", &d.key, 3);
    let onnx = tampered.join(bundle::MODEL);
    let mut bytes = std::fs::read(&onnx).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&onnx, bytes).unwrap();
    // Signed by a key the device does not trust.
    let stranger = SigningKey::generate().unwrap();
    let untrusted = make_bundle(&d.dir, "untrusted", "3.0.0", &stranger, 4);
    // A manifest changed after signing.
    let resigned = make_bundle(&d.dir, "resigned", "4.0.0", &d.key, 5);
    let m = resigned.join(bundle::MANIFEST);
    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, text.replace("store test", "store tests")).unwrap();

    // A signed, consistent manifest whose input size the graph does not have.
    let reshaped = make_bundle(&d.dir, "reshaped", "5.0.0", &d.key, 6);
    edit_manifest(&reshaped, &d.key, |v| {
        v["input_size"] = serde_json::json!(56);
        v["arch"]["img_size"] = serde_json::json!(56);
    });
    // A self-test whose expected output the model does not compute (hash and signature
    // updated to match).
    let selftest = make_bundle(&d.dir, "selftest", "6.0.0", &d.key, 7);
    {
        let mut trusted = bundle::TrustedKeys::new();
        trusted.add_file(&d.dir.join("k.pub")).unwrap();
        let b = bundle::open(&selftest, &trusted, &bundle::Limits::default()).unwrap();
        let mut v = b.self_test_vector().unwrap();
        let file = b.manifest().self_test.file.clone();
        drop(b);
        v.embedding.data[0] += 0.5;
        let mut t = std::collections::BTreeMap::new();
        t.insert("pixels".to_string(), v.pixels.clone());
        t.insert("embedding".to_string(), v.embedding.clone());
        t.insert("logits".to_string(), v.logits.clone().unwrap());
        let bytes = reddino_models::weights::tensors_to_bytes(&t).unwrap();
        std::fs::write(selftest.join(&file), &bytes).unwrap();
        let sha: String = {
            use sha2::Digest;
            sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        edit_manifest(&selftest, &d.key, |m| {
            m["files"][file.as_str()] = serde_json::json!({"sha256": sha, "size": bytes.len()});
        });
    }
    // An archive cut short in transit.
    let whole = d.dir.join("whole.tar");
    bundle::pack(&make_bundle(&d.dir, "packed", "7.0.0", &d.key, 8), &whole).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    let truncated = d.dir.join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // An archive with an entry that would land outside the bundle.
    let escaping = d.dir.join("escaping.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&escaping).unwrap());
        let mut h = tar::Header::new_gnu();
        let name = b"../evil.txt";
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"pwned"[..]).unwrap();
        b.finish().unwrap();
    }

    let mut messages = Vec::new();
    for b in [
        &tampered,
        &untrusted,
        &resigned,
        &d.dir.join("missing"),
        &reshaped,
        &selftest,
        &truncated,
        &escaping,
    ] {
        let e = s.install(b, &d.keys()).unwrap_err().to_string();
        messages.push(e);
        assert_eq!(s.active().unwrap().as_deref(), Some("rbc-1.0.0"));
        assert_eq!(d.serving(), "rbc-1.0.0");
    }
    assert!(messages[0].contains(bundle::MODEL), "{}", messages[0]);
    assert!(
        messages[1].contains("trust") || messages[1].contains("key"),
        "{}",
        messages[1]
    );
    assert!(
        messages[2].contains("signature") || messages[2].contains("signed"),
        "{}",
        messages[2]
    );
    assert!(messages[3].contains("missing"), "{}", messages[3]);
    assert!(
        messages[4].contains("model.onnx does not match"),
        "{}",
        messages[4]
    );
    assert!(messages[5].contains("self-test failed"), "{}", messages[5]);
    assert!(
        messages[6].contains("truncated") || messages[6].contains("missing"),
        "{}",
        messages[6]
    );
    assert!(messages[7].contains("escape"), "{}", messages[7]);
    assert!(!d.dir.join("evil.txt").exists());
    // Each says its own thing, and nothing of them was left in the store.
    for (i, a) in messages.iter().enumerate() {
        for b in &messages[i + 1..] {
            assert_ne!(a, b);
        }
    }
    let ids: Vec<String> = s.list().unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, ["rbc-1.0.0"]);
    let slots = std::fs::read_dir(d.cfg().model_store().join("slots"))
        .unwrap()
        .count();
    assert_eq!(slots, 1, "no staging left behind");
}

#[test]
fn a_damaged_active_slot_falls_back_to_the_previous_then_the_config() {
    let d = Device::new();
    let s = d.store();
    for (v, seed) in [("1.0.0", 2), ("2.0.0", 3)] {
        let b = make_bundle(&d.dir, v, v, &d.key, seed);
        let id = s.install(&b, &d.keys()).unwrap();
        s.activate(&id, &d.keys()).unwrap();
    }
    assert_eq!(d.serving(), "rbc-2.0.0");
    let damage = |id: &str| {
        let onnx = s.slot(id).join(bundle::MODEL);
        std::fs::write(&onnx, b"not a model").unwrap();
    };
    damage("rbc-2.0.0");
    assert_eq!(d.serving(), "rbc-1.0.0");
    // Activating a damaged slot is refused and changes nothing.
    assert!(s.activate("rbc-2.0.0", &d.keys()).is_err());
    damage("rbc-1.0.0");
    assert_eq!(
        d.serving(),
        "rbc-0.1.0",
        "the config's bundle is the last fallback"
    );
    let _ = &d.factory;
}

#[test]
fn cli_installs_lists_and_refuses_with_exit_status() {
    let d = Device::new();
    let v1 = make_bundle(&d.dir, "v1", "1.0.0", &d.key, 2);
    let out = d.cli(&["verify", v1.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rbc 1.0.0 verified"));
    let out = d.cli(&["install", "--activate", v1.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(&["list"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("rbc-1.0.0") && text.contains("active"),
        "{text}"
    );
    let out = d.cli(&["rollback"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "nothing to roll back to is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no previous model version"));
    let out = d.cli(&["remove", "rbc-1.0.0"]);
    assert_eq!(out.status.code(), Some(2));
}

/// SIGKILL at random moments of `model install --activate` and `model activate`: whatever
/// moment it lands on, the store opens, names only slots that verify, and `run` gets a valid
/// model.
#[test]
fn sigkill_during_install_or_activation_leaves_a_valid_model() {
    let d = Device::new();
    let versions: Vec<PathBuf> = (0..4)
        .map(|i| {
            make_bundle(
                &d.dir,
                &format!("v{i}"),
                &format!("{i}.0.0"),
                &d.key,
                10 + i,
            )
        })
        .collect();
    // How long one install takes here, to spread the kills over it.
    let t = std::time::Instant::now();
    let out = d.cli(&["install", "--activate", versions[0].to_str().unwrap()]);
    assert!(out.status.success());
    let span = t.elapsed().as_millis().max(20) as u64;
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    for i in 0..24 {
        let v = &versions[1 + (i % 3)];
        let args: Vec<String> = if i % 4 == 3 {
            vec!["activate".into(), format!("rbc-{}.0.0", 1 + (i + 1) % 3)]
        } else {
            vec![
                "install".into(),
                "--activate".into(),
                v.display().to_string(),
            ]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
            .arg("model")
            .arg("--config")
            .arg(&d.config)
            .args(&args)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(next(span + 10)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // A fresh start: the store opens (sweeping staging), and what it points at verifies.
        let s = d.store();
        let keys = d.keys();
        for id in [s.active().unwrap(), s.previous().unwrap()]
            .into_iter()
            .flatten()
        {
            assert!(
                reddino_edge::model::open_bundle(&s.slot(&id), &keys).is_ok(),
                "kill {i}: {id} does not verify"
            );
        }
        assert!(s.active().unwrap().is_some(), "kill {i}: no active model");
        let name = d.serving();
        assert!(
            name.starts_with("rbc-") && name != "rbc-0.1.0",
            "kill {i}: {name}"
        );
        let staging = std::fs::read_dir(d.cfg().model_store().join("slots"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(staging, 0, "kill {i}: staging swept");
    }
}

/// A version that keeps exiting before it analyses a frame (a crash loop under
/// `Restart=always`) is given up after `CRASH_LOOP_STARTS` starts: the previous version is
/// active again, and the rollback is published as a `model` event. A version that analyses a
/// frame has its count cleared.
#[test]
fn crash_loop_rolls_back_to_the_previous_version_and_says_so() {
    use reddino_edge::model::store::CRASH_LOOP_STARTS;
    let d = Device::new();
    let s = d.store();
    for (v, seed) in [("1.0.0", 2), ("2.0.0", 3)] {
        let b = make_bundle(&d.dir, v, v, &d.key, seed);
        let id = s.install(&b, &d.keys()).unwrap();
        s.activate(&id, &d.keys()).unwrap();
    }
    let Some(bin) = common::mosquitto_bin() else {
        return;
    };
    let broker = common::Mosquitto::start(bin, &d.dir);
    let config = |frames: u32| {
        let text = std::fs::read_to_string(&d.config).unwrap();
        let camera = format!(
            "[camera]\nsource = \"synthetic\"\nframes = {frames}\nwidth = 320\nheight = 240\n"
        );
        let text = text.replace("[camera]\nsource = \"synthetic\"\n", &camera)
            + &format!(
                "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_max_s = 0.5\ndrain_timeout_s = 10.0\n",
                broker.port
            );
        let p = d.dir.join(format!("run-{frames}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let run = |cfg: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // One good start: the count is cleared once a frame is analysed.
    run(&config(2));
    let starts = || std::fs::read_to_string(d.cfg().model_store().join("starts")).unwrap();
    assert_eq!(starts().trim(), "rbc-2.0.0 0");
    let mon = reddino_edge::offline::demo::monitor::Monitor::connect(
        "127.0.0.1",
        broker.port,
        "sub-model",
        "reddino/store-test",
    )
    .unwrap();
    // Starts that end before any frame.
    let no_frames = config(0);
    for n in 1..=CRASH_LOOP_STARTS {
        run(&no_frames);
        assert_eq!(starts().trim(), format!("rbc-2.0.0 {n}"));
        assert_eq!(s.active().unwrap().as_deref(), Some("rbc-2.0.0"));
    }
    run(&no_frames);
    assert_eq!(s.active().unwrap().as_deref(), Some("rbc-1.0.0"));
    assert_eq!(s.previous().unwrap().as_deref(), Some("rbc-2.0.0"));
    assert!(mon.wait_for(Duration::from_secs(20), |o| !o.model_events.is_empty()));
    let o = mon.observed();
    let e = &o.model_events[0];
    assert_eq!(
        (e.event.as_str(), e.from.as_str(), e.to.as_str()),
        ("rollback", "rbc-2.0.0", "rbc-1.0.0")
    );
    assert!(e.reason.contains("3 times"), "{}", e.reason);
    assert_eq!(o.malformed, 0);
}

/// A running service with an installed version active, fed paced synthetic frames, watched
/// over MQTT.
struct Running {
    d: Device,
    _broker: common::Mosquitto,
    mon: reddino_edge::offline::demo::monitor::Monitor,
    handle: std::thread::JoinHandle<reddino_edge::app::RunReport>,
}

fn start_serving(d: Device, v1_scale: f32, frames: u32, min_confidence: f32) -> Option<Running> {
    let bin = common::mosquitto_bin()?;
    let s = d.store();
    let v1 = make_bundle_with_head(&d.dir, "v1", "1.0.0", &d.key, 2, v1_scale);
    s.install(&v1, &d.keys()).unwrap();
    s.activate("rbc-1.0.0", &d.keys()).unwrap();
    let broker = common::Mosquitto::start(bin, &d.dir);
    let text = std::fs::read_to_string(&d.config).unwrap().replace(
        "[camera]\nsource = \"synthetic\"\n",
        &format!(
            "[camera]\nsource = \"synthetic\"\nframes = {frames}\nfps = 12.0\nwidth = 320\nheight = 240\n"
        ),
    ) + &format!(
        "min_confidence = {min_confidence}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_max_s = 0.5\ndrain_timeout_s = 20.0\n",
        broker.port
    );
    // min_confidence belongs to [model]: put it there.
    let text = text
        .replace(
            &format!("min_confidence = {min_confidence}\n[mqtt]"),
            "[mqtt]",
        )
        .replace(
            "trusted_keys = [\"k.pub\"]\n",
            &format!("trusted_keys = [\"k.pub\"]\nmin_confidence = {min_confidence}\n"),
        );
    std::fs::write(&d.config, text).unwrap();
    let mon = reddino_edge::offline::demo::monitor::Monitor::connect(
        "127.0.0.1",
        broker.port,
        "sub-switch",
        "reddino/store-test",
    )
    .unwrap();
    let cfg = d.cfg();
    let handle = std::thread::spawn(move || {
        reddino_edge::app::run(
            &cfg,
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
        .unwrap()
    });
    Some(Running {
        d,
        _broker: broker,
        mon,
        handle,
    })
}

/// The models that produced the results, in `seq` order, with repeats folded: `[a, b]` is one
/// switch.
fn model_runs(o: &reddino_edge::offline::demo::monitor::Observed) -> Vec<String> {
    let mut counts = o.counts.clone();
    counts.sort_by_key(|m| m.seq);
    let mut runs: Vec<String> = Vec::new();
    for m in counts {
        if runs.last() != Some(&m.model) {
            runs.push(m.model.clone());
        }
    }
    runs
}

/// Activating an installed version while frames flow: the service switches without a restart,
/// no frame is lost, every result names its model, and the version switches exactly once.
#[test]
fn activating_while_frames_flow_switches_once_and_loses_nothing() {
    let frames = 60;
    let Some(r) = start_serving(Device::new(), 0.01, frames, 0.0) else {
        return;
    };
    assert!(r
        .mon
        .wait_for(Duration::from_secs(30), |o| o.counts.len() >= 8));
    // The same network under a new version: its predictions match, so it stays healthy.
    let v2 = make_bundle_with_head(&r.d.dir, "v2", "2.0.0", &r.d.key, 2, 0.01);
    let s = r.d.store();
    s.install(&v2, &r.d.keys()).unwrap();
    s.activate("rbc-2.0.0", &r.d.keys()).unwrap();
    let report = r.handle.join().unwrap();
    assert_eq!(report.snapshot.frames.processed, frames as u64);
    assert_eq!(report.snapshot.frames.failed, 0);
    assert!(r.mon.wait_for(Duration::from_secs(20), |o| o.counts.len()
        >= frames as usize));
    let o = r.mon.observed();
    assert_eq!(
        o.counts.len(),
        frames as usize,
        "every frame's result arrived once"
    );
    assert!(
        o.seqs.iter().copied().eq(1..=o.seqs.len() as u64),
        "no gap in seq"
    );
    assert_eq!(model_runs(&o), ["rbc@1.0.0", "rbc@2.0.0"], "one switch");
    let sha: std::collections::BTreeSet<&str> =
        o.counts.iter().map(|m| m.model_sha256.as_str()).collect();
    assert_eq!(sha.len(), 2, "each result names its model's manifest");
    let events: Vec<(&str, &str, &str)> = o
        .model_events
        .iter()
        .map(|e| (e.event.as_str(), e.from.as_str(), e.to.as_str()))
        .collect();
    assert_eq!(events, [("activated", "rbc-1.0.0", "rbc-2.0.0")]);
    assert_eq!(s.active().unwrap().as_deref(), Some("rbc-2.0.0"));
}

/// A version whose first frames look wrong (every cell uncertain, where the model before it
/// was sure of most) is rolled back by itself, and both events are published.
#[test]
fn an_unhealthy_switch_is_rolled_back_and_reported() {
    let frames = 90;
    let Some(r) = start_serving(Device::new(), 5.0, frames, 0.5) else {
        return;
    };
    assert!(r
        .mon
        .wait_for(Duration::from_secs(30), |o| o.counts.len() >= 10));
    let before = r.mon.observed();
    let sure: u64 = before
        .counts
        .iter()
        .map(|m| m.cells - m.counts["uncertain"])
        .sum();
    let cells: u64 = before.counts.iter().map(|m| m.cells).sum();
    assert!(
        sure * 2 > cells,
        "the first model is sure of most cells: {sure}/{cells}"
    );
    let v2 = make_bundle_with_head(&r.d.dir, "v2", "2.0.0", &r.d.key, 2, 0.0);
    let s = r.d.store();
    s.install(&v2, &r.d.keys()).unwrap();
    s.activate("rbc-2.0.0", &r.d.keys()).unwrap();
    let report = r.handle.join().unwrap();
    assert_eq!(report.snapshot.frames.processed, frames as u64);
    assert!(r.mon.wait_for(Duration::from_secs(20), |o| o.counts.len()
        >= frames as usize));
    let o = r.mon.observed();
    assert_eq!(
        s.active().unwrap().as_deref(),
        Some("rbc-1.0.0"),
        "rolled back"
    );
    let events: Vec<(&str, &str, &str)> = o
        .model_events
        .iter()
        .map(|e| (e.event.as_str(), e.from.as_str(), e.to.as_str()))
        .collect();
    assert_eq!(
        events,
        [
            ("activated", "rbc-1.0.0", "rbc-2.0.0"),
            ("rollback", "rbc-2.0.0", "rbc-1.0.0")
        ]
    );
    assert!(
        o.model_events[1].reason.contains("uncertain"),
        "{}",
        o.model_events[1].reason
    );
    assert_eq!(model_runs(&o), ["rbc@1.0.0", "rbc@2.0.0", "rbc@1.0.0"]);
    assert!(
        o.seqs.iter().copied().eq(1..=o.seqs.len() as u64),
        "no gap in seq"
    );
}
