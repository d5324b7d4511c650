//! Bundle round trips and every refusal `open` makes.

use std::fs;
use std::path::{Path, PathBuf};

use reddino_models::arch::{Preset, VitConfig};
use reddino_models::bundle::{
    self, Limits, NewBundle, SigningKey, TrustedKeys, MANIFEST, MODEL, SELF_TEST, SIGNATURE,
};
use reddino_models::cellsize::CellSize;
use reddino_models::preprocess::Normalization;
use reddino_models::weights::{LinearHead, Tensor, VitWeights};
use reddino_models::{BundleError, Error};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
    key: SigningKey,
    trusted: TrustedKeys,
}

fn weights() -> VitWeights {
    VitWeights::random(&VitConfig::preset(Preset::Tiny, 28).unwrap(), 7, 1.0).unwrap()
}

fn head(classes: usize) -> LinearHead {
    LinearHead {
        class_names: (0..classes).map(|i| format!("class{i}")).collect(),
        weight: Tensor::new(
            vec![classes, 192],
            (0..classes * 192).map(|i| (i % 7) as f32 * 0.01).collect(),
        ),
        bias: Tensor::new(vec![classes], vec![0.1; classes]),
        size: None,
    }
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dir = root.join("bundle");
    let key = SigningKey::generate().unwrap();
    let w = weights();
    let h = head(4);
    bundle::write_dir(
        &NewBundle {
            name: "test-model".into(),
            version: "1.0.0".into(),
            description: "unit test".into(),
            weights: &w,
            head: Some(&h),
            normalization: Normalization::default(),
            crop_min_side: 0.0,
            crop_margin: 0.0,
            blank_neighbours: false,
            cell_finder: String::new(),
            test_time_views: 1,
        },
        &dir,
        &key,
    )
    .unwrap();
    let mut trusted = TrustedKeys::new();
    trusted.add(&key.public_key_file().unwrap()).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        dir,
        key,
        trusted,
    }
}

fn refusal(r: Result<bundle::Bundle, Error>) -> BundleError {
    match r {
        Err(Error::Bundle { kind, .. }) => kind,
        Err(other) => panic!("expected a bundle refusal, got {other}"),
        Ok(_) => panic!("expected a bundle refusal, the bundle was accepted"),
    }
}

fn open(f: &Fixture, path: &Path) -> Result<bundle::Bundle, Error> {
    bundle::open(path, &f.trusted, &Limits::default())
}

/// Edits the manifest JSON and signs it again with the fixture key.
fn edit_manifest(f: &Fixture, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = f.dir.join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    bundle::sign_dir(&f.dir, &f.key).unwrap();
}

/// Replaces a file and pins its new hash and size in the (re-signed) manifest.
fn replace_file(f: &Fixture, name: &str, bytes: &[u8]) {
    use sha2::Digest;
    fs::write(f.dir.join(name), bytes).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    edit_manifest(f, |v| {
        v["files"][name] = serde_json::json!({"sha256": sha, "size": bytes.len()});
    });
}

#[test]
fn write_pack_open_verify_round_trip() {
    let f = fixture();
    let b = open(&f, &f.dir).unwrap();
    assert_eq!(b.manifest().name, "test-model");
    assert_eq!(b.manifest().class_names.len(), 4);
    assert_eq!(b.manifest().input_size, 28);
    assert!(b.self_test().unwrap() <= 1e-6);

    let tar = f.root.join("bundle.tar");
    bundle::pack(&f.dir, &tar).unwrap();
    let again = f.root.join("again.tar");
    bundle::pack(&f.dir, &again).unwrap();
    assert_eq!(
        fs::read(&tar).unwrap(),
        fs::read(&again).unwrap(),
        "packing is deterministic"
    );
    let b = open(&f, &tar).unwrap();
    assert_eq!(b.manifest(), open(&f, &f.dir).unwrap().manifest());
    assert_eq!(
        b.read_model().unwrap(),
        fs::read(f.dir.join(MODEL)).unwrap()
    );
    b.self_test().unwrap();
    let staging = b.dir().to_path_buf();
    drop(b);
    assert!(
        !staging.exists(),
        "the staging directory is removed with the bundle"
    );
}

#[test]
fn the_standard_minisign_key_format_is_accepted() {
    let f = fixture();
    let mut t = TrustedKeys::new();
    t.add(&f.key.public_key_base64()).unwrap();
    bundle::open(&f.dir, &t, &Limits::default()).unwrap();
    let sk_file = f.root.join("key.sec");
    fs::write(&sk_file, f.key.secret_key_file("test key").unwrap()).unwrap();
    let reloaded = SigningKey::from_file(&sk_file, None).unwrap();
    assert_eq!(reloaded.public_key_base64(), f.key.public_key_base64());
}

