//! Signed model bundles: what the trainer exports and the edge installs.
//!
//! A bundle is a flat directory (or an uncompressed tar of one) holding:
//! - `manifest.json`: format version, name, version, architecture, input size, mean/std, class
//!   names, the sha256 and size of every other file, and the self-test description;
//! - `manifest.json.minisig`: a minisign signature of the manifest (the standard `minisign`
//!   tool can make and check it);
//! - `model.onnx`: the graph from [`crate::onnx::export`];
//! - `selftest.safetensors`: a self-test input (`pixels`) and the expected `embedding`/`logits`.
//!
//! [`open`] refuses anything that does not verify, naming the problem: nothing in a bundle is
//! used before its manifest's signature is checked against the trusted keys.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::VitConfig;
use crate::cellsize::CellSize;
use crate::error::BundleError;
use crate::onnx::{self, Dim};
use crate::preprocess::{CropPolicy, Normalization};
use crate::runtime::TractModel;
use crate::weights::{read_tensors, serialize_tensors, LinearHead, Tensor, VitWeights};
use crate::Error;

/// The bundle format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// Signature file name.
pub const SIGNATURE: &str = "manifest.json.minisig";
/// Model file name.
pub const MODEL: &str = "model.onnx";
/// Self-test vector file name.
pub const SELF_TEST: &str = "selftest.safetensors";

/// Size and digest of one bundle file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Lower-case hex sha256.
    pub sha256: String,
    pub size: u64,
}

/// How the self-test is checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTestSpec {
    /// File holding `pixels` `[1, 3, S, S]` and the expected `embedding` (and `logits`).
    pub file: String,
    /// Largest allowed absolute difference of any output value (f32 CPU inference).
    pub tolerance: f32,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    pub arch: VitConfig,
    /// Square input side in pixels (equals `arch.img_size`).
    pub input_size: usize,
    pub embed_dim: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Class names of the head, by logit index; empty for an embedding-only model.
    pub class_names: Vec<String>,
    /// How cells are cut for this model: no crop smaller than this multiple of the frame's
    /// median cell (times the margin), see [`crate::preprocess::cell_crops`]; 0 (or absent) =
    /// each crop scaled to its own cell.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub crop_min_side: f32,
    /// How cells are cut for this model: the crop's side as a multiple of the cell's box, the
    /// margin its training crops were cut at (it overrides the device's `analysis.margin`);
    /// 0 (or absent) = the device's margin.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub crop_margin: f32,
    /// How cells are cut for this model: the other cells in a crop are blanked out, see
    /// [`crate::preprocess::cell_crops_blanked`]; false (or absent) = crops as they are.
    #[serde(default, skip_serializing_if = "is_false")]
    pub blank_neighbours: bool,
    /// The edge's cell-finder profile the model's crops were cut with (`real-smear` for
    /// models trained on real fields); empty (or absent) = the synthetic microscope's default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cell_finder: String,
    /// The head's size term, for a model trained with each cell's measured size as an input
    /// ([`crate::cellsize`]): the edge adds it to the ONNX graph's logits; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_size: Option<CellSize>,
    /// The graph's logits are the mean over this many turned and mirrored copies of each crop
    /// ([`crate::onnx::export_with_views`]: 4 = its quarter turns, 8 = those and their mirror
    /// images); 1 (or absent) = the crop alone. The graph does it: the edge feeds each crop
    /// once either way.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub test_time_views: usize,
    /// Every file of the bundle except the manifest and its signature.
    pub files: BTreeMap<String, FileEntry>,
    pub self_test: SelfTestSpec,
}

/// `crop_min_side` is 0 (off) or a multiple of the median cell in 0.25..=4.
pub fn check_crop_min_side(x: f32) -> Result<(), String> {
    check_multiple(
        "crop_min_side",
        x,
        "off",
        0.25..=4.0,
        "multiples of the median cell",
    )
}

/// `crop_margin` is 0 (the device's) or a multiple of the cell's box in 1..=4, the range
/// `analysis.margin` takes.
pub fn check_crop_margin(x: f32) -> Result<(), String> {
    check_multiple(
        "crop_margin",
        x,
        "the device's margin",
        1.0..=4.0,
        "multiples of the cell's box",
    )
}

