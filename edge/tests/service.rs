//! The service end to end against a real mosquitto broker: results arrive once each in order
//! with totals equal to the detections; a broker outage and a SIGKILL lose nothing; bad
//! commands, a missing camera, corrupt frames and bad configs are reported and survived.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reddino_edge::capture::{FrameSource, SyntheticSource};
use reddino_edge::cells::{self, CellFinderConfig};
use reddino_edge::config::Config;
use reddino_edge::offline::demo::monitor::{Monitor, Observed};
use reddino_edge::publish::outbox::{Outbox, OutboxLimits};
use reddino_models::synth::SourcePreset;

fn load(dir: &Path, text: &str) -> Config {
    let p = dir.join("edge.toml");
    std::fs::write(&p, text).unwrap();
    Config::load(&p).unwrap()
}

fn run_in_thread(
    cfg: Config,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<reddino_edge::app::RunReport>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || reddino_edge::app::run(&cfg, s2).unwrap());
    (stop, h)
}

/// A broker, a small random bundle and a config (`edge.toml` in `dir`) for a live synthetic
/// camera of 320x240 at `fps`; returns the broker, the config file and the outbox.
fn live_device(
    dir: &Path,
    bin: std::path::PathBuf,
    fps: f64,
) -> (Mosquitto, std::path::PathBuf, std::path::PathBuf) {
    let broker = Mosquitto::start(bin, dir);
    let (b, k) = bundle(&dir.join("b"), 28);
    let outbox = dir.join("o.db");
    let live =
        format!("source = \"synthetic\"\nwidth = 320\nheight = 240\nframes = 100000\nfps = {fps}");
    let conf = dir.join("edge.toml");
    std::fs::write(&conf, config_text(&b, &k, broker.port, &outbox, &live, "")).unwrap();
    (broker, conf, outbox)
}

fn contiguous(seqs: &std::collections::BTreeSet<u64>) -> bool {
    seqs.iter().copied().eq(1..=seqs.len() as u64)
}

#[test]
fn results_arrive_once_in_order_with_totals_equal_to_detections() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let camera = r#"source = "synthetic"
sources = ["wright_100x", "giemsa_60x", "mgg_100x", "field_40x"]
width = 480
height = 360
frames = 8
seed = 40"#;
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), camera, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-e2e", PREFIX).unwrap();
    let (_stop, h) = run_in_thread(cfg);
    let report = h.join().unwrap();
    assert_eq!(report.snapshot.frames.processed, 8);
    assert_eq!(report.snapshot.frames.dropped, 0);
    assert_eq!(report.publisher.left_in_outbox, 0);
    assert!(mon.wait_for(Duration::from_secs(20), |o| o.seqs.len() >= 8));
    let o = mon.observed();
    assert_eq!(o.malformed, 0);
    assert!(contiguous(&o.seqs), "{:?}", o.seqs);
    assert_eq!(o.seqs.len(), 8);
    let order: Vec<u64> = o.counts.iter().map(|m| m.seq).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");

    // The same frames, analysed here: each message's total equals the detections.
    let mut src = SyntheticSource::new(
        ["wright_100x", "giemsa_60x", "mgg_100x", "field_40x"]
            .iter()
            .map(|n| SourcePreset::by_name(n).unwrap())
            .collect(),
        480,
        360,
        40,
        Some(8),
    );
    let sha = reddino_edge::model::manifest_sha256(&b).unwrap();
    assert_eq!(sha.len(), 64);
    let mut total = 0;
    while let Some(f) = src.next_frame().unwrap() {
        let found = cells::find(&f.image, &CellFinderConfig::default()).len() as u64;
        let m = o.counts.iter().find(|m| m.frame == f.index).unwrap();
        assert_eq!(m.cells, found, "frame {}", f.index);
        assert_eq!(m.counts.values().sum::<u64>(), found);
        assert_eq!(m.device, "test-scope");
        // Every result names the exact model that produced it.
        assert_eq!(m.model, "demo-random@0.0.1");
        assert_eq!(m.model_sha256, sha);
        // ... and the backend and provider that ran it.
        assert_eq!((m.backend.as_str(), m.provider.as_str()), ("tract", "cpu"));
        total += found;
    }
    assert!(total > 20, "too few cells to mean anything: {total}");
    assert_eq!(report.snapshot.frames.cells, total);
    // The retained status ends as offline, naming the backend and provider.
    assert!(mon.wait_for(Duration::from_secs(5), |o| o
        .status
        .as_ref()
        .is_some_and(|s| s.state == "offline")));
    let status = mon.observed().status.unwrap();
    assert_eq!(status.backend.as_deref(), Some("tract"));
    assert_eq!(status.provider.as_deref(), Some("cpu"));
    assert!(
        status
            .backend_detail
            .as_deref()
            .is_some_and(|d| d.starts_with("tract (CPU")),
        "{status:?}"
    );
}

