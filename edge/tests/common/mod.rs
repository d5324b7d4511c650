//! Test helpers: a real mosquitto broker per test (started and stopped by the test), signed
//! test bundles and configs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The mosquitto binary, or `None` (the test is then skipped, unless REDDINO_REQUIRE_MOSQUITTO
/// is set, as the test command does).
pub fn mosquitto_bin() -> Option<PathBuf> {
    let found = [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("REDDINO_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto is required (REDDINO_REQUIRE_MOSQUITTO) but not installed"
        );
        eprintln!("mosquitto not installed: skipping (scripts/test.sh installs it)");
    }
    found
}

/// A mosquitto broker on loopback with persistence, restartable on the same port.
pub struct Mosquitto {
    bin: PathBuf,
    conf: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(bin: PathBuf, dir: &Path) -> Mosquitto {
        Self::start_with(bin, dir, "allow_anonymous true\n")
    }

    /// With extra configuration lines (e.g. a password file instead of anonymous access).
    pub fn start_with(bin: PathBuf, dir: &Path, extra: &str) -> Mosquitto {
        let port = reddino_edge::offline::demo::broker::free_port().unwrap();
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{extra}persistence true\n\
                 persistence_location {}/\nuser {user}\nlog_dest none\nmax_queued_messages 100000\n",
                data.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            bin,
            conf,
            port,
            child: None,
        };
        m.restart();
        m
    }

    /// Starts the broker (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start mosquitto");
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it cleanly (SIGTERM: persistent sessions and queued messages are saved).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), "TERM");
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal with kill(1) (no libc binding needed in tests).
pub fn unsafe_kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A signed random tiny bundle at `input_size` in `dir`; returns (bundle dir, public key).
pub fn bundle(dir: &Path, input_size: usize) -> (PathBuf, PathBuf) {
    reddino_edge::model::random_bundle(dir, input_size, 3).unwrap()
}

/// A config for a test device; `camera` is the body of the `[camera]` table.
pub fn config_text(
    bundle: &Path,
    key: &Path,
    port: u16,
    outbox: &Path,
    camera: &str,
    extra_mqtt: &str,
) -> String {
    format!(
        r#"device_id = "test-scope"
[camera]
{camera}
[model]
bundle = {bundle:?}
trusted_keys = [{key:?}]
batch = 8
min_confidence = 0.0
[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_max_s = 0.5
status_interval_s = 0.5
drain_timeout_s = 20.0
{extra_mqtt}
[outbox]
path = {outbox:?}
"#,
        bundle = bundle.display().to_string(),
        key = key.display().to_string(),
        outbox = outbox.display().to_string(),
    )
}

pub const PREFIX: &str = "reddino/test-scope";