/// A manifest field that is 0 (meaning `zero`) or a multiple of something in `range`; the
/// error names the field, both meanings and the unit.
fn check_multiple(
    field: &str,
    x: f32,
    zero: &str,
    range: std::ops::RangeInclusive<f32>,
    unit: &str,
) -> Result<(), String> {
    if x == 0.0 || range.contains(&x) {
        Ok(())
    } else {
        Err(format!(
            "`{field}` {x} is neither 0 ({zero}) nor in {}..={} ({unit})",
            range.start(),
            range.end()
        ))
    }
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

fn is_false(x: &bool) -> bool {
    !*x
}

fn one() -> usize {
    1
}

fn is_one(x: &usize) -> bool {
    *x == 1
}

impl Manifest {
    /// The normalisation the model expects.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.mean,
            std: self.std,
        }
    }

    /// The crop policy the model was trained with: its own margin ([`Manifest::crop_margin`]),
    /// else the device's `margin`.
    pub fn crop_policy(&self, margin: f32) -> CropPolicy {
        CropPolicy {
            margin: if self.crop_margin > 0.0 {
                self.crop_margin
            } else {
                margin
            },
            min_side: self.crop_min_side,
            blank_neighbours: self.blank_neighbours,
        }
    }
}

/// Limits applied while opening a bundle.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest file (model.onnx of ViT-L is about 1.2 GB).
    pub max_file_bytes: u64,
    /// Largest manifest or signature.
    pub max_manifest_bytes: u64,
    /// Most entries in an archive.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 4 << 30,
            max_manifest_bytes: 1 << 20,
            max_entries: 64,
        }
    }
}

/// A minisign secret key used to sign bundles.
pub struct SigningKey {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
}

impl SigningKey {
    /// A new random key pair.
    pub fn generate() -> Result<Self, Error> {
        let kp = minisign::KeyPair::generate_unencrypted_keypair()
            .map_err(|e| Error::Config(format!("cannot generate a key pair: {e}")))?;
        Ok(SigningKey {
            sk: kp.sk,
            pk: kp.pk,
        })
    }

    /// Reads a minisign secret key file (`password` for an encrypted one).
    pub fn from_file(path: &Path, password: Option<String>) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bx = minisign::SecretKeyBox::from_string(&text).map_err(|e| {
            Error::Config(format!(
                "{}: not a minisign secret key: {e}",
                path.display()
            ))
        })?;
        let sk = match password {
            None => bx.into_unencrypted_secret_key(),
            Some(p) => bx.into_secret_key(Some(p)),
        }
        .map_err(|e| {
            Error::Config(format!(
                "{}: cannot decrypt the secret key ({e}); pass its password or use an unencrypted key",
                path.display()
            ))
        })?;
        let pk = minisign::PublicKey::from_secret_key(&sk)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(SigningKey { sk, pk })
    }

    /// The secret key in minisign's file format (unencrypted).
    pub fn secret_key_file(&self, comment: &str) -> Result<String, Error> {
        self.sk
            .to_box(Some(comment))
            .map(|b| b.into_string())
            .map_err(|e| Error::Config(format!("cannot encode the secret key: {e}")))
    }

    /// The public key in minisign's `.pub` file format.
    pub fn public_key_file(&self) -> Result<String, Error> {
        self.pk
            .to_box()
            .map(|b| b.into_string())
            .map_err(|e| Error::Config(format!("cannot encode the public key: {e}")))
    }

    /// The public key as a single base64 line (the form `minisign -P` takes).
    pub fn public_key_base64(&self) -> String {
        self.pk.to_base64()
    }

    /// Signs `data`, returning the `.minisig` text.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String, Error> {
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            io::Cursor::new(data),
            Some(trusted_comment),
            Some("signature from reddino-models"),
        )
        .map_err(|e| Error::Config(format!("cannot sign: {e}")))?;
        Ok(sig.into_string())
    }
}

/// Public keys whose signatures are accepted.
#[derive(Default, Clone)]
pub struct TrustedKeys {
    keys: Vec<minisign_verify::PublicKey>,
}