#[test]
fn broker_outage_loses_no_result() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let camera = r#"source = "synthetic"
width = 320
height = 240
frames = 40
fps = 5.0"#;
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), camera, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-outage", PREFIX).unwrap();
    let (_stop, h) = run_in_thread(cfg);
    assert!(mon.wait_for(Duration::from_secs(30), |o| o.seqs.len() >= 3));
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    let report = h.join().unwrap();
    let processed = report.snapshot.frames.processed;
    assert!(processed >= 20, "processed {processed}");
    assert_eq!(report.publisher.left_in_outbox, 0);
    assert!(report.publisher.connects >= 2, "{:?}", report.publisher);
    assert!(
        mon.wait_for(Duration::from_secs(30), |o| o.seqs.len() as u64
            >= processed)
    );
    let o = mon.observed();
    assert!(
        contiguous(&o.seqs),
        "missing seq after the outage: {:?}",
        o.seqs
    );
    assert_eq!(o.seqs.len() as u64, processed);
}

#[test]
fn sigkill_then_restart_delivers_unacknowledged_results() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let port = reddino_edge::offline::demo::broker::free_port().unwrap();
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let outbox = tmp.path().join("o.db");
    // Phase 1: no broker yet; results pile up in the outbox; the service is killed mid-run.
    let live = r#"source = "synthetic"
