//! The `reddino-models` command line: what it writes is safe to keep.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// `keygen` writes the secret key readable by its owner only (and never over an existing
/// one); the public key is for everyone.
#[test]
fn keygen_writes_the_secret_key_private() {
    let tmp = tempfile::tempdir().unwrap();
    let (secret, public) = (tmp.path().join("k.sec"), tmp.path().join("k.pub"));
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_reddino-models"))
            .arg("keygen")
            .arg("--secret")
            .arg(&secret)
            .arg("--public")
            .arg(&public)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret key mode {mode:o}");
    assert!(std::fs::read_to_string(&public)
        .unwrap()
        .contains("untrusted comment"));
    let before = std::fs::read(&secret).unwrap();
    let out = run();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&secret).unwrap(), before);
}