impl TrustedKeys {
    /// No keys: every bundle is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key given as a `.pub` file's text or as its base64 line.
    pub fn add(&mut self, key: &str) -> Result<(), Error> {
        let key = key.trim();
        let pk = if key.contains('\n') {
            minisign_verify::PublicKey::decode(key)
        } else {
            minisign_verify::PublicKey::from_base64(key)
        }
        .map_err(|e| Error::Config(format!("not a minisign public key: {e}")))?;
        self.keys.push(pk);
        Ok(())
    }

    /// Adds the key in a `.pub` file.
    pub fn add_file(&mut self, path: &Path) -> Result<(), Error> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        self.add(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn verify(&self, data: &[u8], sig_text: &str) -> Result<(), BundleError> {
        let sig = minisign_verify::Signature::decode(sig_text).map_err(|e| {
            BundleError::BadSignature(format!("the signature file is malformed ({e})"))
        })?;
        if self.keys.is_empty() {
            return Err(BundleError::UntrustedKey(
                "no trusted keys are configured".into(),
            ));
        }
        let mut bad = None;
        for key in &self.keys {
            match key.verify(data, &sig, false) {
                Ok(()) => return Ok(()),
                Err(minisign_verify::Error::UnexpectedKeyId) => {}
                Err(e) => bad = Some(e),
            }
        }
        match bad {
            Some(minisign_verify::Error::InvalidSignature) => Err(BundleError::BadSignature(
                "manifest.json was changed after it was signed, or the signature is corrupt".into(),
            )),
            Some(e) => Err(BundleError::BadSignature(e.to_string())),
            None => Err(BundleError::UntrustedKey(format!(
                "none of the {} trusted key(s) made this signature",
                self.keys.len()
            ))),
        }
    }
}

/// Self-test input and expected outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTestVector {
    /// `[1, 3, S, S]`.
    pub pixels: Tensor,
    /// `[1, D]`.
    pub embedding: Tensor,
    /// `[1, C]` for models with a head.
    pub logits: Option<Tensor>,
}

impl SelfTestVector {
    fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut t = BTreeMap::new();
        t.insert("pixels".to_string(), self.pixels.clone());
        t.insert("embedding".to_string(), self.embedding.clone());
        if let Some(l) = &self.logits {
            t.insert("logits".to_string(), l.clone());
        }
        serialize_tensors(t.iter(), None)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let (mut t, _) = read_tensors(bytes, SELF_TEST)?;
        let mut take = |k: &str| {
            t.remove(k).ok_or_else(|| Error::MissingTensor {
                key: format!("{SELF_TEST}:{k}"),
                expected: vec![],
            })
        };
        let pixels = take("pixels")?;
        let embedding = take("embedding")?;
        let logits = take("logits").ok();
        Ok(SelfTestVector {
            pixels,
            embedding,
            logits,
        })
    }

    /// Largest absolute difference between `actual` and these expected outputs, or an error
    /// naming the output whose shape differs.
    pub fn max_abs_diff(&self, embedding: &[f32], logits: Option<&[f32]>) -> Result<f32, String> {
        let diff = |name: &str, want: &[f32], got: &[f32]| -> Result<f32, String> {
            if want.len() != got.len() {
                return Err(format!(
                    "`{name}` has {} values, expected {}",
                    got.len(),
                    want.len()
                ));
            }
            Ok(want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max))
        };
        let mut d = diff("embedding", &self.embedding.data, embedding)?;
        match (&self.logits, logits) {
            (Some(want), Some(got)) => d = d.max(diff("logits", &want.data, got)?),
            (None, None) => {}
            (Some(_), None) => return Err("the model produced no `logits`".into()),
            (None, Some(_)) => return Err("the model produced unexpected `logits`".into()),
        }
        if d.is_nan() {
            return Err("outputs contain NaN".into());
        }
        Ok(d)
    }
}

/// What goes into a new bundle.
#[derive(Clone)]
pub struct NewBundle<'a> {
    pub name: String,
    pub version: String,
    pub description: String,
    pub weights: &'a VitWeights,
    pub head: Option<&'a LinearHead>,
    pub normalization: Normalization,
    /// The crop policy the model was trained with ([`Manifest::crop_min_side`]).
    pub crop_min_side: f32,
    /// ([`Manifest::crop_margin`]).
    pub crop_margin: f32,
    /// ([`Manifest::blank_neighbours`]).
    pub blank_neighbours: bool,
    /// ([`Manifest::cell_finder`]).
    pub cell_finder: String,
    /// ([`Manifest::test_time_views`]).
    pub test_time_views: usize,
}

