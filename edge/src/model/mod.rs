//! Opening a model, the same way for every command (`run`, `demo`, `analyze`): trusted keys
//! (with a warning for the published demo key), the bundle's signature and hashes, a
//! classification head, the self-test. Also the models shipped inside the binary and the
//! random bundles that exercise the pipeline. [`store`] keeps the installed versions.

pub mod store;

use std::path::{Path, PathBuf};

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{self, Bundle, Limits, NewBundle, SigningKey, TrustedKeys};
use reddino_models::taxonomy::default_class_names;
use reddino_models::weights::{LinearHead, Tensor, VitWeights};

use crate::error::{Error, Result};

/// Opens and verifies a bundle (signature, hashes, graph shapes) and runs its self-test.
pub fn open_bundle(path: &std::path::Path, keys: &[std::path::PathBuf]) -> Result<Bundle> {
    let mut trusted = TrustedKeys::new();
    for k in keys {
        trusted.add_file(k)?;
        if std::fs::read_to_string(k).is_ok_and(|t| is_demo_key(&t)) {
            log::warn!(
                "trusted key {} is the published demo key: anyone can sign bundles with it; never trust it on a clinical device",
                k.display()
            );
        }
    }
    let b = bundle::open(path, &trusted, &Limits::default())?;
    if b.manifest().class_names.is_empty() {
        return Err(Error::Usage(format!(
            "bundle {} has no classification head: export it with one (`reddino-trainer export --head`)",
            path.display()
        )));
    }
    let d = b.self_test()?;
    log::info!(
        "model {} {} verified (self-test max diff {d:.1e})",
        b.manifest().name,
        b.manifest().version
    );
    Ok(b)
}

/// sha256 (hex) of the signed manifest in a bundle folder: it names every file's hash, so it
/// identifies the model exactly.
pub fn manifest_sha256(dir: &Path) -> Result<String> {
    let p = dir.join(reddino_models::bundle::MANIFEST);
    let bytes = std::fs::read(&p).map_err(|e| Error::file("reading", &p, e))?;
    Ok(sha256_hex(&bytes))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The shipped demo model (models/demo/reddino-demo.tar): a ViT-tiny pretrained and
/// fine-tuned on synthetic smears only (docs/models/demo.md). For demonstrations and tests;
/// never for patients.
pub const DEMO_BUNDLE_TAR: &[u8] = include_bytes!("../../../models/demo/reddino-demo.tar");

/// The shipped real-smear model (models/chula/reddino-chula.tar): a ViT (192-d, 8 blocks)
/// pretrained and fine-tuned on the development fields of Chula RBC-12 (docs/models/chula.md),
/// cut by the real-smear finder; one lab, one microscope, 1000x; signed with the demo key; not
/// for diagnosis.
pub const CHULA_BUNDLE_TAR: &[u8] = include_bytes!("../../../models/chula/reddino-chula.tar");

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
    std::fs::create_dir_all(dir).map_err(|e| Error::file("creating", dir, e))?;
    let tar = dir.join(name);
    let key = dir.join("demo.pub");
    std::fs::write(&tar, bytes).map_err(|e| Error::file("writing", &tar, e))?;
    std::fs::write(&key, DEMO_PUBLIC_KEY).map_err(|e| Error::file("writing", &key, e))?;
    Ok((tar, key))
}

/// The demo model's signing key: published with the source (its secret too), so a device must
/// never trust it for clinical use.
pub const DEMO_PUBLIC_KEY: &str = include_str!("../../../models/demo/demo.pub");

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

/// A linear head over `classes` whose weights follow a fixed pattern of `seed` in
/// `-scale..scale` (0: every class equally likely), zero bias: for bundles that exercise the
/// pipeline and the store, never for counts that mean anything.
pub fn pattern_head(class_names: Vec<String>, dim: usize, seed: u64, scale: f32) -> LinearHead {
    let c = class_names.len();
    LinearHead {
        class_names,
        weight: Tensor::new(
            vec![c, dim],
            (0..c * dim)
                .map(|i| {
                    (((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5) * 2.0 * scale
                })
                .collect(),
        ),
        bias: Tensor::new(vec![c], vec![0.0; c]),
        size: None,
    }
}

/// Writes a signed bundle with a random tiny ViT and a random linear head over the default
/// classes; returns the bundle directory and the public key file.
pub fn random_bundle(dir: &Path, input_size: usize, seed: u64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file("creating", dir, e))?;
    let key = SigningKey::generate()?;
    let pub_path = dir.join("demo.pub");
    std::fs::write(&pub_path, key.public_key_file()?)
        .map_err(|e| Error::file("writing", &pub_path, e))?;
    let cfg = VitConfig::preset(Preset::Tiny, input_size)?;
    let w = VitWeights::random(&cfg, seed, 1.0)?;
    let head = pattern_head(default_class_names(), cfg.embed_dim, seed, 0.1);
    let out = dir.join("bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| Error::file("removing", &out, e))?;
    }
    bundle::write_dir(
        &NewBundle::new(
            "demo-random",
            "0.0.1",
            "random tiny ViT with a random head: exercises the pipeline, its counts mean nothing",
            &w,
            Some(&head),
        ),
        &out,
        &key,
    )?;
    Ok((out, pub_path))
}

/// The bundle and keys a command runs: `model` with its `keys` (at least one), or without a
/// model the `shipped` one, written into `staging` with the demo key (and a warning that it is
/// not for diagnosis).
pub fn model_or_shipped(
    model: Option<PathBuf>,
    keys: Vec<PathBuf>,
    shipped: Shipped,
    staging: &Path,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    if let Some(m) = model {
        if keys.is_empty() {
            return Err(Error::Usage(
                "no trusted key given: pass --trusted-key KEY.pub (the public key the bundle was signed with)".into(),
            ));
        }
        return Ok((m, keys));
    }
    let (tar, key) = shipped_model(shipped, staging)?;
    match shipped {
        Shipped::Chula => log::warn!(
            "no --model given: using the shipped reddino-chula model (real smears of one lab at 1000x, signed with the demo key; not for diagnosis)"
        ),
        Shipped::Demo => log::warn!(
            "no --model given: using the shipped demo model (trained on synthetic smears only; never for patients)"
        ),
    }
    Ok((tar, vec![key]))
}