width = 320
height = 240
frames = 100000
fps = 10.0"#;
    let conf = tmp.path().join("edge.toml");
    std::fs::write(&conf, config_text(&b, &k, port, &outbox, live, "")).unwrap();
    let exe = env!("CARGO_BIN_EXE_reddino-edge");
    let mut child = Command::new(exe)
        .args(["run", "--config"])
        .arg(&conf)
        .spawn()
        .unwrap();
    let t = Instant::now();
    let pending = loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(ob) = Outbox::open(&outbox, OutboxLimits::default()) {
            let n = ob.len().unwrap_or(0);
            if n >= 5 {
                break ob.pending_after(0, 1_000_000).unwrap();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no results stored");
        assert!(child.try_wait().unwrap().is_none(), "the service exited");
    };
    unsafe_kill(child.id(), "KILL");
    child.wait().unwrap();
    let ob = Outbox::open(&outbox, OutboxLimits::default()).unwrap();
    let stored: Vec<u64> = ob
        .pending_after(0, 1_000_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    drop(ob);
    assert!(stored.len() >= pending.len());
    assert_eq!(stored[0], 1);

    // Phase 2: broker up with a subscriber; the restarted service sends what was left.
    let mut broker = Mosquitto::start(bin, tmp.path());
    std::fs::write(&conf, config_text(&b, &k, broker.port, &outbox, live, "")).unwrap();
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-kill", PREFIX).unwrap();
    let mut child = Command::new(exe)
        .args(["run", "--config"])
        .arg(&conf)
        .spawn()
        .unwrap();
    let last = *stored.last().unwrap();
    // Everything stored before the kill arrives, and new results follow.
    let ok = mon.wait_for(Duration::from_secs(60), |o| {
        stored.iter().all(|s| o.seqs.contains(s)) && o.seqs.iter().any(|&s| s > last + 1)
    });
    unsafe_kill(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(
        ok,
        "not every stored result arrived: stored {stored:?}, got {:?}",
        mon.observed().seqs
    );
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    let o = mon.observed();
    // New results continue the numbering after the killed run's.
    assert!(o.seqs.iter().any(|&s| s > last), "{:?}", o.seqs);
    assert!(contiguous(&o.seqs), "{:?}", o.seqs);
    broker.stop();
}

#[test]
fn malformed_commands_get_error_replies_and_change_nothing() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let camera = r#"source = "synthetic"
width = 320
height = 240
fps = 4.0"#;
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), camera, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-cmd", PREFIX).unwrap();
    let (stop, h) = run_in_thread(cfg);
    assert!(mon.wait_for(Duration::from_secs(30), |o| o.status.is_some()));
    let cases: [(&str, &[u8], bool, &str); 10] = [
        ("session/start", b"{not json", false, "malformed"),
        (
            "session/start",
            br#"{"schema_version":9,"id":"a","session":"s1"}"#,
            false,
            "version",
        ),
        (
            "session/start",
            br#"{"schema_version":1,"id":"b"}"#,
            false,
            "needs",
        ),
        (
            "session/start",
            br#"{"schema_version":1,"id":"c","session":"../x y"}"#,
            false,
            "session name",
        ),
        (
            "session/start",
            br#"{"schema_version":1,"id":"d","session":"s1","extra":1}"#,
            false,
            "unknown field",
        ),
        (
            "reboot",
            br#"{"schema_version":1,"id":"e"}"#,
            false,
            "unknown command",
        ),
        (
            "session/stop",
            br#"{"schema_version":1,"id":"f"}"#,
            false,
            "no session",
        ),
        (
            "session/start",
            br#"{"schema_version":1,"id":"g","session":"slide-1"}"#,
            true,
            "",
        ),
        (
            "session/start",
            br#"{"schema_version":1,"id":"h","session":"slide-2"}"#,
            false,
            "slide-1",
        ),
        ("status", br#"{"schema_version":1,"id":"i"}"#, true, ""),
    ];
    for (n, (leaf, payload, ok, needle)) in cases.iter().enumerate() {
        mon.command(leaf, payload).unwrap();
        assert!(
            mon.wait_for(Duration::from_secs(10), |o| o.replies.len() > n),
            "no reply to {leaf} {}",
            String::from_utf8_lossy(payload)
        );
        let r = mon.observed().replies[n].clone();
        assert_eq!(r.ok, *ok, "{leaf}: {r:?}");
        if !ok {
            let e = r.error.unwrap();
            assert!(e.contains(needle), "{leaf}: {e:?} lacks {needle:?}");
        }
        // Refused commands before the valid start leave no session behind.
        if n < 7 {
            assert!(r.status.is_none());
        }
    }
    let r = &mon.observed().replies;
    assert_eq!(r[0].id, None);
    assert_eq!(r[1].id.as_deref(), Some("a"));
    assert_eq!(
        r[9].status.as_ref().unwrap().session.as_deref(),
        Some("slide-1"),
        "the refused second start did not replace the session"
    );
    // Still running: results keep coming, then a stop gives the session summary.
    let before = mon.observed().seqs.len();
    assert!(mon.wait_for(Duration::from_secs(20), |o| o.seqs.len() > before + 1));
    mon.command("session/stop", br#"{"schema_version":1,"id":"j"}"#)
        .unwrap();
    assert!(mon.wait_for(Duration::from_secs(10), |o| !o.sessions.is_empty()));
    let s = mon.observed().sessions[0].clone();
    assert_eq!(s.session, "slide-1");
    let in_session: u64 = mon
        .observed()
        .counts
        .iter()
        .filter(|m| m.session.as_deref() == Some("slide-1"))
        .map(|m| m.cells)
        .sum();
    assert_eq!(s.cells + s.uncertain, in_session);
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
}

#[test]
fn missing_camera_is_reported_and_the_service_keeps_running() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let camera = r#"source = "v4l2"
device = "/dev/reddino-missing-camera"
width = 640
height = 480
retry_max_s = 0.5"#;
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), camera, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-cam", PREFIX).unwrap();
    let (stop, h) = run_in_thread(cfg);
    assert!(
        mon.wait_for(Duration::from_secs(20), |o| o.status.as_ref().is_some_and(
            |s| s
                .camera_error
                .as_deref()
                .is_some_and(|e| e.contains("reddino-missing-camera"))
        ))
    );
    // Several seconds later it is still up and still saying why.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!h.is_finished());
    mon.command("status", br#"{"schema_version":1,"id":"s"}"#)
        .unwrap();
    assert!(mon.wait_for(Duration::from_secs(10), |o| !o.replies.is_empty()));
    let st = mon.observed().replies[0].status.clone().unwrap();
    assert_eq!(st.state, "online");
    assert!(st.camera_error.unwrap().contains("cannot open"));
    assert!(st.uptime_s >= 2.0);
    stop.store(true, Ordering::SeqCst);
    let report = h.join().unwrap();
    assert_eq!(report.snapshot.frames.processed, 0);
}

#[test]
fn corrupt_frames_are_counted_and_skipped() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let frames = tmp.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let mut src = SyntheticSource::new(
        vec![SourcePreset::by_name("wright_100x").unwrap()],
        320,
        240,
        5,
        Some(2),
    );
    let good = src.next_frame().unwrap().unwrap().image;
    good.save(frames.join("a.png")).unwrap();
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpg)
        .encode_image(&src.next_frame().unwrap().unwrap().image)
        .unwrap();
    // Raw camera buffers as recorded from V4L2: a truncated MJPG, a YUYV of the wrong size,
    // then a good MJPG; and an image file that is not one.
    std::fs::write(frames.join("b.mjpg"), &jpg[..jpg.len() * 2 / 3]).unwrap();
    std::fs::write(frames.join("c.yuyv"), vec![128u8; 320 * 200 * 2]).unwrap();
    std::fs::write(frames.join("d.mjpg"), &jpg).unwrap();
    std::fs::write(frames.join("e.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let camera = format!(
        "source = \"replay\"\nwidth = 320\nheight = 240\npaths = [{:?}]",
        frames.display().to_string()
    );
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), &camera, ""),
    );
    let (_stop, h) = run_in_thread(cfg);
    let report = h.join().unwrap();
    assert_eq!(report.snapshot.frames.bad, 3);
    assert_eq!(report.snapshot.frames.processed, 2);
    assert_eq!(report.publisher.left_in_outbox, 0);
}