impl<'a> NewBundle<'a> {
    /// A bundle of `weights` (and `head`) with ImageNet normalisation, each crop scaled to its
    /// own cell, nothing blanked and the default cell finder; set the other fields after.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        description: impl Into<String>,
        weights: &'a VitWeights,
        head: Option<&'a LinearHead>,
    ) -> Self {
        NewBundle {
            name: name.into(),
            version: version.into(),
            description: description.into(),
            weights,
            head,
            normalization: Normalization::default(),
            crop_min_side: 0.0,
            crop_margin: 0.0,
            blank_neighbours: false,
            cell_finder: String::new(),
            test_time_views: 1,
        }
    }
}

fn sha256_file(path: &Path) -> Result<(String, u64), Error> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let n = io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok((hex::encode(h.finalize()), n))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Exports the model, computes its self-test vector with tract, and writes a signed bundle
/// directory at `dir` (which must not exist yet or be empty).
pub fn write_dir(new: &NewBundle<'_>, dir: &Path, key: &SigningKey) -> Result<Manifest, Error> {
    let cfg = &new.weights.config;
    check_crop_min_side(new.crop_min_side).map_err(Error::Config)?;
    check_crop_margin(new.crop_margin).map_err(Error::Config)?;
    if dir.exists()
        && fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_some()
    {
        return Err(Error::Config(format!(
            "{} exists and is not empty; choose a new output directory",
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let model = onnx::export_with_views(new.weights, new.head, new.test_time_views)?;

    // Self-test input: a fixed pseudo-random image in normalised units.
    let s = cfg.img_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5e1f_7e57);
    let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
    let pixels: Vec<f32> = (0..3 * s * s).map(|_| normal.sample(&mut rng)).collect();
    let runner = TractModel::new(&model, 1, s)?;
    let out = runner.run(&pixels)?;
    let vector = SelfTestVector {
        pixels: Tensor::new(vec![1, 3, s, s], pixels),
        embedding: Tensor::new(vec![1, cfg.embed_dim], out.embedding),
        logits: out.logits.map(|l| Tensor::new(vec![1, l.len()], l)),
    };

    write_file(&dir.join(MODEL), &model)?;
    write_file(&dir.join(SELF_TEST), &vector.to_bytes()?)?;
    let mut files = BTreeMap::new();
    for name in [MODEL, SELF_TEST] {
        let (sha256, size) = sha256_file(&dir.join(name))?;
        files.insert(name.to_string(), FileEntry { sha256, size });
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: new.name.clone(),
        version: new.version.clone(),
        description: new.description.clone(),
        arch: cfg.clone(),
        input_size: s,
        embed_dim: cfg.embed_dim,
        mean: new.normalization.mean,
        std: new.normalization.std,
        class_names: new.head.map(|h| h.class_names.clone()).unwrap_or_default(),
        crop_min_side: new.crop_min_side,
        crop_margin: new.crop_margin,
        blank_neighbours: new.blank_neighbours,
        cell_finder: new.cell_finder.clone(),
        cell_size: new.head.and_then(|h| h.size.clone()),
        test_time_views: new.test_time_views,
        files,
        self_test: SelfTestSpec {
            file: SELF_TEST.into(),
            tolerance: 1e-4,
        },
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    write_file(&dir.join(MANIFEST), &json)?;
    sign_dir(dir, key)?;
    Ok(manifest)
}

/// (Re)signs the manifest of a bundle directory.
pub fn sign_dir(dir: &Path, key: &SigningKey) -> Result<(), Error> {
    let path = dir.join(MANIFEST);
    let json = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let (name, version) = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("?").to_string(),
                v["version"].as_str().unwrap_or("?").to_string(),
            )
        })
        .unwrap_or_default();
    let sig = key.sign(&json, &format!("reddino bundle {name} {version}"))?;
    write_file(&dir.join(SIGNATURE), sig.as_bytes())
}

/// Packs a bundle directory into an uncompressed tar (sorted entries, fixed mode and mtime, so
/// the same directory always gives the same bytes).
pub fn pack(dir: &Path, out: &Path) -> Result<(), Error> {
    let mut names: Vec<String> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        if !ft.is_file() {
            return Err(Error::Config(format!(
                "{}: a bundle holds only regular files",
                entry.path().display()
            )));
        }
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    // The manifest and its signature first: opening checks them before it writes anything
    // else from the archive.
    names.sort_by_key(|n| (n != MANIFEST, n != SIGNATURE, n.clone()));
    let tmp = out.with_extension("tar.partial");
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut builder = tar::Builder::new(io::BufWriter::new(file));
    for name in &names {
        let path = dir.join(name);
        let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut header = tar::Header::new_ustar();
        header.set_size(len);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, &mut f)
            .map_err(|e| Error::io(&path, e))?;
    }
    let w = builder.into_inner().map_err(|e| Error::io(&tmp, e))?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}

