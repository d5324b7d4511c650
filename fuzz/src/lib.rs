//! Fuzz targets for every parser of outside data: each is a function over bytes that must
//! return (an error is fine) without panicking, hanging, allocating without bound, or writing
//! outside its own folder. `fuzz_targets/` wraps each for libFuzzer (`scripts/fuzz.sh`, with
//! cargo-fuzz on nightly); the tests below run every target over its checked-in corpus
//! (`corpus/TARGET/`), every crash found so far (`regressions/TARGET/`) and a fixed set of
//! mutations of both, on stable, in the test command.
//!
//! | target | what the bytes are |
//! |---|---|
//! | `bundle_manifest` | a bundle's `manifest.json` (signed by the harness, so the parser and every check after the signature run) |
//! | `bundle_archive` | a bundle `.tar` (opened as a signed bundle, and unpacked untrusted) |
//! | `config` | the TOML config |
//! | `command` | an MQTT command: first byte picks the command, the rest is its payload |
//! | `mjpg` / `yuyv` | a camera buffer (YUYV: the first two bytes give the frame size) |
//! | `image_file` | an image file for `analyze` and the replay source |
//! | `safetensors` | a checkpoint or a head |
//! | `point_labels` / `voc` / `coco` | the data-set importers' label files |

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use reddino_edge::pipeline::Shared;
use reddino_models::bundle::{self, Limits, SigningKey, TrustedKeys};

/// A target: bytes in, nothing out; it fails by panicking.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus folder and the libFuzzer binary share it).
pub const TARGETS: &[(&str, Target)] = &[
    ("bundle_manifest", bundle_manifest),
    ("bundle_archive", bundle_archive),
    ("config", config),
    ("command", command),
    ("mjpg", mjpg),
    ("yuyv", yuyv),
    ("image_file", image_file),
    ("safetensors", safetensors),
    ("point_labels", point_labels),
    ("voc", voc),
    ("coco", coco),
];

/// A private folder for the harness's files, made once per process.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"))
        .path()
}

/// A tiny PNG the label readers find as the image their labels belong to.
fn put_image(dir: &Path, name: &str) {
    let p = dir.join(name);
    if !p.exists() {
        image::RgbImage::new(64, 48)
            .save(&p)
            .expect("writing the test image");
    }
}

/// Bundle limits small enough that a fuzzed archive cannot fill the disk.
fn limits() -> Limits {
    Limits {
        max_file_bytes: 1 << 20,
        max_manifest_bytes: 64 << 10,
        max_entries: 16,
    }
}

fn key() -> &'static (SigningKey, TrustedKeys) {
    static KEY: OnceLock<(SigningKey, TrustedKeys)> = OnceLock::new();
    KEY.get_or_init(|| {
        let k = SigningKey::generate().expect("key");
        let mut t = TrustedKeys::new();
        t.add(&k.public_key_file().expect("public key"))
            .expect("trusted");
        (k, t)
    })
}

/// Files and folders directly in `dir`, by name.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn bundle_manifest(data: &[u8]) {
    let dir = scratch().join("manifest");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("folder");
    std::fs::write(dir.join(bundle::MANIFEST), data).expect("manifest");
    let (k, trusted) = key();
    bundle::sign_dir(&dir, k).expect("signing");
    let _ = bundle::open(&dir, trusted, &limits());
}

pub fn bundle_archive(data: &[u8]) {
    let root = scratch().join("archive");
    let _ = std::fs::remove_dir_all(&root);
    let dest = root.join("dest");
    std::fs::create_dir_all(&dest).expect("folder");
    let tar = root.join("b.tar");
    std::fs::write(&tar, data).expect("archive");
    let (_, trusted) = key();
    let _ = bundle::open_in(&tar, trusted, &limits(), &root);
    let _ = bundle::unpack(Cursor::new(data), &dest, &limits());
    // Nothing may land beside the destination (a path escaping it).
    let left: Vec<String> = listing(&root)
        .into_iter()
        .filter(|n| n != "dest" && n != "b.tar")
        .collect();
    assert!(
        left.is_empty(),
        "an archive wrote outside its folder: {left:?}"
    );
}

pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = reddino_edge::config::Config::parse(text, Path::new("fuzz.toml")) {
            // What the service derives from a config must not panic either.
            let _ = c.backend_spec();
            let _ = c.model_store();
            let _ = c.outbox.limits();
        }
    }
}

/// The commands a broker can send, by the first byte.
const LEAVES: &[&str] = &[
    "session/start",
    "session/stop",
    "status",
    "model/activate",
    "model/rollback",
    "reboot",
];

