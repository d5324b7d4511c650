//! `reddino-edge demo`: the whole service on embedded defaults. An in-process MQTT broker
//! (rumqttd) on loopback, the synthetic microscope paced like a camera, the shipped demo model
//! (models/demo/, embedded in the binary; or any bundle given), a subscriber that checks every
//! result arrives, a live view and a summary.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, NewBundle, SigningKey};
use reddino_models::preprocess::Normalization;
use reddino_models::taxonomy::default_class_names;
use reddino_models::weights::{LinearHead, Tensor, VitWeights};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::app::{build_source, open_bundle, RunReport, Service};
use crate::config::Config;
use crate::infer::TractBackend;
use crate::messages::{CountsMsg, ReplyMsg, SessionMsg, StatusMsg};

/// Demo settings, also the `reddino-edge demo` options (the defaults keep it under a minute
/// on two cores).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Frames from the synthetic microscope.
    #[arg(long, default_value_t = 16)]
    pub frames: u64,
    /// Camera frame rate; frames are dropped when analysis falls behind.
    #[arg(long, default_value_t = 1.0)]
    pub fps: f64,
    #[arg(long, default_value_t = 960)]
    pub width: u32,
    #[arg(long, default_value_t = 540)]
    pub height: u32,
    /// Model bundle (directory or .tar) to run instead of the shipped demo model.
    #[arg(long, requires = "trusted_key")]
    pub model: Option<PathBuf>,
    /// Public key the `--model` bundle is signed with.
    #[arg(long)]
    pub trusted_key: Option<PathBuf>,
    /// Run a random, untrained tiny ViT instead (exercises the pipeline; counts mean nothing).
    #[arg(long, conflicts_with = "model")]
    pub random_model: bool,
    /// Input size of the `--random-model` (a multiple of 14).
    #[arg(long, default_value_t = 56)]
    pub input_size: usize,
    /// Where the bundle and outbox go.
    #[arg(long, default_value = "target/edge-demo")]
    pub out: PathBuf,
    /// Redraw one status line (on a terminal) instead of printing progress lines.
    #[arg(skip = true)]
    pub live: bool,
}

/// The shipped demo model (models/demo/reddino-demo.tar): a ViT-tiny pretrained and
/// fine-tuned on synthetic smears only (docs/models/demo.md). For demonstrations and tests;
/// never for patients.
pub const DEMO_BUNDLE_TAR: &[u8] = include_bytes!("../../models/demo/reddino-demo.tar");

/// The shipped real-smear model (models/chula/reddino-chula.tar): a ViT-tiny pretrained and
/// fine-tuned on the development fields of Chula RBC-12 (docs/models/chula.md), cut by the
/// real-smear finder; one lab, one microscope, 1000x; signed with the demo key; not for
/// diagnosis.
pub const CHULA_BUNDLE_TAR: &[u8] = include_bytes!("../../models/chula/reddino-chula.tar");

/// A model shipped inside the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shipped {
    /// reddino-chula: real smears (Chula RBC-12 classes).
    Chula,
    /// reddino-demo: the synthetic microscope's smears (default taxonomy).
    Demo,
}