/// A bundle whose signature, manifest, hashes and graph shapes have been verified.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    _staging: Option<tempfile::TempDir>,
}

impl Bundle {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Directory holding the verified files (a private staging directory for archives).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `model.onnx`.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(MODEL)
    }

    /// Reads `model.onnx`.
    pub fn read_model(&self) -> Result<Vec<u8>, Error> {
        let p = self.model_path();
        fs::read(&p).map_err(|e| Error::io(&p, e))
    }

    /// Reads the self-test vector.
    pub fn self_test_vector(&self) -> Result<SelfTestVector, Error> {
        let p = self.dir.join(&self.manifest.self_test.file);
        let bytes = fs::read(&p).map_err(|e| Error::io(&p, e))?;
        SelfTestVector::from_bytes(&bytes)
    }

    /// Runs the self-test with tract on the CPU; returns the largest difference seen.
    pub fn self_test(&self) -> Result<f32, Error> {
        let v = self.self_test_vector()?;
        let model = TractModel::new(&self.read_model()?, 1, self.manifest.input_size)?;
        let out = model.run(&v.pixels.data)?;
        let fail = |msg: String| Error::Bundle {
            bundle: self.dir.display().to_string(),
            kind: BundleError::SelfTest(msg),
        };
        let d = v
            .max_abs_diff(&out.embedding, out.logits.as_deref())
            .map_err(fail)?;
        if d > self.manifest.self_test.tolerance {
            return Err(fail(format!(
                "outputs differ from the expected ones by {d:.3e} (tolerance {:.1e})",
                self.manifest.self_test.tolerance
            )));
        }
        Ok(d)
    }
}

/// Opens and verifies a bundle directory or tar. Archives are unpacked (safely) into a private
/// staging directory under `std::env::temp_dir()`; see [`open_in`] to choose where.
pub fn open(path: &Path, trusted: &TrustedKeys, limits: &Limits) -> Result<Bundle, Error> {
    open_in(path, trusted, limits, &std::env::temp_dir())
}

/// [`open`], staging archives under `staging_parent`.
pub fn open_in(
    path: &Path,
    trusted: &TrustedKeys,
    limits: &Limits,
    staging_parent: &Path,
) -> Result<Bundle, Error> {
    let label = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let manifest = verify_dir(path, trusted, limits).map_err(|e| e.into_error(&label))?;
        return Ok(Bundle {
            dir: path.to_path_buf(),
            manifest,
            _staging: None,
        });
    }
    let staging = tempfile::Builder::new()
        .prefix(".reddino-bundle-")
        .tempdir_in(staging_parent)
        .map_err(|e| Error::io(staging_parent, e))?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    unpack_inner(file, staging.path(), limits, Some(trusted)).map_err(|e| e.into_error(&label))?;
    let manifest = verify_dir(staging.path(), trusted, limits).map_err(|e| e.into_error(&label))?;
    Ok(Bundle {
        dir: staging.path().to_path_buf(),
        manifest,
        _staging: Some(staging),
    })
}

/// An I/O failure or a refusal, before the bundle's label is attached.
enum Refusal {
    Bundle(BundleError),
    Other(Error),
}

impl Refusal {
    fn into_error(self, label: &str) -> Error {
        match self {
            Refusal::Bundle(kind) => Error::Bundle {
                bundle: label.into(),
                kind,
            },
            Refusal::Other(e) => e,
        }
    }
}