#[test]
fn bad_configs_refuse_to_start_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_reddino-edge");
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let good = config_text(
        &b,
        &k,
        1,
        &tmp.path().join("o.db"),
        "source = \"synthetic\"",
        "",
    );
    for (text, needle) in [
        (good.replace("[mqtt]", "[mqtt]\nhots = \"x\""), "hots"),
        (good.replace("batch = 8", "batch = \"eight\""), "batch"),
        (
            good.replace("device_id = \"test-scope\"", "device_id = \"a/b\""),
            "device_id",
        ),
        ("device_id = \"x\"\n[camera\n".to_string(), "edge.toml"),
    ] {
        let conf = tmp.path().join("edge.toml");
        std::fs::write(&conf, &text).unwrap();
        let out = Command::new(exe)
            .args(["run", "--config"])
            .arg(&conf)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{needle}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // A bundle signed by a key that is not trusted: refused before anything runs.
    let other = tmp.path().join("other");
    let (_, other_key) = bundle(&other, 28);
    let conf = tmp.path().join("edge.toml");
    std::fs::write(
        &conf,
        good.replace(&k.display().to_string(), &other_key.display().to_string()),
    )
    .unwrap();
    let out = Command::new(exe)
        .args(["run", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signature") || err.contains("key"), "{err}");
    assert!(!tmp.path().join("o.db").exists(), "nothing started");
}

#[test]
fn credentials_work_and_the_password_never_reaches_the_log() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let secret = "s3cret-Pa55-do-not-log";
    let passwd = tmp.path().join("passwd");
    let ok = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["edge", secret])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mosquitto_passwd failed");
    let broker = Mosquitto::start_with(
        bin,
        tmp.path(),
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwd.display()
        ),
    );
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let exe = env!("CARGO_BIN_EXE_reddino-edge");
    let camera = "source = \"synthetic\"\nwidth = 320\nheight = 240\nframes = 3";
    for (password, delivered) in [(secret, true), ("wrong-password-also-secret", false)] {
        let pw_file = tmp.path().join("mqtt.password");
        std::fs::write(&pw_file, format!("{password}\n")).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let outbox = tmp.path().join(format!("o-{delivered}.db"));
        let mqtt = format!(
            "username = \"edge\"\npassword_file = {:?}",
            pw_file.display().to_string()
        );
        let text = config_text(&b, &k, broker.port, &outbox, camera, &mqtt)
            .replace("drain_timeout_s = 20.0", "drain_timeout_s = 3.0");
        let conf = tmp.path().join("edge.toml");
        std::fs::write(&conf, text).unwrap();
        let out = Command::new(exe)
            .args(["run", "--config"])
            .arg(&conf)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(
            !log.contains(password),
            "the password appears in the log:\n{log}"
        );
        if delivered {
            assert!(log.contains("0 left in the outbox"), "{log}");
        } else {
            assert!(
                log.contains("NotAuthorized") || log.contains("refused"),
                "{log}"
            );
            assert!(log.contains("3 left in the outbox"), "{log}");
        }
    }
}

