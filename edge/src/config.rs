//! The service configuration (`reddino-edge run --config FILE`): TOML, every table refuses
//! unknown keys so a typo is an error naming the key, never a silently ignored setting.
//! docs/edge.example.toml is a complete, commented example (a test parses it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use reddino_models::preprocess::CropPolicy;

use crate::capture::{CameraConfig, SourceKind};
use crate::cells::Mode;
use crate::infer::{BackendKind, BackendSpec, Precision, Provider};
use crate::publish::mqtt::MqttConfig;
use crate::publish::outbox::OutboxLimits;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("config {path}: `{key}`: {msg}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        msg: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Signed model bundle (directory or .tar).
    pub bundle: PathBuf,
    /// Public keys the bundle may be signed with.
    pub trusted_keys: Vec<PathBuf>,
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Threads for the model's matrix products (0 = one per core).
    #[serde(default)]
    pub threads: usize,
    /// Below this top probability a cell counts as `uncertain`.
    #[serde(default = "default_min_confidence")]
    pub min_confidence: f32,
    /// Where installed model versions live (`reddino-edge model install`); absent = `models`
    /// beside the outbox (the state directory). An active installed version is run instead
    /// of `bundle`, which stays the fallback.
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// `tract` (CPU, pure Rust) or `onnxruntime` (TensorRT, CUDA or CPU through ONNX Runtime).
    #[serde(default)]
    pub backend: BackendKind,
    /// ONNX Runtime providers, most preferred first; the first that registers runs the model.
    #[serde(default = "default_providers")]
    pub providers: Vec<Provider>,
    /// libonnxruntime.so; absent: `ORT_DYLIB_PATH`, then the loader's search path.
    #[serde(default)]
    pub onnxruntime_library: Option<PathBuf>,
    /// TensorRT engine precision: `fp16` (LayerNorm kept in FP32) or `fp32`.
    #[serde(default)]
    pub precision: Precision,
    /// CUDA device ordinal for the GPU providers.
    #[serde(default)]
    pub device: i32,
}

fn default_providers() -> Vec<Provider> {
    vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu]
}

fn default_batch() -> usize {
    8
}
fn default_min_confidence() -> f32 {
    0.5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisConfig {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Crop side as a multiple of the cell's box, for models whose manifest gives no margin of
    /// its own (`crop_margin`: a model is cut at the margin it was trained at).
    #[serde(default = "default_margin")]
    pub margin: f32,
    /// Threads for the CPU stages of the frames: decoding a camera's frames, finding cells,
    /// cutting and preprocessing their crops, as many frames side by side as threads (at least
    /// two; 0 = one thread per core). The result is the same on any number.
    #[serde(default)]
    pub threads: usize,
    /// Micrometres per pixel of the camera's frames, for models that take each cell's measured
    /// size as an input (their manifest's `cell_size`); 0 = the scale the model was trained at
    /// (the same microscope, objective and camera). Set, it also gives the cell finder the
    /// cells' size, which it otherwise finds in each frame (the real-smear finder then runs
    /// about 1.5x faster).
    #[serde(default)]
    pub um_per_px: f32,
}

fn default_mode() -> Mode {
    Mode::Cells
}
fn default_margin() -> f32 {
    CropPolicy::DEFAULT_MARGIN
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            mode: default_mode(),
            margin: default_margin(),
            threads: 0,
            um_per_px: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    #[serde(default = "default_outbox_path")]
    pub path: PathBuf,
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    #[serde(default = "default_max_age")]
    pub max_age_hours: f64,
}

fn default_outbox_path() -> PathBuf {
    PathBuf::from("/var/lib/reddino-edge/outbox.db")
}
fn default_max_rows() -> u64 {
    OutboxLimits::default().max_rows
}
fn default_max_age() -> f64 {
    OutboxLimits::default().max_age.as_secs_f64() / 3600.0
}

impl Default for OutboxConfig {
    fn default() -> Self {
        toml::from_str("").expect("every outbox setting has a default")
    }
}

impl OutboxConfig {
    pub fn limits(&self) -> OutboxLimits {
        OutboxLimits {
            max_rows: self.max_rows,
            max_age: Duration::from_secs_f64(self.max_age_hours * 3600.0),
        }
    }
}

/// Longest frame or crop queue (frames held in memory at once).
pub const MAX_QUEUE: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Frames waiting for cell finding; beyond it the oldest is dropped (live sources).
    #[serde(default = "default_frame_queue")]
    pub frame_queue: usize,
    /// Frames with their crops waiting for inference.
    #[serde(default = "default_crop_queue")]
    pub crop_queue: usize,
    /// Batching across frames: the inference stage waits up to this long (milliseconds) for
    /// more frames' crops to fill a batch of `model.batch` (0: each frame on its own). The
    /// latency bound a GPU trades for full batches.
    #[serde(default)]
    pub batch_wait_ms: u64,
}