impl From<BundleError> for Refusal {
    fn from(e: BundleError) -> Self {
        Refusal::Bundle(e)
    }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Other(e)
    }
}

/// A name that stays inside the bundle: one normal path component.
fn plain_name(path: &Path) -> Option<String> {
    let mut comps = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir));
    match (comps.next(), comps.next()) {
        (Some(Component::Normal(n)), None) => n.to_str().map(str::to_string),
        _ => None,
    }
}

/// Unpacks a tar into `dest`, refusing entries that are not plain regular files, paths that
/// leave `dest`, oversized or duplicate entries, and truncated data.
pub fn unpack(reader: impl Read, dest: &Path, limits: &Limits) -> Result<(), Error> {
    unpack_inner(reader, dest, limits, None).map_err(|e| e.into_error(&dest.display().to_string()))
}

/// What the archive's first two entries said, once checked.
struct SignedList {
    files: BTreeMap<String, FileEntry>,
}

/// Unpacks an archive into `dest`. With `trusted`, the archive must open with the manifest and
/// its signature (as [`pack`] writes them): the signature is checked as soon as both are read,
/// before any other entry is written, and every later entry must be a file the signed
/// manifest lists, with the size it pins. An unsigned or forged archive is refused having
/// written at most the two small manifest files.
fn unpack_inner(
    reader: impl Read,
    dest: &Path,
    limits: &Limits,
    trusted: Option<&TrustedKeys>,
) -> Result<(), Refusal> {
    let mut signed: Option<SignedList> = None;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| BundleError::Truncated(e.to_string()))?;
    for (count, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| BundleError::Truncated(e.to_string()))?;
        if count >= limits.max_entries {
            return Err(BundleError::Truncated(format!(
                "more than {} entries; this is not a bundle",
                limits.max_entries
            ))
            .into());
        }
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        let path = PathBuf::from(&raw);
        if kind.is_dir()
            && plain_name(&path).is_none()
            && path.components().all(|c| matches!(c, Component::CurDir))
        {
            continue; // "./"
        }
        let unsafe_path = path.is_absolute()
            || path.components().any(|c| {
                matches!(
                    c,
                    Component::ParentDir | Component::RootDir | Component::Prefix(_)
                )
            });
        if unsafe_path {
            return Err(BundleError::UnsafePath(raw).into());
        }
        let kind_name = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => None,
            tar::EntryType::Symlink => Some("symbolic link"),
            tar::EntryType::Link => Some("hard link"),
            tar::EntryType::Directory => Some("directory"),
            tar::EntryType::Char | tar::EntryType::Block => Some("device"),
            tar::EntryType::Fifo => Some("FIFO"),
            _ => Some("special entry"),
        };
        if let Some(k) = kind_name {
            return Err(BundleError::NotARegularFile {
                entry: raw,
                kind: k.into(),
            }
            .into());
        }
        let Some(name) = plain_name(&path) else {
            return Err(BundleError::UnsafePath(raw).into());
        };
        let size = entry
            .header()
            .size()
            .map_err(|e| BundleError::Truncated(e.to_string()))?;
        let head = name == MANIFEST || name == SIGNATURE;
        let limit = if head {
            limits.max_manifest_bytes
        } else {
            limits.max_file_bytes
        };
        if size > limit {
            return Err(BundleError::Oversized {
                file: name,
                size,
                limit,
            }
            .into());
        }
        if let Some(trusted) = trusted {
            if !head {
                if signed.is_none() {
                    signed = Some(check_head(dest, trusted, limits)?);
                }
                let list = signed.as_ref().expect("checked above");
                match list.files.get(&name) {
                    None => return Err(BundleError::UnlistedFile(name).into()),
                    Some(f) if f.size != size => {
                        return Err(BundleError::SizeMismatch {
                            file: name,
                            expected: f.size,
                            actual: size,
                        }
                        .into())
                    }
                    Some(_) => {}
                }
            } else if signed.is_some() {
                return Err(
                    BundleError::BadManifest(format!("archive holds `{name}` twice")).into(),
                );
            }
        }
        let target = dest.join(&name);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Refusal::Bundle(BundleError::BadManifest(format!(
                        "archive holds `{name}` twice"
                    )))
                } else {
                    Refusal::Other(Error::io(&target, e))
                }
            })?;
        let written = io::copy(&mut (&mut entry).take(size), &mut out)
            .map_err(|e| BundleError::Truncated(format!("`{name}`: {e}")))?;
        if written != size {
            return Err(BundleError::Truncated(format!(
                "`{name}` ends after {written} of its {size} bytes"
            ))
            .into());
        }
    }
    Ok(())
}