/// A retained command (which the broker would replay at every reconnect: a stopped slide
/// starting again by itself) is refused with a reply and never run.
#[test]
fn retained_commands_are_refused_not_replayed() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let camera = "source = \"synthetic\"\nwidth = 320\nheight = 240\nframes = 12\nfps = 4.0";
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), camera, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-retained", PREFIX).unwrap();
    // Left on the broker before the device connects.
    mon.command_with(
        "session/start",
        br#"{"schema_version": 1, "id": "ghost", "session": "ghost-slide"}"#,
        true,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (_stop, h) = run_in_thread(cfg);
    let report = h.join().unwrap();
    assert_eq!(report.snapshot.frames.processed, 12);
    assert!(mon.wait_for(Duration::from_secs(20), |o| o.counts.len() >= 12));
    let o = mon.observed();
    let reply = o
        .replies
        .iter()
        .find(|r| r.id.as_deref() == Some("ghost"))
        .expect("a reply to the retained command");
    assert!(!reply.ok);
    assert!(
        reply.error.as_deref().unwrap().contains("retained"),
        "{reply:?}"
    );
    assert!(
        o.counts.iter().all(|m| m.session.is_none()),
        "no session was started"
    );
    assert!(o.sessions.is_empty());
}

/// A command over the client's packet limit (1 MiB) costs one reconnect, not the device: it is
/// not offered again, results keep flowing with no gap, and the next command is answered.
#[test]
fn an_oversized_command_does_not_silence_the_device() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let camera = "source = \"synthetic\"\nwidth = 320\nheight = 240\nframes = 80\nfps = 8.0";
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &tmp.path().join("o.db"), camera, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-big", PREFIX).unwrap();
    let (_stop, h) = run_in_thread(cfg);
    assert!(mon.wait_for(Duration::from_secs(30), |o| o.counts.len() >= 5));
    let mut big = br#"{"schema_version": 1, "id": "big", "session": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 1000));
    big.extend(br#""}"#);
    // Sent by a client that allows packets that large (the monitor's would refuse to send it).
    {
        let mut o = rumqttc::MqttOptions::new("big-sender", "127.0.0.1", broker.port);
        o.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut conn) = rumqttc::Client::new(o, 10);
        client
            .publish(
                format!("{PREFIX}/cmd/session/start"),
                rumqttc::QoS::AtLeastOnce,
                false,
                big,
            )
            .unwrap();
        for ev in conn.iter().take(20) {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = ev {
                break;
            }
        }
        let _ = client.disconnect();
    }
    // Commands go at QoS 0: one sent while the device is still reconnecting is not kept for it,
    // so its sender retries until a reply comes (as an operator's tool does), while the device
    // still has frames to analyse.
    let answered = |o: &Observed| {
        o.replies
            .iter()
            .any(|r| r.id.as_deref() == Some("after") && r.ok)
    };
    let mut replied = false;
    for _ in 0..20 {
        mon.command("status", br#"{"schema_version": 1, "id": "after"}"#)
            .unwrap();
        if mon.wait_for(Duration::from_secs(1), answered) {
            replied = true;
            break;
        }
    }
    let report = h.join().unwrap();
    assert!(replied, "the command after the oversized one was answered");
    assert_eq!(report.snapshot.frames.processed, 80);
    assert_eq!(report.publisher.left_in_outbox, 0, "every result delivered");
    assert!(mon.wait_for(Duration::from_secs(20), |o| o.counts.len() >= 80));
    let o = mon.observed();
    assert!(contiguous(&o.seqs), "{:?}", o.seqs);
    assert!(o.counts.iter().all(|m| m.session.is_none()));
}