/// Writes a shipped model and the demo public key it is signed with into `dir`; returns
/// (bundle tar, key).
pub fn shipped_model(which: Shipped, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (name, bytes) = match which {
        Shipped::Chula => ("reddino-chula.tar", CHULA_BUNDLE_TAR),
        Shipped::Demo => ("reddino-demo.tar", DEMO_BUNDLE_TAR),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join(name);
    let key = dir.join("demo.pub");
    std::fs::write(&tar, bytes).with_context(|| format!("writing {}", tar.display()))?;
    std::fs::write(&key, DEMO_PUBLIC_KEY).with_context(|| format!("writing {}", key.display()))?;
    Ok((tar, key))
}

/// The demo model's signing key: published with the source (its secret too), so a device must
/// never trust it for clinical use.
pub const DEMO_PUBLIC_KEY: &str = include_str!("../../models/demo/demo.pub");

/// Writes the shipped demo model and its public key into `dir`; returns (bundle tar, key).
pub fn demo_model(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    shipped_model(Shipped::Demo, dir)
}

/// Whether a public key file's key is the published demo key.
pub fn is_demo_key(public_key_file: &str) -> bool {
    let key_line = |s: &str| {
        s.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .map(str::to_string)
    };
    key_line(public_key_file).is_some() && key_line(public_key_file) == key_line(DEMO_PUBLIC_KEY)
}

/// Writes a signed bundle with a random tiny ViT and a random linear head over the default
/// classes; returns the bundle directory and the public key file.
pub fn random_bundle(dir: &Path, input_size: usize, seed: u64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = SigningKey::generate()?;
    let pub_path = dir.join("demo.pub");
    std::fs::write(&pub_path, key.public_key_file()?)?;
    let cfg = VitConfig::preset(Preset::Tiny, input_size)?;
    let w = VitWeights::random(&cfg, seed, 1.0)?;
    let names = default_class_names();
    let (c, d) = (names.len(), cfg.embed_dim);
    let head = LinearHead {
        class_names: names,
        weight: Tensor::new(
            vec![c, d],
            (0..c * d)
                .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
                .collect(),
        ),
        bias: Tensor::new(vec![c], vec![0.0; c]),
    };
    let out = dir.join("bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    bundle::write_dir(
        &NewBundle {
            name: "demo-random".into(),
            version: "0.0.1".into(),
            description: "random tiny ViT with a random head: exercises the pipeline, its counts mean nothing".into(),
            weights: &w,
            head: Some(&head),
            normalization: Normalization::default(),
            crop_min_side: 0.0,
            blank_neighbours: false,
            cell_finder: String::new(),
        },
        &out,
        &key,
    )?;
    Ok((out, pub_path))
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts an in-process MQTT broker on `127.0.0.1:port`.
pub fn start_broker(port: u16) -> Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text).context("broker config")?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                log::error!("demo broker stopped: {e}");
            }
        })?;
    // Wait until it accepts connections.
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the demo broker did not start on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What a subscriber saw.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub seqs: BTreeSet<u64>,
    pub duplicates: u64,
    pub counts: Vec<CountsMsg>,
    pub sessions: Vec<SessionMsg>,
    pub replies: Vec<ReplyMsg>,
    pub status: Option<StatusMsg>,
    pub malformed: u64,
}

/// An MQTT subscriber to `{prefix}/{device}/#` that records results by `seq` (de-duplicated),
/// replies and the status; it can also send commands.
pub struct Monitor {
    client: Client,
    pub seen: Arc<Mutex<Observed>>,
    prefix: String,
}

impl Monitor {
    /// Connects with a persistent session (so results published while it is away are kept
    /// for it by the broker) and subscribes.
    pub fn connect(host: &str, port: u16, client_id: &str, prefix: &str) -> Result<Monitor> {
        let mut o = MqttOptions::new(client_id, host, port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(o, 256);
        client.subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)?;
        let seen = Arc::new(Mutex::new(Observed::default()));
        let (s2, p2) = (seen.clone(), prefix.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let mut ready = Some(ready_tx);
                for ev in conn.iter() {
                    match ev {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            record(&s2, &p2, &p.topic, &p.payload)
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::RequestsDone) => break,
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .context("the subscriber could not subscribe in time")?;
        Ok(Monitor {
            client,
            seen,
            prefix: prefix.to_string(),
        })
    }

    /// Publishes a command (`leaf` after `cmd/`) with a raw payload.
    pub fn command(&self, leaf: &str, payload: &[u8]) -> Result<()> {
        self.client.publish(
            format!("{}/cmd/{leaf}", self.prefix),
            QoS::AtLeastOnce,
            false,
            payload.to_vec(),
        )?;
        Ok(())
    }

    /// Waits until `f` holds for what was seen.
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&Observed) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if f(&self.seen.lock().unwrap()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f(&self.seen.lock().unwrap())
    }

    pub fn observed(&self) -> Observed {
        self.seen.lock().unwrap().clone()
    }

    pub fn disconnect(self) {
        let _ = self.client.disconnect();
    }
}

fn record(seen: &Mutex<Observed>, prefix: &str, topic: &str, payload: &[u8]) {
    let mut s = seen.lock().unwrap();
    let leaf = topic
        .strip_prefix(prefix)
        .unwrap_or(topic)
        .trim_start_matches('/');
    match leaf {
        "counts" => match serde_json::from_slice::<CountsMsg>(payload) {
            Ok(m) => {
                if s.seqs.insert(m.seq) {
                    s.counts.push(m);
                } else {
                    s.duplicates += 1;
                }
            }
            Err(_) => s.malformed += 1,
        },
        "session" => match serde_json::from_slice::<SessionMsg>(payload) {
            Ok(m) => {
                if s.seqs.insert(m.seq) {
                    s.sessions.push(m);
                } else {
                    s.duplicates += 1;
                }
            }
            Err(_) => s.malformed += 1,
        },
        "reply" => match serde_json::from_slice::<ReplyMsg>(payload) {
            Ok(m) => s.replies.push(m),
            Err(_) => s.malformed += 1,
        },
        "status" => match serde_json::from_slice::<StatusMsg>(payload) {
            Ok(m) => s.status = Some(m),
            Err(_) => s.malformed += 1,
        },
        _ => {}
    }
}

/// What the demo reports at the end.
#[derive(Debug)]
pub struct DemoSummary {
    pub run: RunReport,
    pub observed: Observed,
    pub wall: Duration,
    pub model: ModelKind,
}

/// Which model the demo ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// The shipped demo model.
    Demo,
    /// A random tiny ViT (`--random-model`).
    Random,
    /// A bundle given with `--model`.
    Given,
}