/// The manifest and signature written so far (an archive's first two entries) verified
/// against `trusted`, and the files the manifest lists. Missing ones are refused as missing.
fn check_head(dir: &Path, trusted: &TrustedKeys, limits: &Limits) -> Result<SignedList, Refusal> {
    let manifest_bytes = read_limited(&dir.join(MANIFEST), MANIFEST, limits.max_manifest_bytes)?;
    let sig_bytes = read_limited(&dir.join(SIGNATURE), SIGNATURE, limits.max_manifest_bytes)?;
    let sig_text = String::from_utf8(sig_bytes)
        .map_err(|_| BundleError::BadSignature("the signature file is not text".into()))?;
    trusted.verify(&manifest_bytes, &sig_text)?;
    #[derive(serde::Deserialize)]
    struct Files {
        files: BTreeMap<String, FileEntry>,
    }
    let list: Files = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| BundleError::BadManifest(e.to_string()))?;
    Ok(SignedList { files: list.files })
}

fn read_limited(path: &Path, name: &str, limit: u64) -> Result<Vec<u8>, Refusal> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(if name == SIGNATURE {
                BundleError::MissingSignature
            } else {
                BundleError::MissingFile(name.into())
            }
            .into())
        }
        Err(e) => return Err(Error::io(path, e).into()),
    };
    if !meta.is_file() {
        return Err(BundleError::NotARegularFile {
            entry: name.into(),
            kind: "non-regular file".into(),
        }
        .into());
    }
    if meta.len() > limit {
        return Err(BundleError::Oversized {
            file: name.into(),
            size: meta.len(),
            limit,
        }
        .into());
    }
    fs::read(path).map_err(|e| Error::io(path, e).into())
}