#[test]
fn refuses_unknown_format_version() {
    let f = fixture();
    edit_manifest(&f, |v| v["format_version"] = 99.into());
    let e = refusal(open(&f, &f.dir));
    assert_eq!(
        e,
        BundleError::UnsupportedVersion {
            found: 99,
            supported: 1
        }
    );
    assert!(e.to_string().contains("unsupported format version 99"));
}

#[test]
fn refuses_missing_file() {
    let f = fixture();
    fs::remove_file(f.dir.join(SELF_TEST)).unwrap();
    assert_eq!(
        refusal(open(&f, &f.dir)),
        BundleError::MissingFile(SELF_TEST.into())
    );
    let f = fixture();
    fs::remove_file(f.dir.join(MANIFEST)).unwrap();
    assert_eq!(
        refusal(open(&f, &f.dir)),
        BundleError::MissingFile(MANIFEST.into())
    );
}

#[test]
fn refuses_hash_and_size_mismatch() {
    let f = fixture();
    let mut model = fs::read(f.dir.join(MODEL)).unwrap();
    let n = model.len();
    model[n - 10] ^= 0x55;
    fs::write(f.dir.join(MODEL), &model).unwrap();
    let e = refusal(open(&f, &f.dir));
    assert!(
        matches!(&e, BundleError::HashMismatch { file, .. } if file == MODEL),
        "{e}"
    );
    assert!(e.to_string().contains("altered or corrupted"));

    model.push(0);
    fs::write(f.dir.join(MODEL), &model).unwrap();
    let e = refusal(open(&f, &f.dir));
    assert!(
        matches!(&e, BundleError::SizeMismatch { file, .. } if file == MODEL),
        "{e}"
    );
}

#[test]
fn refuses_bad_and_missing_signature() {
    let f = fixture();
    // Changing the manifest without re-signing it.
    let p = f.dir.join(MANIFEST);
    let text = fs::read_to_string(&p)
        .unwrap()
        .replace("test-model", "evil-model");
    fs::write(&p, text).unwrap();
    let e = refusal(open(&f, &f.dir));
    assert!(matches!(e, BundleError::BadSignature(_)), "{e}");
    assert!(e.to_string().contains("changed after it was signed"), "{e}");

    fs::write(f.dir.join(SIGNATURE), "garbage\n").unwrap();
    assert!(matches!(
        refusal(open(&f, &f.dir)),
        BundleError::BadSignature(_)
    ));

    fs::remove_file(f.dir.join(SIGNATURE)).unwrap();
    assert_eq!(refusal(open(&f, &f.dir)), BundleError::MissingSignature);
}

#[test]
fn refuses_untrusted_key() {
    let f = fixture();
    let other = SigningKey::generate().unwrap();
    bundle::sign_dir(&f.dir, &other).unwrap();
    let e = refusal(open(&f, &f.dir));
    assert!(matches!(e, BundleError::UntrustedKey(_)), "{e}");
    // No trusted keys at all.
    let e = refusal(bundle::open(
        &f.dir,
        &TrustedKeys::new(),
        &Limits::default(),
    ));
    assert!(matches!(e, BundleError::UntrustedKey(_)), "{e}");
}