/// Runs the demo.
pub fn run(opts: &DemoOptions) -> Result<DemoSummary> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&opts.out)?;
    println!("RedDino Edge demo (output in {})", opts.out.display());
    let (bundle_dir, pub_key, model) = match (&opts.model, &opts.trusted_key) {
        (Some(m), Some(k)) => (m.clone(), k.clone(), ModelKind::Given),
        _ if opts.random_model => {
            println!(
                "- building a signed bundle with a random tiny ViT (input {} px)",
                opts.input_size
            );
            let (b, k) = random_bundle(&opts.out, opts.input_size, 7)?;
            (b, k, ModelKind::Random)
        }
        _ => {
            let (b, k) = demo_model(&opts.out)?;
            (b, k, ModelKind::Demo)
        }
    };
    let port = free_port()?;
    start_broker(port)?;
    println!("- MQTT broker (in-process) on 127.0.0.1:{port}");
    let outbox = opts.out.join("outbox.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", outbox.display()));
    }
    let text = format!(
        r#"
device_id = "demo-scope"
[camera]
source = "synthetic"
sources = ["wright_100x", "giemsa_60x", "mgg_100x", "field_40x"]
width = {w}
height = {h}
frames = {frames}
fps = {fps}
seed = 100
[model]
bundle = {bundle:?}
trusted_keys = [{key:?}]
batch = 16
min_confidence = 0.0
[mqtt]
host = "127.0.0.1"
port = {port}
status_interval_s = 2.0
drain_timeout_s = 10.0
[outbox]
path = {outbox:?}
"#,
        w = opts.width,
        h = opts.height,
        frames = opts.frames,
        fps = opts.fps,
        bundle = bundle_dir.display().to_string(),
        key = pub_key.display().to_string(),
        outbox = outbox.display().to_string(),
    );
    let cfg = Config::parse(&text, Path::new("<demo>"))?;
    let monitor = Monitor::connect("127.0.0.1", port, "demo-monitor", "reddino/demo-scope")?;
    let b = open_bundle(&cfg.model.bundle, &cfg.model.trusted_keys)?;
    println!(
        "- model {} {} ({}, input {} px, {} classes){}",
        b.manifest().name,
        b.manifest().version,
        bundle_dir.display(),
        b.manifest().input_size,
        b.manifest().class_names.len(),
        match model {
            ModelKind::Demo => ": the shipped demo model, trained on synthetic smears only",
            ModelKind::Random => ": random weights",
            ModelKind::Given => "",
        }
    );
    let backend = TractBackend::from_bundle(&b, cfg.model.batch, cfg.model.threads)?;
    println!(
        "- synthetic microscope: {} frames of {}x{} at {} fps, 4 acquisition sources",
        opts.frames, opts.width, opts.height, opts.fps
    );
    let svc = Service::start(
        &cfg,
        &b,
        Box::new(backend),
        build_source(&cfg.camera)?,
        Arc::new(AtomicBool::new(false)),
        Some("demo-slide"),
    )?;
    let tty = opts.live && std::io::stdout().is_terminal();
    let mut last_line = Instant::now();
    while svc.pipeline_running() {
        std::thread::sleep(Duration::from_millis(250));
        if tty || last_line.elapsed() > Duration::from_secs(3) {
            let line = live_line(&svc, &monitor);
            if tty {
                print!("\r\x1b[2K{line}");
                let _ = std::io::stdout().flush();
            } else {
                println!("  {line}");
            }
            last_line = Instant::now();
        }
    }
    if tty {
        println!();
    }
    // Close the slide through the command topic, as a lab system would.
    monitor.command("session/stop", br#"{"schema_version":1,"id":"demo-stop"}"#)?;
    let stopped = monitor.wait_for(Duration::from_secs(10), |o| {
        o.replies
            .iter()
            .any(|r| r.id.as_deref() == Some("demo-stop"))
    });
    if !stopped {
        log::warn!("no reply to session/stop within 10 s");
    }
    let run = svc.finish();
    let expected = run.snapshot.frames.processed + u64::from(stopped);
    monitor.wait_for(Duration::from_secs(10), |o| o.seqs.len() as u64 >= expected);
    let observed = monitor.observed();
    monitor.disconnect();
    Ok(DemoSummary {
        run,
        observed,
        wall: t0.elapsed(),
        model,
    })
}