#[test]
fn a_session_survives_a_sigkill_and_its_summary_covers_every_frame() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (mut broker, conf, _) = live_device(tmp.path(), bin, 10.0);
    let exe = env!("CARGO_BIN_EXE_reddino-edge");
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-session", PREFIX).unwrap();
    let start = || {
        Command::new(exe)
            .args(["run", "--config"])
            .arg(&conf)
            .spawn()
            .unwrap()
    };
    let in_session = |o: &reddino_edge::offline::demo::monitor::Observed| {
        o.counts
            .iter()
            .filter(|m| m.session.as_deref() == Some("slide-7"))
            .count()
    };
    let mut child = start();
    assert!(mon.wait_for(Duration::from_secs(30), |o| o.status.is_some()));
    mon.command(
        "session/start",
        br#"{"schema_version":1,"id":"a","session":"slide-7"}"#,
    )
    .unwrap();
    assert!(mon.wait_for(Duration::from_secs(30), |o| in_session(o) >= 3));
    unsafe_kill(child.id(), "KILL");
    child.wait().unwrap();
    // The broker publishes the last will: offline, marked as the will, without counters
    // (they would be as old as the connection).
    assert!(
        mon.wait_for(Duration::from_secs(20), |o| o
            .status
            .as_ref()
            .is_some_and(|s| s.state == "offline" && s.last_will)),
        "{:?}",
        mon.observed().status
    );
    let will = mon.observed().status.unwrap();
    assert_eq!(will.frames, Default::default(), "{will:?}");
    assert_eq!(will.model.as_deref(), Some("demo-random@0.0.1"));
    let before = in_session(&mon.observed());

    // After the restart the frames carry the session again, and stop works.
    let mut child = start();
    assert!(
        mon.wait_for(Duration::from_secs(60), |o| in_session(o) >= before + 3),
        "no frame carried the session after the restart"
    );
    mon.command("session/stop", br#"{"schema_version":1,"id":"b"}"#)
        .unwrap();
    assert!(mon.wait_for(Duration::from_secs(20), |o| !o.sessions.is_empty()));
    unsafe_kill(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    // Every result stored before the stop is delivered (none lost in the kill).
    let o = mon.observed();
    assert!(contiguous(&o.seqs), "{:?}", o.seqs);
    let s = &o.sessions[0];
    assert_eq!(s.session, "slide-7");
    assert_eq!(s.restarts, 1, "{s:?}");
    let frames: Vec<&reddino_edge::publish::messages::CountsMsg> = o
        .counts
        .iter()
        .filter(|m| m.session.as_deref() == Some("slide-7") && m.seq < s.seq)
        .collect();
    assert_eq!(
        s.frames,
        frames.len() as u64,
        "the summary covers exactly the frames stored with the session, before and after the kill"
    );
    let cells: u64 = frames.iter().map(|m| m.cells).sum();
    assert_eq!(s.cells + s.uncertain, cells);
    // Frames after the summary carry no session.
    assert!(o
        .counts
        .iter()
        .filter(|m| m.seq > s.seq)
        .all(|m| m.session.is_none()));
    broker.stop();
}

#[test]
fn sigkills_at_random_moments_with_a_flapping_broker_lose_nothing() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (mut broker, conf, outbox) = live_device(tmp.path(), bin, 20.0);
    let exe = env!("CARGO_BIN_EXE_reddino-edge");
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-kills", PREFIX).unwrap();
    // Kill times from a fixed generator: 0.3 to 2.5 s after each start, some while the
    // broker is down, some while it is up.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rand_ms = |lo: u64, hi: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo)
    };
    let kills = 8;
    for i in 0..kills {
        let mut child = Command::new(exe)
            .args(["run", "--config"])
            .arg(&conf)
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap();
        if i % 3 == 1 {
            broker.stop();
        }
        std::thread::sleep(Duration::from_millis(rand_ms(300, 2500)));
        unsafe_kill(child.id(), "KILL");
        child.wait().unwrap();
        if i % 3 == 1 {
            broker.restart();
        }
        // The outbox opens after every kill (no corruption).
        Outbox::open(&outbox, OutboxLimits::default()).unwrap();
    }
    // A last run, stopped cleanly: everything stored reaches the subscriber.
    let mut child = Command::new(exe)
        .args(["run", "--config"])
        .arg(&conf)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    unsafe_kill(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    let ob = Outbox::open(&outbox, OutboxLimits::default()).unwrap();
    let produced = ob.next_seq().unwrap() - 1;
    assert_eq!(ob.len().unwrap(), 0, "a clean stop drains the outbox");
    assert!(
        produced > 20,
        "too few results to mean anything: {produced}"
    );
    assert!(
        mon.wait_for(Duration::from_secs(30), |o| o.seqs.len() as u64 == produced),
        "produced {produced}, received {}",
        mon.observed().seqs.len()
    );
    let o = mon.observed();
    assert!(contiguous(&o.seqs), "{:?}", o.seqs);
    assert_eq!(*o.seqs.iter().next().unwrap(), 1);
    broker.stop();
}

