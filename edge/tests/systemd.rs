//! Running under systemd: the units verify and are hardened (`systemd-analyze`), the service
//! speaks the notification protocol (READY after the first analysed frame, watchdog pings
//! while frames are analysed, STOPPING at shutdown), and the inbox installs dropped bundles.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UNITS: [&str; 3] = [
    "reddino-edge.service",
    "reddino-edge-inbox.service",
    "reddino-edge-inbox.path",
];

fn systemd_analyze() -> Option<PathBuf> {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("REDDINO_REQUIRE_SYSTEMD").is_none(),
            "REDDINO_REQUIRE_SYSTEMD is set but systemd-analyze is not installed"
        );
        eprintln!("systemd-analyze not installed: unit checks skipped");
    }
    found
}

/// The units with ExecStart pointing at the binary under test (verify wants it to exist).
fn units_here(dir: &Path) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    UNITS
        .iter()
        .map(|u| {
            let text = std::fs::read_to_string(src.join(u)).unwrap();
            let p = dir.join(u);
            std::fs::write(
                &p,
                text.replace("/usr/bin/reddino-edge", env!("CARGO_BIN_EXE_reddino-edge")),
            )
            .unwrap();
            p
        })
        .collect()
}

#[test]
fn units_verify_and_are_hardened() {
    let Some(sa) = systemd_analyze() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let units = units_here(tmp.path());
    let out = Command::new(&sa)
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Lines about the host (a missing systemctl in a container) are not about the units.
    let about_units: Vec<&str> = said
        .lines()
        .filter(|l| UNITS.iter().any(|u| l.contains(u)))
        .collect();
    assert!(out.status.success() && about_units.is_empty(), "{said}");
    for unit in units.iter().filter(|u| u.extension().unwrap() == "service") {
        let out = Command::new(&sa)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no rating for {}: {text}", unit.display()));
        let level: f32 = line
            .split(": ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {line:?}"));
        assert!(
            level <= 2.0,
            "{}: exposure {level} (limit 2.0)",
            unit.display()
        );
    }
}

/// `run` under a notify socket: READY=1 (with a status naming the model) once a frame has
/// been analysed, WATCHDOG=1 while frames are analysed, STOPPING=1 when it shuts down.
#[test]
fn run_notifies_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (bundle, key) = common::bundle(&dir.join("model"), 28);
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        common::config_text(
            &bundle,
            &key,
            1, // nothing listens: results stay in the outbox
            &dir.join("outbox.db"),
            "source = \"synthetic\"\nsources = [\"wright_100x\"]\nframes = 4\nwidth = 320\nheight = 240",
            "",
        )
        .replace("drain_timeout_s = 20.0", "drain_timeout_s = 0.5"),
    )
    .unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.iter().any(|m: &String| m.contains("STOPPING=1")) {
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).to_string()),
            Err(e) => panic!("no STOPPING within 60 s ({e}); got {got:?}"),
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let ready = got
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY");
    assert!(
        got[ready].contains("STATUS=analysing frames with demo-random"),
        "{got:?}"
    );
    let first_ping = got
        .iter()
        .position(|m| m.contains("WATCHDOG=1"))
        .expect("a ping");
    assert!(ready < first_ping, "ready first: {got:?}");
    assert_eq!(got.iter().filter(|m| m.contains("READY=1")).count(), 1);
}

/// A bundle dropped in the inbox is installed and activated, a refused one is reported beside
/// it, both move to done/, and a name starting with `.` (still being copied) is left alone.
#[test]
fn inbox_installs_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (bundle, key) = common::bundle(&dir.join("model"), 28);
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"inbox\"\n[camera]\nsource = \"synthetic\"\n[model]\nbundle = \"/nonexistent\"\n\
             trusted_keys = [{:?}]\n[outbox]\npath = {:?}\n",
            key.display().to_string(),
            dir.join("state/outbox.db").display().to_string()
        ),
    )
    .unwrap();
    let inbox = dir.join("state/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    // A good bundle (as a folder), a broken one, one still being copied.
    let good = inbox.join("good");
    std::fs::rename(&bundle, &good).unwrap();
    std::fs::write(inbox.join("broken.tar"), b"not a tar").unwrap();
    std::fs::write(inbox.join(".partial.tar"), b"half").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
        .args(["model", "--config"])
        .arg(&config)
        .arg("inbox")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |n: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(inbox.join(n)).unwrap()).unwrap()
    };
    let g = read("good.result.json");
    assert_eq!(g["ok"], true);
    assert_eq!(g["active"], "demo-random-0.0.1");
    let b = read("broken.tar.result.json");
    assert_eq!(b["ok"], false);
    assert!(b["error"].as_str().unwrap().contains("broken.tar"), "{b}");
    assert!(inbox.join("done/good").is_dir() && inbox.join("done/broken.tar").is_file());
    assert!(inbox.join(".partial.tar").exists());
    let store = std::fs::read_to_string(dir.join("state/models/active")).unwrap();
    assert_eq!(store.trim(), "demo-random-0.0.1");
    // Run again: nothing new, nothing changed.
    let out = Command::new(env!("CARGO_BIN_EXE_reddino-edge"))
        .args(["model", "--config"])
        .arg(&config)
        .arg("inbox")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

/// The Debian package (`cargo deb -p reddino-edge`) names files that exist: every asset but
/// the release binary, the maintainer scripts, and each unit the package installs.
#[test]
fn debian_package_metadata_names_files_that_exist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().unwrap();
    let mut units = Vec::new();
    for a in assets {
        let a = a.as_array().unwrap();
        let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
        if src.starts_with("target/") {
            continue;
        }
        assert!(dir.join(src).is_file(), "asset {src} is missing");
        if dest.starts_with("lib/systemd/system") {
            units.push(
                Path::new(src)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_string(),
            );
        }
    }
    units.sort();
    let mut expected: Vec<String> = UNITS.iter().map(|u| u.to_string()).collect();
    expected.sort();
    assert_eq!(units, expected, "every unit is packaged");
    let scripts = dir.join(deb["maintainer-scripts"].as_str().unwrap());
    for s in ["postinst", "postrm"] {
        let p = scripts.join(s);
        assert!(p.is_file(), "{} is missing", p.display());
        use std::os::unix::fs::PermissionsExt;
        assert!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o111 != 0);
    }
}