fn shared() -> &'static Arc<Shared> {
    static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();
    SHARED.get_or_init(|| {
        use reddino_edge::pipeline::{ModelInfo, PipelineSettings};
        use reddino_edge::publish::outbox::{Outbox, OutboxLimits};
        let outbox =
            Outbox::open(&scratch().join("outbox.db"), OutboxLimits::default()).expect("outbox");
        Shared::new(
            PipelineSettings {
                device_id: "fuzz".into(),
                topic_prefix: "reddino".into(),
                cells: Default::default(),
                crop: Default::default(),
                min_confidence: 0.5,
                frame_queue: 2,
                crop_queue: 2,
                camera_retry_max: std::time::Duration::from_secs(1),
                batch_wait: std::time::Duration::ZERO,
                camera_stall: std::time::Duration::from_secs(10),
                cpu_threads: 1,
                frame_workers: 0,
            },
            ModelInfo {
                id: "fuzz@1".into(),
                sha256: "0".repeat(64),
                backend: "tract".into(),
                provider: "cpu".into(),
                backend_detail: "tract".into(),
                class_names: vec!["a".into(), "b".into()],
                normalization: Default::default(),
                input_size: 14,
                size: None,
            },
            outbox,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
    })
}

pub fn command(data: &[u8]) {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let leaf = LEAVES[pick as usize % LEAVES.len()];
    let reply = shared().handle_command(leaf, payload);
    // Every reply goes on the wire.
    let bytes = serde_json::to_vec(&reply).expect("a reply serialises");
    assert!(!bytes.is_empty());
}

pub fn mjpg(data: &[u8]) {
    let _ = reddino_edge::capture::mjpg_to_rgb(data, None);
    let _ = reddino_edge::capture::mjpg_to_rgb(data, Some((64, 48)));
}

pub fn yuyv(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (w, h) = (u32::from(data[0]) * 2, u32::from(data[1]));
    let _ = reddino_edge::capture::yuyv_to_rgb(&data[2..], w, h);
}

pub fn image_file(data: &[u8]) {
    let _ = reddino_edge::capture::decode_image_bytes(data, Path::new("fuzz.img"));
}

pub fn safetensors(data: &[u8]) {
    let _ = reddino_models::weights::VitWeights::from_bytes(data, "fuzz");
    let _ = reddino_models::weights::LinearHead::from_bytes(data, "fuzz");
}

pub fn point_labels(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = reddino_edge::offline::labelled::parse_points(
            text,
            Path::new("fuzz.txt"),
            640,
            480,
            12,
        );
    }
}

pub fn voc(data: &[u8]) {
    let dir = scratch().join("voc");
    std::fs::create_dir_all(&dir).expect("folder");
    put_image(&dir, "a.png");
    std::fs::write(dir.join("a.xml"), data).expect("xml");
    let _ = reddino_edge::offline::labelled::read_voc(&dir);
}

pub fn coco(data: &[u8]) {
    let dir = scratch().join("coco");
    std::fs::create_dir_all(&dir).expect("folder");
    put_image(&dir, "a.png");
    let file: PathBuf = dir.join("a.json");
    std::fs::write(&file, data).expect("json");
    let _ = reddino_edge::offline::labelled::read_coco(&file, &dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of `fuzz/{what}/{target}/`.
    fn inputs(what: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(what)
            .join(target);
        let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .map(|p| {
                        let b = std::fs::read(&p).unwrap();
                        (p, b)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Fixed mutations of an input: truncations, byte flips, a repeated slice, small and
    /// large numbers spliced in.
    fn mutations(data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let n = data.len();
        for cut in [0, 1, n / 3, n / 2, n.saturating_sub(1)] {
            out.push(data[..cut.min(n)].to_vec());
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..24 {
            let mut d = data.to_vec();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if !d.is_empty() {
                    let i = (x as usize) % d.len();
                    d[i] = (x >> 32) as u8;
                }
            }
            out.push(d);
        }
        if n > 8 {
            let mut d = data.to_vec();
            let mid = n / 2;
            d.splice(mid..mid, data[mid - 4..mid + 4].repeat(8));
            out.push(d);
            for num in [
                "-1",
                "0",
                "4294967296",
                "1e308",
                "NaN",
                "99999999999999999999",
            ] {
                let mut d = data.to_vec();
                d.splice(mid..mid, num.bytes());
                out.push(d);
            }
        }
        out
    }

    #[test]
    fn every_target_survives_its_corpus_its_regressions_and_their_mutations() {
        for (name, target) in TARGETS {
            let corpus = inputs("corpus", name);
            assert!(!corpus.is_empty(), "{name}: no seed in fuzz/corpus/{name}");
            let mut runs = 0;
            for (path, data) in corpus.iter().chain(&inputs("regressions", name)) {
                for d in std::iter::once(data.clone()).chain(mutations(data)) {
                    let r = std::panic::catch_unwind(|| target(&d));
                    assert!(
                        r.is_ok(),
                        "{name} panicked on a mutation of {} ({} bytes)",
                        path.display(),
                        d.len()
                    );
                    runs += 1;
                }
            }
            eprintln!("{name}: {runs} inputs");
        }
        // The scratch folder lives in a static, which is never dropped.
        let _ = std::fs::remove_dir_all(scratch());
    }
}
