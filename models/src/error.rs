use std::path::PathBuf;

/// Errors of the models crate. Each says what was wrong and, where it can, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },

    #[error("checkpoint is missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },

    #[error("checkpoint tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("ONNX: {0}")]
    Onnx(String),

    #[error("inference: {0}")]
    Inference(String),

    #[error("bundle {bundle}: {kind}")]
    Bundle { bundle: String, kind: BundleError },

    #[error("image: {0}")]
    Image(String),
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BundleError {
    #[error("missing file `{0}`")]
    MissingFile(String),
    #[error("unsupported format version {found} (this build reads version {supported}); update reddino-edge or re-export the bundle")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("manifest.json is not valid: {0}")]
    BadManifest(String),
    #[error("sha256 of `{file}` is {actual}, manifest says {expected}; the file was altered or corrupted")]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("`{file}` has {actual} bytes, manifest says {expected}")]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "no signature (manifest.json.minisig); sign the bundle with `reddino-models bundle sign`"
    )]
    MissingSignature,
    #[error("signature does not verify: {0}")]
    BadSignature(String),
    #[error("signed by a key that is not trusted ({0}); add its public key to the trusted keys if you trust it")]
    UntrustedKey(String),
    #[error("archive entry `{0}` would escape the bundle directory")]
    UnsafePath(String),
    #[error("archive entry `{entry}` is a {kind}; only regular files are allowed")]
    NotARegularFile { entry: String, kind: String },
    #[error("`{file}` is {size} bytes, over the limit of {limit} bytes")]
    Oversized { file: String, size: u64, limit: u64 },
    #[error("archive is truncated or corrupt: {0}")]
    Truncated(String),
    #[error("file `{0}` is not listed in the manifest")]
    UnlistedFile(String),
    #[error("model.onnx does not match the manifest: {0}")]
    GraphMismatch(String),
    #[error("self-test failed: {0}")]
    SelfTest(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