fn live_line(svc: &Service, monitor: &Monitor) -> String {
    let s = svc.shared.snapshot();
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let rx = monitor.seen.lock().unwrap().seqs.len();
    let mut top: Vec<(String, u64)> = s
        .session_counts
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    let top: Vec<String> = top
        .iter()
        .take(4)
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    format!(
        "frames {} (dropped {}) | cells {} | {:.1} cells/s | p50 {:.0} ms | MQTT received {} | {}",
        s.frames.processed,
        s.frames.dropped,
        s.frames.cells,
        s.frames.cells as f64 / secs,
        s.p50_ms.unwrap_or(0.0),
        rx,
        top.join(", ")
    )
}

impl DemoSummary {
    /// The summary printed at the end.
    pub fn render(&self) -> String {
        let f = &self.run.snapshot.frames;
        let secs = self.run.snapshot.elapsed.as_secs_f64().max(1e-9);
        let mut out = String::new();
        let o = &self.observed;
        let received_cells: u64 = o.counts.iter().map(|m| m.cells).sum();
        out += "\n== RedDino Edge demo summary ==\n";
        out += &format!(
            "frames: {} captured, {} analysed, {} dropped (camera faster than analysis), {} bad\n",
            f.captured, f.processed, f.dropped, f.bad
        );
        out += &format!(
            "cells: {} found and classified, {:.1} cells/s, {:.2} frames/s\n",
            f.cells,
            f.cells as f64 / secs,
            f.processed as f64 / secs
        );
        if let (Some(p50), Some(p99)) = (self.run.snapshot.p50_ms, self.run.snapshot.p99_ms) {
            out +=
                &format!("frame latency (capture to result): p50 {p50:.0} ms, p99 {p99:.0} ms\n");
        }
        let max_seq = o.seqs.iter().next_back().copied().unwrap_or(0);
        let missing = (1..=max_seq).filter(|s| !o.seqs.contains(s)).count();
        out += &format!(
            "MQTT: {} results published, {} acknowledged, {} received by the subscriber ({} duplicates removed, {} missing), {} cells in received counts, {} left in the outbox\n",
            self.run.publisher.published,
            self.run.publisher.acked,
            o.seqs.len(),
            o.duplicates,
            missing,
            received_cells,
            self.run.publisher.left_in_outbox
        );
        if let Some(s) = o.sessions.last() {
            out += &format!(
                "session {:?}: {} frames, {} cells classified, {} uncertain\n",
                s.session, s.frames, s.cells, s.uncertain
            );
            let mut classes = s.classes.clone();
            classes.sort_by_key(|c| std::cmp::Reverse(c.count));
            for c in classes.iter().filter(|c| c.count > 0) {
                out += &format!(
                    "  {:<14} {:>6}  {:>5.1}%  (95% CI {:.1}-{:.1}%)\n",
                    c.class,
                    c.count,
                    100.0 * c.proportion,
                    100.0 * c.ci95[0],
                    100.0 * c.ci95[1]
                );
            }
            if let (Some(p), Some(ci)) = (s.parasitemia_pct, s.parasitemia_ci95) {
                out += &format!(
                    "  parasitemia {p:.2}% (95% CI {:.2}-{:.2}%)\n",
                    ci[0], ci[1]
                );
            }
        }
        match self.model {
            ModelKind::Demo => out += "note: the demo model was trained on synthetic smears only (docs/models/demo.md) and is\n      signed with a published key: for demonstrations, never for patients.\n",
            ModelKind::Random => out += "note: the model is random and untrained; the class counts exercise the pipeline and\n      mean nothing.\n",
            ModelKind::Given => {}
        }
        out += &format!("wall time {:.1} s\n", self.wall.as_secs_f64());
        out
    }

    /// Whether every result reached the subscriber exactly once after de-duplication.
    pub fn complete(&self) -> bool {
        let o = &self.observed;
        let max_seq = o.seqs.iter().next_back().copied().unwrap_or(0);
        self.run.publisher.left_in_outbox == 0
            && o.seqs.len() as u64 == max_seq
            && o.counts.len() as u64 == self.run.snapshot.frames.processed
    }
}

/// Per-class totals over received counts messages.
pub fn totals(counts: &[CountsMsg]) -> BTreeMap<String, u64> {
    let mut t = BTreeMap::new();
    for m in counts {
        for (c, n) in &m.counts {
            *t.entry(c.clone()).or_insert(0) += n;
        }
    }
    t
}
