//! `reddino-edge demo`: the whole service on embedded defaults. An in-process MQTT broker
//! (rumqttd) on loopback, the synthetic microscope paced like a camera, the shipped demo model
//! (models/demo/, embedded in the binary; or any bundle given), a subscriber that checks every
//! result arrives, a live view and a summary.

pub mod broker;
pub mod monitor;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

use crate::app::{RunReport, Service};
use crate::capture::build_source;
use crate::config::Config;
use crate::infer::TractBackend;
use crate::model::{demo_model, open_bundle, random_bundle};
use broker::{free_port, start_broker};
use monitor::{Monitor, Observed};

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

/// `reddino-edge demo`: runs the demo, prints its summary, and fails unless every result
/// reached the subscriber.
pub fn command(opts: &DemoOptions) -> Result<()> {
    let summary = run(opts)?;
    print!("{}", summary.render());
    if !summary.complete() {
        return Err(Error::Failed(
            "not every result reached the subscriber".into(),
        ));
    }
    Ok(())
}

/// Runs the demo.
pub fn run(opts: &DemoOptions) -> Result<DemoSummary> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::file("creating", &opts.out, e))?;
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