/// A tar with one hand-made entry after the real bundle files.
fn tar_with(
    f: &Fixture,
    name: &[u8],
    kind: tar::EntryType,
    data: &[u8],
    link: Option<&str>,
) -> PathBuf {
    let path = f.root.join("crafted.tar");
    let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
    for n in [MANIFEST, SIGNATURE, MODEL, SELF_TEST] {
        b.append_path_with_name(f.dir.join(n), n).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
    b.finish().unwrap();
    path
}

#[test]
fn refuses_archive_entries_escaping_the_bundle() {
    let f = fixture();
    let outside = f.root.join("evil.txt");
    for name in [&b"../evil.txt"[..], b"/tmp/evil.txt", b"a/../../evil.txt"] {
        let tar = tar_with(&f, name, tar::EntryType::Regular, b"pwned", None);
        let e = refusal(open(&f, &tar));
        assert!(
            matches!(e, BundleError::UnsafePath(_)),
            "{}: {e}",
            String::from_utf8_lossy(name)
        );
        assert!(e.to_string().contains("escape"));
        assert!(!outside.exists());
    }
    let tar = tar_with(
        &f,
        b"link",
        tar::EntryType::Symlink,
        b"",
        Some("/etc/passwd"),
    );
    let e = refusal(open(&f, &tar));
    assert!(
        matches!(&e, BundleError::NotARegularFile { kind, .. } if kind == "symbolic link"),
        "{e}"
    );
    let tar = tar_with(&f, b"hard", tar::EntryType::Link, b"", Some("/etc/passwd"));
    let e = refusal(open(&f, &tar));
    assert!(
        matches!(&e, BundleError::NotARegularFile { kind, .. } if kind == "hard link"),
        "{e}"
    );
}

#[test]
fn refuses_symlink_in_a_bundle_directory() {
    let f = fixture();
    let target = f.root.join("elsewhere.onnx");
    fs::rename(f.dir.join(MODEL), &target).unwrap();
    std::os::unix::fs::symlink(&target, f.dir.join(MODEL)).unwrap();
    let e = refusal(open(&f, &f.dir));
    assert!(matches!(e, BundleError::NotARegularFile { .. }), "{e}");
}

#[test]
fn refuses_oversized_files() {
    let f = fixture();
    let limits = Limits {
        max_file_bytes: 1000,
        ..Limits::default()
    };
    let tar = f.root.join("b.tar");
    bundle::pack(&f.dir, &tar).unwrap();
    for path in [&tar, &f.dir] {
        let e = refusal(bundle::open(path, &f.trusted, &limits));
        assert!(
            matches!(&e, BundleError::Oversized { limit: 1000, .. }),
            "{e}"
        );
    }
}

#[test]
fn refuses_truncated_archive() {
    let f = fixture();
    let tar = f.root.join("b.tar");
    bundle::pack(&f.dir, &tar).unwrap();
    let bytes = fs::read(&tar).unwrap();
    for cut in [bytes.len() / 2, 700, 100] {
        let short = f.root.join(format!("short{cut}.tar"));
        fs::write(&short, &bytes[..cut]).unwrap();
        let e = refusal(open(&f, &short));
        assert!(
            matches!(
                e,
                BundleError::Truncated(_)
                    | BundleError::MissingFile(_)
                    | BundleError::MissingSignature
            ),
            "cut at {cut}: {e}"
        );
    }
    // Cut inside the model data: the short read itself is reported.
    let short = f.root.join("short.tar");
    fs::write(&short, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        refusal(open(&f, &short)),
        BundleError::Truncated(_)
    ));
}

#[test]
fn refuses_graph_that_disagrees_with_manifest() {
    let f = fixture();
    // A model without a head, while the manifest lists 4 classes.
    let plain = reddino_models::onnx::export(&weights(), None).unwrap();
    replace_file(&f, MODEL, &plain);
    let e = refusal(open(&f, &f.dir));
    assert!(matches!(e, BundleError::GraphMismatch(_)), "{e}");
    assert!(e.to_string().contains("no `logits`"), "{e}");

    // A head with 3 classes against a manifest of 4.
    let three = reddino_models::onnx::export(&weights(), Some(&head(3))).unwrap();
    replace_file(&f, MODEL, &three);
    let e = refusal(open(&f, &f.dir));
    assert!(
        e.to_string().contains("[N, 3]") && e.to_string().contains("4 classes"),
        "{e}"
    );

    // A graph at another input size.
    let mut w = weights();
    w.resize_input(56).unwrap();
    let big = reddino_models::onnx::export(&w, Some(&head(4))).unwrap();
    replace_file(&f, MODEL, &big);
    let e = refusal(open(&f, &f.dir));
    assert!(
        e.to_string().contains("[N, 3, 56, 56]") && e.to_string().contains("[N, 3, 28, 28]"),
        "{e}"
    );

    replace_file(&f, MODEL, b"not a protobuf at all");
    assert!(matches!(
        refusal(open(&f, &f.dir)),
        BundleError::GraphMismatch(_)
    ));
}

#[test]
fn refuses_unlisted_files_and_bad_manifest() {
    let f = fixture();
    fs::write(f.dir.join("extra.bin"), b"x").unwrap();
    assert_eq!(
        refusal(open(&f, &f.dir)),
        BundleError::UnlistedFile("extra.bin".into())
    );
    fs::remove_file(f.dir.join("extra.bin")).unwrap();

    edit_manifest(&f, |v| v["unexpected_key"] = 1.into());
    let e = refusal(open(&f, &f.dir));
    assert!(
        matches!(e, BundleError::BadManifest(_)) && e.to_string().contains("unexpected_key"),
        "{e}"
    );
}