/// Once an outbox fault is lifted: the status clears, results resume, and a clean stop
/// delivers every stored result, without a gap and with no frame failed. Returns the report.
fn recovers_and_delivers_everything(
    mon: &Monitor,
    stop: &AtomicBool,
    h: std::thread::JoinHandle<reddino_edge::app::RunReport>,
    outbox: &Path,
) -> reddino_edge::app::RunReport {
    assert!(
        mon.wait_for(Duration::from_secs(30), |o| o
            .status
            .as_ref()
            .is_some_and(|s| s.outbox.error.is_none() && s.state == "online")),
        "the outbox did not recover"
    );
    let before = mon.observed().seqs.len();
    assert!(
        mon.wait_for(Duration::from_secs(30), |o| o.seqs.len() > before + 3),
        "results did not resume"
    );
    stop.store(true, Ordering::SeqCst);
    let report = h.join().unwrap();
    assert_eq!(report.publisher.left_in_outbox, 0);
    let produced = Outbox::open(outbox, OutboxLimits::default())
        .unwrap()
        .next_seq()
        .unwrap()
        - 1;
    assert!(mon.wait_for(Duration::from_secs(20), |o| o.seqs.len() as u64 == produced));
    let o = mon.observed();
    assert!(contiguous(&o.seqs), "no gap: {:?}", o.seqs);
    assert_eq!(
        report.snapshot.frames.failed, 0,
        "{:?}",
        report.snapshot.frames
    );
    report
}