fn default_frame_queue() -> usize {
    4
}
fn default_crop_queue() -> usize {
    2
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            frame_queue: default_frame_queue(),
            crop_queue: default_crop_queue(),
            batch_wait_ms: 0,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the device in every topic and payload: letters, digits, `-`, `_`.
    pub device_id: String,
    pub camera: CameraConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub analysis: AnalysisConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
}

/// Whether `s` can be one MQTT topic level and a file-name-safe identifier.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl Config {
    /// The model store's directory: `model.store`, or `models` in the state directory.
    pub fn model_store(&self) -> PathBuf {
        match &self.model.store {
            Some(p) => p.clone(),
            None => self.state_dir().join("models"),
        }
    }

    /// The backend the config asks for; TensorRT engines go to `engines` in the state
    /// directory.
    pub fn backend_spec(&self) -> BackendSpec {
        BackendSpec {
            kind: self.model.backend,
            batch: self.model.batch,
            threads: self.model.threads,
            providers: self.model.providers.clone(),
            library: self.model.onnxruntime_library.clone(),
            precision: self.model.precision,
            engines: Some(self.state_dir().join("engines")),
            device_id: self.model.device,
        }
    }

    /// The state directory: the outbox's folder (`/var/lib/reddino-edge` by default).
    pub fn state_dir(&self) -> PathBuf {
        self.outbox
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf()
    }

    /// Reads and checks a config file. Relative paths in it are taken relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path)?;
        if let Some(dir) = path.parent() {
            cfg.resolve_relative(dir);
        }
        // Files the service reads later are checked now, so a typo stops the start, not a
        // frame an hour later.
        if cfg.camera.source == SourceKind::Replay {
            if let Some(missing) = cfg.camera.paths.iter().find(|p| !p.exists()) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: "camera.paths",
                    msg: format!("{} does not exist", missing.display()),
                });
            }
        }
        // A bare file name is for the loader's search path; a path must exist.
        if let Some(lib) = &cfg.model.onnxruntime_library {
            if lib.components().count() > 1 && !lib.exists() {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: "model.onnxruntime_library",
                    msg: format!("{} does not exist", lib.display()),
                });
            }
        }
        Ok(cfg)
    }

    /// Parses and checks config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn resolve_relative(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        self.camera.paths.iter_mut().for_each(fix);
        fix(&mut self.model.bundle);
        if let Some(p) = self.model.onnxruntime_library.as_mut() {
            if p.components().count() > 1 {
                fix(p);
            }
        }
        if let Some(p) = self.model.store.as_mut() {
            fix(p)
        }
        self.model.trusted_keys.iter_mut().for_each(fix);
        fix(&mut self.outbox.path);
        if let Some(p) = self.mqtt.password_file.as_mut() {
            fix(p)
        }
        if let Some(t) = self.mqtt.tls.as_mut() {
            fix(&mut t.ca);
            if let Some(p) = t.client_cert.as_mut() {
                fix(p)
            }
            if let Some(p) = t.client_key.as_mut() {
                fix(p)
            }
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, msg: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            msg,
        };
        if !valid_id(&self.device_id) {
            return Err(bad(
                "device_id",
                format!(
                    "{:?} must be 1-64 letters, digits, '-', '_' or '.'",
                    self.device_id
                ),
            ));
        }
        let c = &self.camera;
        if c.width == 0 || c.height == 0 || c.width % 2 != 0 {
            return Err(bad(
                "camera.width",
                format!(
                    "{}x{} is not a frame size (width even, both > 0)",
                    c.width, c.height
                ),
            ));
        }
        if c.source == SourceKind::Replay && c.paths.is_empty() {
            return Err(bad(
                "camera.paths",
                "a replay source needs at least one file or directory".into(),
            ));
        }
        if c.source == SourceKind::Synthetic {
            if c.sources.is_empty() {
                return Err(bad("camera.sources", "name at least one preset".into()));
            }
            for s in &c.sources {
                if reddino_models::synth::SourcePreset::by_name(s).is_err() {
                    let known: Vec<String> = reddino_models::synth::SourcePreset::all()
                        .into_iter()
                        .map(|p| p.name.to_string())
                        .collect();
                    return Err(bad(
                        "camera.sources",
                        format!("unknown preset {s:?}; known: {}", known.join(", ")),
                    ));
                }
            }
        }
        if !(c.fps >= 0.0 && c.fps.is_finite()) {
            return Err(bad("camera.fps", format!("{} is not a rate (>= 0)", c.fps)));
        }
        if !(c.retry_max_s > 0.0 && c.retry_max_s.is_finite()) {
            return Err(bad("camera.retry_max_s", "must be > 0".into()));
        }
        if !(c.stall_s > 0.0 && c.stall_s.is_finite()) {
            return Err(bad("camera.stall_s", "must be > 0".into()));
        }
        if self.model.trusted_keys.is_empty() {
            return Err(bad(
                "model.trusted_keys",
                "name at least one public key; bundles are only used once their signature checks"
                    .into(),
            ));
        }
        if self.model.batch == 0 || self.model.batch > 256 {
            return Err(bad(
                "model.batch",
                format!("{} is not in 1..=256", self.model.batch),
            ));
        }
        if self.model.backend == BackendKind::Onnxruntime {
            if !cfg!(feature = "onnxruntime") {
                return Err(bad(
                    "model.backend",
                    "this build has no ONNX Runtime backend (built without the `onnxruntime` feature); use \"tract\"".into(),
                ));
            }
            if self.model.providers.is_empty() {
                return Err(bad(
                    "model.providers",
                    "name at least one of tensorrt, cuda, cpu".into(),
                ));
            }
            let mut seen = Vec::new();
            for p in &self.model.providers {
                if seen.contains(p) {
                    return Err(bad(
                        "model.providers",
                        format!("{} is listed twice", p.name()),
                    ));
                }
                seen.push(*p);
            }
        }
        if self.pipeline.batch_wait_ms > 10_000 {
            return Err(bad(
                "pipeline.batch_wait_ms",
                format!("{} ms is more than 10 s", self.pipeline.batch_wait_ms),
            ));
        }
        if !(0.0..=1.0).contains(&self.model.min_confidence) {
            return Err(bad(
                "model.min_confidence",
                format!("{} is not in 0..=1", self.model.min_confidence),
            ));
        }
        if !(self.analysis.margin >= 1.0 && self.analysis.margin <= 4.0) {
            return Err(bad(
                "analysis.margin",
                format!("{} is not in 1..=4", self.analysis.margin),
            ));
        }
        let um = self.analysis.um_per_px;
        if !(um == 0.0 || (um.is_finite() && um > 0.001 && um <= 100.0)) {
            return Err(bad(
                "analysis.um_per_px",
                format!("{um} is neither 0 (the model's own scale) nor in 0.001..=100 micrometres per pixel"),
            ));
        }
        let m = &self.mqtt;
        if m.host.is_empty() {
            return Err(bad("mqtt.host", "must not be empty".into()));
        }
        if m.topic_prefix.is_empty() || m.topic_prefix.contains(['#', '+']) {
            return Err(bad(
                "mqtt.topic_prefix",
                format!("{:?} must be non-empty without '#' or '+'", m.topic_prefix),
            ));
        }
        if let Some(id) = &m.client_id {
            if id.is_empty() || id.len() > 128 {
                return Err(bad("mqtt.client_id", "must be 1-128 characters".into()));
            }
        }
        if m.password_file.is_some() && m.username.is_none() {
            return Err(bad(
                "mqtt.password_file",
                "a password needs `mqtt.username`".into(),
            ));
        }
        if let Some(t) = &m.tls {
            if t.client_cert.is_some() != t.client_key.is_some() {
                return Err(bad(
                    "mqtt.tls.client_cert",
                    "client_cert and client_key go together".into(),
                ));
            }
        }
        if m.max_inflight == 0 {
            return Err(bad("mqtt.max_inflight", "must be > 0".into()));
        }
        for (key, v) in [
            ("mqtt.reconnect_max_s", m.reconnect_max_s),
            ("mqtt.status_interval_s", m.status_interval_s),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(bad(key, format!("{v} must be > 0")));
            }
        }
        if !(m.drain_timeout_s >= 0.0 && m.drain_timeout_s.is_finite()) {
            return Err(bad("mqtt.drain_timeout_s", "must be >= 0".into()));
        }
        if self.outbox.max_rows == 0 {
            return Err(bad("outbox.max_rows", "must be > 0".into()));
        }
        if !(self.outbox.max_age_hours > 0.0 && self.outbox.max_age_hours.is_finite()) {
            return Err(bad("outbox.max_age_hours", "must be > 0".into()));
        }
        for (key, n) in [
            ("pipeline.frame_queue", self.pipeline.frame_queue),
            ("pipeline.crop_queue", self.pipeline.crop_queue),
        ] {
            if !(1..=MAX_QUEUE).contains(&n) {
                return Err(bad(
                    key,
                    format!("{n} is not a queue length: 1 to {MAX_QUEUE} frames"),
                ));
            }
        }
        Ok(())
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("reddino-edge-{}", self.device_id))
    }

    /// `{prefix}/{device_id}/{leaf}`.
    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{leaf}", self.mqtt.topic_prefix, self.device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::PixelFormat;

    const MINIMAL: &str = r#"
