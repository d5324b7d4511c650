//! The soak run (scripts/soak.sh, docs/reliability.md): `reddino-edge run` on the shipped demo
//! model with a live synthetic camera at camera rate, against a real mosquitto that goes down
//! for 3-5 s every 20-40 s, for hours. Every 10 s it samples the service's memory (RSS), open
//! file descriptors, outbox and WAL sizes and the results received so far (`DIR/samples.csv`);
//! at the end it stops the service cleanly, waits for delivery and compares the results
//! produced (the outbox's sequence numbers) with those the subscriber received
//! (`DIR/summary.json`). Exits 1 if any result is missing.
//!
//! ```text
//! soak --minutes 60 --out DIR [--fps 8] [--width 640] [--height 480]
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use reddino_edge::offline::demo::monitor::Monitor;
use reddino_edge::publish::outbox::{Outbox, OutboxLimits};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 60.0)]
    minutes: f64,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8.0)]
    fps: f64,
    #[arg(long, default_value_t = 640)]
    width: u32,
    #[arg(long, default_value_t = 480)]
    height: u32,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    every: f64,
}

/// A mosquitto with persistence on one port, stopped and started again by the run.
struct Broker {
    conf: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(&mut self) -> Result<()> {
        let child = Command::new(mosquitto()?)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("mosquitto did not listen on {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mosquitto() -> Result<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .context("mosquitto is not installed (scripts/system-deps.sh --tests installs it)")
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A small deterministic generator for the flapping schedule.
struct Lcg(u64);
impl Lcg {
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (hi - lo) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out)?;
    // Absolute: the config's paths are read relative to its own folder.
    let out = &std::fs::canonicalize(&a.out)?;
    let state = out.join("state");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;
    let (bundle, key) = reddino_edge::model::demo_model(&state)?;
    let port = reddino_edge::offline::demo::broker::free_port()?;
    let conf_broker = state.join("mosquitto.conf");
    std::fs::create_dir_all(state.join("mosquitto"))?;
    let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?;
    std::fs::write(
        &conf_broker,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nuser {}\nlog_dest none\nmax_queued_messages 1000000\n",
            state.join("mosquitto").display(),
            user.trim()
        ),
    )?;
    let mut broker = Broker {
        conf: conf_broker,
        port,
        child: None,
    };
    broker.start()?;
    let outbox = state.join("outbox.db");
    let conf = state.join("edge.toml");
    std::fs::write(
        &conf,
        format!(
            r#"device_id = "soak"
[camera]
source = "synthetic"
width = {w}
height = {h}
fps = {fps}
frames = 1000000000
[model]
bundle = {bundle:?}
trusted_keys = [{key:?}]
batch = 16
[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_max_s = 1.0
status_interval_s = 5.0
drain_timeout_s = 120.0
[outbox]
path = {outbox:?}
"#,
            w = a.width,
            h = a.height,
            fps = a.fps,
        ),
    )?;
    let mon = Monitor::connect("127.0.0.1", port, "soak-subscriber", "reddino/soak")?;
    let exe = std::env::current_exe()?;
    let edge = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("reddino-edge"))
        .filter(|p| p.exists())
        .context(
            "reddino-edge beside the examples folder (cargo build --release -p reddino-edge)",
        )?;
    let log = std::fs::File::create(out.join("service.log"))?;
    let mut service = Command::new(&edge)
        .args(["run", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting reddino-edge run")?;
    let pid = service.id();

    let mut csv = std::fs::File::create(out.join("samples.csv"))?;
    writeln!(
        csv,
        "t_s,rss_kib,fds,outbox_bytes,wal_bytes,processed,pending,received,broker_up"
    )?;
    let started = Instant::now();
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let mut rng = Lcg(7);
    let mut next_flip = started + Duration::from_secs_f64(rng.between(20.0, 40.0));
    let mut next_sample = started;
    let mut flaps = 0u64;
    let mut up = true;
    while started.elapsed() < total {
        if let Ok(Some(st)) = service.try_wait() {
            bail!("the service exited during the soak: {st} (see service.log)");
        }
        let now = Instant::now();
        if now >= next_flip {
            if up {
                broker.stop();
                flaps += 1;
                next_flip = now + Duration::from_secs_f64(rng.between(3.0, 5.0));
            } else {
                broker.start()?;
                next_flip = now + Duration::from_secs_f64(rng.between(20.0, 40.0));
            }
            up = !up;
        }
        if now >= next_sample {
            let o = mon.observed();
            // The last will (sent while the broker is down) carries no counters.
            let (processed, pending) = o
                .status
                .as_ref()
                .filter(|s| !s.last_will)
                .map(|s| (s.frames.processed.to_string(), s.outbox.pending.to_string()))
                .unwrap_or_default();
            writeln!(
                csv,
                "{:.1},{},{},{},{},{},{},{},{}",
                started.elapsed().as_secs_f64(),
                rss_kib(pid),
                open_fds(pid),
                size(&outbox),
                size(&state.join("outbox.db-wal")),
                processed,
                pending,
                o.seqs.len(),
                u8::from(up)
            )?;
            csv.flush()?;
            next_sample = now + Duration::from_secs_f64(a.every);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    if !up {
        broker.start()?;
    }
    let (rss_end, fds_end) = (rss_kib(pid), open_fds(pid));
    signal(pid, "TERM");
    let status = service.wait()?;
    // Produced: every sequence number the outbox gave out.
    let produced = Outbox::open(&outbox, OutboxLimits::default())?.next_seq()? - 1;
    let t = Instant::now();
    while (mon.observed().seqs.len() as u64) < produced && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = mon.observed();
    let missing: Vec<u64> = (1..=produced).filter(|s| !o.seqs.contains(s)).collect();
    let summary = json!({
        "minutes": minutes,
        "fps": a.fps,
        "frame": [a.width, a.height],
        "broker_outages": flaps,
        "produced": produced,
        "delivered": o.seqs.len(),
        "missing": missing.len(),
        "missing_first": missing.iter().take(20).collect::<Vec<_>>(),
        "duplicates_dropped_by_seq": o.duplicates,
        "service_exit": status.to_string(),
        "rss_kib_end": rss_end,
        "fds_end": fds_end,
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!("{summary:#}");
    broker.stop();
    if !missing.is_empty() || !status.success() {
        std::process::exit(1);
    }
    Ok(())
}