#[test]
fn crop_policy_is_read_from_the_manifest_and_checked() {
    let f = fixture();
    // Absent: each crop scaled to its own cell.
    assert_eq!(open(&f, &f.dir).unwrap().manifest().crop_min_side, 0.0);
    edit_manifest(&f, |v| v["crop_min_side"] = 1.0.into());
    assert_eq!(open(&f, &f.dir).unwrap().manifest().crop_min_side, 1.0);
    // Blanked neighbours: absent = off.
    assert!(!open(&f, &f.dir).unwrap().manifest().blank_neighbours);
    edit_manifest(&f, |v| v["blank_neighbours"] = true.into());
    assert!(open(&f, &f.dir).unwrap().manifest().blank_neighbours);
    edit_manifest(&f, |v| v["blank_neighbours"] = "yes".into());
    let e = refusal(open(&f, &f.dir));
    assert!(
        matches!(e, BundleError::BadManifest(_)) && e.to_string().contains("bool"),
        "{e}"
    );
    edit_manifest(&f, |v| v["blank_neighbours"] = false.into());
    // The finder profile: absent = the default one; signed like the rest.
    assert_eq!(open(&f, &f.dir).unwrap().manifest().cell_finder, "");
    edit_manifest(&f, |v| v["cell_finder"] = "real-smear".into());
    assert_eq!(
        open(&f, &f.dir).unwrap().manifest().cell_finder,
        "real-smear"
    );
    edit_manifest(&f, |v| v["cell_finder"] = 3.into());
    assert!(matches!(
        refusal(open(&f, &f.dir)),
        BundleError::BadManifest(_)
    ));
    edit_manifest(&f, |v| v["cell_finder"] = "".into());
    // Test-time views: absent = the crop alone; only 1, 4 or 8.
    assert_eq!(open(&f, &f.dir).unwrap().manifest().test_time_views, 1);
    edit_manifest(&f, |v| v["test_time_views"] = 8.into());
    assert_eq!(open(&f, &f.dir).unwrap().manifest().test_time_views, 8);
    for bad in [0, 3, 16] {
        edit_manifest(&f, |v| v["test_time_views"] = bad.into());
        let e = refusal(open(&f, &f.dir));
        assert!(
            matches!(e, BundleError::BadManifest(_)) && e.to_string().contains("test-time views"),
            "{e}"
        );
    }
    edit_manifest(&f, |v| v["test_time_views"] = 1.into());
    for bad in [-1.0, 0.1, 9.0] {
        edit_manifest(&f, |v| v["crop_min_side"] = bad.into());
        let e = refusal(open(&f, &f.dir));
        assert!(
            matches!(e, BundleError::BadManifest(_)) && e.to_string().contains("crop_min_side"),
            "{e}"
        );
    }
    edit_manifest(&f, |v| v["crop_min_side"] = 0.0.into());
    // The margin: absent = the device's; present, it wins over the device's.
    let m = open(&f, &f.dir).unwrap().manifest().clone();
    assert_eq!(m.crop_margin, 0.0);
    assert_eq!(m.crop_policy(1.5).margin, 1.5);
    edit_manifest(&f, |v| v["crop_margin"] = 1.1.into());
    let m = open(&f, &f.dir).unwrap().manifest().clone();
    assert_eq!(m.crop_margin, 1.1);
    assert_eq!(m.crop_policy(1.5).margin, 1.1);
    for bad in [-1.0, 0.5, 4.5, f64::NAN] {
        edit_manifest(&f, |v| v["crop_margin"] = bad.into());
        let e = refusal(open(&f, &f.dir));
        assert!(
            matches!(e, BundleError::BadManifest(_)) && e.to_string().contains("crop_margin"),
            "{e}"
        );
    }
}