device_id = "clinic-01"
[camera]
source = "synthetic"
[model]
bundle = "m.tar"
trusted_keys = ["k.pub"]
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("edge.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.client_id(), "reddino-edge-clinic-01");
        assert_eq!(c.topic("counts"), "reddino/clinic-01/counts");
        assert_eq!(c.camera.format, PixelFormat::Mjpg);
        assert_eq!(c.outbox.limits(), OutboxLimits::default());
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../docs/edge.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.camera.source, SourceKind::V4l2);
        assert!(c.mqtt.tls.is_some());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse(&MINIMAL.replace("[camera]", "[camera]\nwidht = 640"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("widht"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[mqtt]\nprot = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
        let e = parse(&format!("{MINIMAL}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (edit, key) in [
            (MINIMAL.replace("clinic-01", "clinic/01"), "device_id"),
            (
                MINIMAL.replace("source = \"synthetic\"", "source = \"webcam\""),
                "source",
            ),
            (
                MINIMAL.replace("source = \"synthetic\"", "source = \"replay\""),
                "camera.paths",
            ),
            (
                MINIMAL.replace("[camera]", "[camera]\nsources = [\"nope\"]"),
                "camera.sources",
            ),
            (
                MINIMAL.replace("trusted_keys = [\"k.pub\"]", "trusted_keys = []"),
                "model.trusted_keys",
            ),
            (
                MINIMAL.replace("[model]", "[model]\nbatch = 0"),
                "model.batch",
            ),
            (format!("{MINIMAL}[mqtt]\nport = 70000\n"), "port"),
            (
                format!("{MINIMAL}[analysis]\num_per_px = -0.2\n"),
                "analysis.um_per_px",
            ),
            (
                format!("{MINIMAL}[analysis]\num_per_px = nan\n"),
                "analysis.um_per_px",
            ),
            (
                format!("{MINIMAL}[mqtt]\npassword_file = \"p\"\n"),
                "mqtt.password_file",
            ),
            (
                MINIMAL.replace("device_id = \"clinic-01\"", ""),
                "device_id",
            ),
        ] {
            let e = parse(&edit).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
            assert!(e.contains("edge.toml"), "{e}");
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("edge.toml");
        std::fs::write(&p, MINIMAL).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.model.bundle, dir.path().join("m.tar"));
        let e = Config::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn queue_lengths_are_bounded_and_replay_paths_must_exist() {
        for q in [
            "frame_queue = 100000000000",
            "crop_queue = 0",
            "frame_queue = 10001",
        ] {
            let e = parse(&format!("{MINIMAL}[pipeline]\n{q}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("pipeline.") && e.contains("queue length"),
                "{q}: {e}"
            );
        }
        parse(&format!("{MINIMAL}[pipeline]\nframe_queue = 10000\n")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("frames")).unwrap();
        let p = dir.path().join("edge.toml");
        let replay = |paths: &str| {
            MINIMAL.replace(
                "source = \"synthetic\"",
                &format!("source = \"replay\"\npaths = [{paths}]"),
            )
        };
        std::fs::write(&p, replay("\"frames\"")).unwrap();
        Config::load(&p).unwrap();
        std::fs::write(&p, replay("\"frames\", \"fraems\"")).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("camera.paths") && e.contains("fraems") && e.contains("does not exist"),
            "{e}"
        );
    }
}