fn verify_dir(dir: &Path, trusted: &TrustedKeys, limits: &Limits) -> Result<Manifest, Refusal> {
    // 1. The signature over the manifest, before anything in the manifest is believed.
    let manifest_bytes = read_limited(&dir.join(MANIFEST), MANIFEST, limits.max_manifest_bytes)?;
    let sig_bytes = read_limited(&dir.join(SIGNATURE), SIGNATURE, limits.max_manifest_bytes)?;
    let sig_text = String::from_utf8(sig_bytes)
        .map_err(|_| BundleError::BadSignature("the signature file is not text".into()))?;
    trusted.verify(&manifest_bytes, &sig_text)?;

    // 2. The manifest itself.
    let value: serde_json::Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| BundleError::BadManifest(e.to_string()))?;
    let found = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| BundleError::BadManifest("no `format_version`".into()))?;
    if found != u64::from(FORMAT_VERSION) {
        return Err(BundleError::UnsupportedVersion {
            found: found.min(u64::from(u32::MAX)) as u32,
            supported: FORMAT_VERSION,
        }
        .into());
    }
    let manifest: Manifest = serde_path_to_error::deserialize(value)
        .map_err(|e| BundleError::BadManifest(format!("`{}`: {}", e.path(), e.inner())))?;
    if manifest.input_size != manifest.arch.img_size
        || manifest.embed_dim != manifest.arch.embed_dim
    {
        return Err(BundleError::BadManifest(
            "`input_size`/`embed_dim` disagree with `arch`".into(),
        )
        .into());
    }
    manifest
        .arch
        .validate()
        .map_err(|e| BundleError::BadManifest(e.to_string()))?;
    check_crop_min_side(manifest.crop_min_side).map_err(BundleError::BadManifest)?;
    check_crop_margin(manifest.crop_margin).map_err(BundleError::BadManifest)?;
    crate::onnx::check_views(manifest.test_time_views)
        .map_err(|e| BundleError::BadManifest(e.to_string()))?;
    if let Some(size) = &manifest.cell_size {
        size.validate(manifest.class_names.len())
            .map_err(BundleError::BadManifest)?;
    }
    for required in [MODEL, manifest.self_test.file.as_str()] {
        if !manifest.files.contains_key(required) {
            return Err(
                BundleError::BadManifest(format!("`files` does not list `{required}`")).into(),
            );
        }
    }

    // 3. Every listed file is there, within limits, with its pinned size and hash; nothing else is.
    for (name, entry) in &manifest.files {
        if plain_name(Path::new(name)).as_deref() != Some(name.as_str())
            || name == MANIFEST
            || name == SIGNATURE
        {
            return Err(BundleError::BadManifest(format!(
                "`files` lists an invalid name `{name}`"
            ))
            .into());
        }
        let path = dir.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::MissingFile(name.clone()).into())
            }
            Err(e) => return Err(Error::io(&path, e).into()),
        };
        if !meta.is_file() {
            return Err(BundleError::NotARegularFile {
                entry: name.clone(),
                kind: "non-regular file".into(),
            }
            .into());
        }
        if meta.len() > limits.max_file_bytes {
            return Err(BundleError::Oversized {
                file: name.clone(),
                size: meta.len(),
                limit: limits.max_file_bytes,
            }
            .into());
        }
        if meta.len() != entry.size {
            return Err(BundleError::SizeMismatch {
                file: name.clone(),
                expected: entry.size,
                actual: meta.len(),
            }
            .into());
        }
        let (sha, _) = sha256_file(&path)?;
        if !sha.eq_ignore_ascii_case(&entry.sha256) {
            return Err(BundleError::HashMismatch {
                file: name.clone(),
                expected: entry.sha256.clone(),
                actual: sha,
            }
            .into());
        }
    }
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST && name != SIGNATURE && !manifest.files.contains_key(&name) {
            return Err(BundleError::UnlistedFile(name).into());
        }
    }

    // 4. The graph's interface agrees with the manifest.
    let model = fs::read(dir.join(MODEL)).map_err(|e| Error::io(dir.join(MODEL), e))?;
    check_graph(&model, &manifest)?;
    Ok(manifest)
}

fn check_graph(model: &[u8], m: &Manifest) -> Result<(), BundleError> {
    let io = onnx::graph_io(model).map_err(|e| BundleError::GraphMismatch(e.to_string()))?;
    let fmt = |d: &[Dim]| {
        format!(
            "[{}]",
            d.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let s = m.input_size as i64;
    let pixels = io
        .shape(onnx::INPUT)
        .ok_or_else(|| BundleError::GraphMismatch(format!("no input `{}`", onnx::INPUT)))?;
    let batch_ok = |d: &Dim| matches!(d, Dim::Param(_)) || *d == Dim::Fixed(1);
    if pixels.len() != 4
        || !batch_ok(&pixels[0])
        || pixels[1..] != [Dim::Fixed(3), Dim::Fixed(s), Dim::Fixed(s)]
    {
        return Err(BundleError::GraphMismatch(format!(
            "input `pixels` is {}, manifest says [N, 3, {s}, {s}]",
            fmt(pixels)
        )));
    }
    let emb = io
        .shape(onnx::EMBEDDING)
        .ok_or_else(|| BundleError::GraphMismatch(format!("no output `{}`", onnx::EMBEDDING)))?;
    if emb.len() != 2 || !batch_ok(&emb[0]) || emb[1] != Dim::Fixed(m.embed_dim as i64) {
        return Err(BundleError::GraphMismatch(format!(
            "output `embedding` is {}, manifest says [N, {}]",
            fmt(emb),
            m.embed_dim
        )));
    }
    match (io.shape(onnx::LOGITS), m.class_names.len()) {
        (None, 0) => {}
        (None, c) => {
            return Err(BundleError::GraphMismatch(format!(
                "manifest lists {c} classes but the graph has no `logits` output"
            )))
        }
        (Some(l), c) => {
            if l.len() != 2 || !batch_ok(&l[0]) || l[1] != Dim::Fixed(c as i64) {
                return Err(BundleError::GraphMismatch(format!(
                    "output `logits` is {}, manifest lists {c} classes",
                    fmt(l)
                )));
            }
        }
    }
    Ok(())
}