/// A head's size term is written into the signed manifest and checked when a bundle opens:
/// one finite row per class and a positive scale.
#[test]
fn the_heads_size_term_travels_in_the_manifest_and_is_checked() {
    let f = fixture();
    assert_eq!(open(&f, &f.dir).unwrap().manifest().cell_size, None);
    let sized = LinearHead {
        size: Some(CellSize {
            um_per_px: 0.18,
            weight: vec![[0.5, -0.5]; 4],
        }),
        ..head(4)
    };
    let dir = f.root.join("sized");
    let w = weights();
    let m = bundle::write_dir(
        &NewBundle::new("sized", "1.0.0", "", &w, Some(&sized)),
        &dir,
        &f.key,
    )
    .unwrap();
    assert_eq!(m.cell_size, sized.size);
    assert_eq!(open(&f, &dir).unwrap().manifest().cell_size, sized.size);

    let (four, wide) = (vec![[1.0f32, 0.0]; 4], vec![[1.0f32, 0.0, 2.0]; 4]);
    let edits: [(serde_json::Value, &str); 4] = [
        (
            serde_json::json!({"um_per_px": 0.18, "weight": [[1.0, 0.0]]}),
            "1 rows for 4 classes",
        ),
        (
            serde_json::json!({"um_per_px": 0.0, "weight": four}),
            "um_per_px",
        ),
        (
            serde_json::json!({"um_per_px": 0.18, "weight": wide}),
            "`cell_size.weight[0]`: invalid length 3",
        ),
        (
            serde_json::json!({"um_per_px": 0.18, "weight": four, "bias": 1}),
            "`cell_size.bias`: unknown field `bias`",
        ),
    ];
    for (bad, says) in edits {
        edit_manifest(&f, |v| v["cell_size"] = bad.clone());
        let e = refusal(open(&f, &f.dir));
        assert!(
            matches!(e, BundleError::BadManifest(_)) && e.to_string().contains(says),
            "{bad}: {e}"
        );
    }
}

#[test]
fn self_test_detects_wrong_expected_output() {
    let f = fixture();
    let b = open(&f, &f.dir).unwrap();
    let mut v = b.self_test_vector().unwrap();
    drop(b);
    v.embedding.data[0] += 0.5;
    let mut t = std::collections::BTreeMap::new();
    t.insert("pixels".to_string(), v.pixels.clone());
    t.insert("embedding".to_string(), v.embedding.clone());
    t.insert("logits".to_string(), v.logits.clone().unwrap());
    replace_file(
        &f,
        SELF_TEST,
        &reddino_models::weights::tensors_to_bytes(&t).unwrap(),
    );
    let b = open(&f, &f.dir).unwrap();
    let e = b.self_test().unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Bundle {
                kind: BundleError::SelfTest(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("differ"), "{e}");
}

/// An archive is checked against its signature before anything but the manifest and the
/// signature is written: an unsigned archive, a file the signed manifest does not list, or one
/// of another size than it pins, is refused from its header, before its data is read. (Each
/// archive below is cut inside that file's data: unpacking it would fail as truncated.)
#[test]
fn archives_are_checked_against_the_signature_before_their_files_are_written() {
    let f = fixture();
    let big = vec![7u8; 8 << 20];
    // Writes `head` (bundle files) then `name` with 8 MiB, and cuts the archive 4 KiB into it.
    let cut_archive = |file: &str, head: &[&str], name: &str| {
        let path = f.root.join(file);
        let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
        for n in head {
            b.append_path_with_name(f.dir.join(n), n).unwrap();
        }
        let before = b.get_ref().metadata().unwrap().len();
        let mut h = tar::Header::new_ustar();
        h.set_size(big.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &big[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..before as usize + 512 + 4096]).unwrap();
        path
    };
    let e = refusal(open(&f, &cut_archive("unsigned.tar", &[], "payload.bin")));
    assert!(matches!(e, BundleError::MissingFile(_)), "{e}");
    let e = refusal(open(
        &f,
        &cut_archive("extra.tar", &[MANIFEST, SIGNATURE], "extra.bin"),
    ));
    assert!(
        matches!(&e, BundleError::UnlistedFile(n) if n == "extra.bin"),
        "{e}"
    );
    let e = refusal(open(
        &f,
        &cut_archive("grown.tar", &[MANIFEST, SIGNATURE], MODEL),
    ));
    assert!(
        matches!(&e, BundleError::SizeMismatch { file, .. } if file == MODEL),
        "{e}"
    );
    let stranger = SigningKey::generate().unwrap();
    let mut other = TrustedKeys::new();
    other.add(&stranger.public_key_file().unwrap()).unwrap();
    let e = refusal(bundle::open(
        &cut_archive("untrusted.tar", &[MANIFEST, SIGNATURE], MODEL),
        &other,
        &Limits::default(),
    ));
    assert!(matches!(e, BundleError::UntrustedKey(_)), "{e}");
    // pack writes the manifest and signature first, and such an archive opens.
    let tar = f.root.join("b.tar");
    bundle::pack(&f.dir, &tar).unwrap();
    let mut names = Vec::new();
    for e in tar::Archive::new(fs::File::open(&tar).unwrap())
        .entries()
        .unwrap()
    {
        names.push(e.unwrap().path().unwrap().to_string_lossy().into_owned());
    }
    assert_eq!(&names[..2], [MANIFEST, SIGNATURE]);
    open(&f, &tar).unwrap();
}