/// A small tmpfs mounted for the test (root only); unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    /// Fills what is left of it with one file; returns the file.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_holds_results_until_there_is_room_again() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&tmp.path().join("state"), "16m") else {
        eprintln!("cannot mount a tmpfs here (not root): skipping");
        return;
    };
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let outbox = fs.0.join("o.db");
    let live = "source = \"synthetic\"\nwidth = 320\nheight = 240\nframes = 100000\nfps = 10.0";
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &outbox, live, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-full", PREFIX).unwrap();
    let (stop, h) = run_in_thread(cfg);
    assert!(mon.wait_for(Duration::from_secs(30), |o| o.seqs.len() >= 3));
    let filler = fs.fill();
    assert!(
        mon.wait_for(Duration::from_secs(60), |o| o
            .status
            .as_ref()
            .is_some_and(|s| s.outbox.error.is_some())),
        "the full disk never showed in status"
    );
    let err = mon.observed().status.unwrap().outbox.error.unwrap();
    assert!(err.contains("full"), "{err}");
    // Long enough for the 10 fps camera to overrun the queues behind the waiting result.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_file(&filler).unwrap();
    let report = recovers_and_delivers_everything(&mon, &stop, h, &outbox);
    assert!(
        report.snapshot.frames.dropped > 0,
        "frames behind the waiting result were dropped and counted"
    );
}

/// `chattr +i` (immutable: no write, even by root) or `-i` on the outbox's files.
fn immutable(outbox: &Path, on: bool) -> bool {
    let mut ok = true;
    for suffix in ["", "-wal", "-shm"] {
        let f = std::path::PathBuf::from(format!("{}{suffix}", outbox.display()));
        if f.exists() {
            ok &= Command::new("chattr")
                .arg(if on { "+i" } else { "-i" })
                .arg(&f)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        }
    }
    ok
}

#[test]
fn an_outbox_that_cannot_be_written_holds_results_until_it_can() {
    let Some(bin) = mosquitto_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(bin, tmp.path());
    let (b, k) = bundle(&tmp.path().join("b"), 28);
    let outbox = tmp.path().join("o.db");
    let live = "source = \"synthetic\"\nwidth = 320\nheight = 240\nframes = 100000\nfps = 10.0";
    let cfg = load(
        tmp.path(),
        &config_text(&b, &k, broker.port, &outbox, live, ""),
    );
    let mon = Monitor::connect("127.0.0.1", broker.port, "sub-ro", PREFIX).unwrap();
    let (stop, h) = run_in_thread(cfg);
    assert!(mon.wait_for(Duration::from_secs(30), |o| o.seqs.len() >= 3));
    if !immutable(&outbox, true) {
        immutable(&outbox, false);
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
        eprintln!("chattr +i is not available here (not root, or the file system has no such flag): skipping");
        return;
    }
    let shown = mon.wait_for(Duration::from_secs(30), |o| {
        o.status.as_ref().is_some_and(|s| s.outbox.error.is_some())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(immutable(&outbox, false));
    assert!(shown, "the unwritable outbox never showed in status");
    recovers_and_delivers_everything(&mon, &stop, h, &outbox);
}
