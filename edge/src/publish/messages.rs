//! MQTT payloads (versioned JSON; docs/mqtt.md shows each with an example). Results carry a
//! per-device monotonic `seq`; a subscriber de-duplicates on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Payload format version of every message.
pub const VERSION: u32 = 1;

/// `{prefix}/{device}/counts`: one analysed frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountsMsg {
    pub schema_version: u32,
    pub seq: u64,
    pub device: String,
    /// Frame number from the source (restarts with the source).
    pub frame: u64,
    /// Capture time, milliseconds since the Unix epoch.
    pub captured_ms: u64,
    pub origin: String,
    pub session: Option<String>,
    /// `name@version` of the bundle.
    pub model: String,
    /// sha256 of the bundle's signed manifest (which holds every file's hash): exactly which
    /// model produced this result.
    #[serde(default)]
    pub model_sha256: String,
    /// The backend and execution provider that produced this result (`tract`/`cpu`,
    /// `onnxruntime`/`tensorrt`, ...).
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub provider: String,
    /// Cells found in the frame (all classes and `uncertain`).
    pub cells: u64,
    /// Cells per class name, `uncertain` included.
    pub counts: BTreeMap<String, u64>,
    /// Capture to result, milliseconds.
    pub latency_ms: f64,
}

/// One class's share in a session summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassShare {
    pub class: String,
    pub count: u64,
    pub proportion: f64,
    pub ci95: [f64; 2],
}

/// `{prefix}/{device}/model`: the served model changed by itself (through the outbox, with its
/// own `seq`): `event` is `rollback` when the active version kept failing to start and the
/// previous one came back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEventMsg {
    pub schema_version: u32,
    pub seq: u64,
    pub device: String,
    pub time_ms: u64,
    pub event: String,
    /// The version given up.
    pub from: String,
    /// The version served now.
    pub to: String,
    pub reason: String,
}

/// `{prefix}/{device}/session`: summary of a slide when its session stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionMsg {
    pub schema_version: u32,
    pub seq: u64,
    pub device: String,
    pub session: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub frames: u64,
    /// Classified cells (uncertain excluded) and uncertain cells.
    pub cells: u64,
    pub uncertain: u64,
    pub classes: Vec<ClassShare>,
    /// Parasitized / red cells x 100, when the model has a `parasitized` class.
    pub parasitemia_pct: Option<f64>,
    pub parasitemia_ci95: Option<[f64; 2]>,
    /// Service restarts (a crash, a power cut) the session was resumed across; its counts
    /// cover the frames stored before and after them.
    #[serde(default)]
    pub restarts: u64,
}

/// Frame counters in `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameStats {
    pub captured: u64,
    pub processed: u64,
    /// Dropped because processing fell behind a live camera.
    pub dropped: u64,
    /// Frames that could not be decoded (corrupt, wrong size).
    pub bad: u64,
    /// Frames whose analysis failed.
    pub failed: u64,
    pub cells: u64,
}

/// Outbox state in `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Results not yet acknowledged by the broker.
    pub pending: u64,
    /// Results dropped by the outbox caps (size, age) since it was created.
    pub dropped: u64,
    pub next_seq: u64,
    /// Why results cannot be stored right now (disk full, state directory read-only);
    /// `null` when they can. While it is set, the result waiting is retried and the frames
    /// behind it wait (a live camera's are dropped and counted in `frames.dropped`).
    #[serde(default)]
    pub error: Option<String>,
}

/// `{prefix}/{device}/status` (retained; also the last will with `state: "offline"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusMsg {
    pub schema_version: u32,
    pub device: String,
    /// `online` or `offline`.
    pub state: String,
    pub time_ms: u64,
    #[serde(default)]
    pub model: Option<String>,
    /// sha256 of the served bundle's signed manifest.
    #[serde(default)]
    pub model_sha256: Option<String>,
    /// `tract` or `onnxruntime`.
    #[serde(default)]
    pub backend: Option<String>,
    /// The execution provider that runs the model: `cpu`, `cuda` or `tensorrt`.
    #[serde(default)]
    pub provider: Option<String>,
    /// The backend in one line (version, provider, batch, input).
    #[serde(default)]
    pub backend_detail: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    /// Last camera error while the camera is failing; `null` when frames arrive.
    #[serde(default)]
    pub camera_error: Option<String>,
    #[serde(default)]
    pub frames: FrameStats,
    #[serde(default)]
    pub outbox: OutboxStats,
    #[serde(default)]
    pub uptime_s: f64,
    /// Set in the last will the broker publishes when the device vanished: that message has
    /// no counters (the last `online` status had them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub last_will: bool,
}

impl StatusMsg {
    /// The last will for a connection starting now: `offline`, the device's model, backend
    /// and session as they are, no counters (they would be as old as the connection).
    pub fn last_will(mut self) -> Vec<u8> {
        self.state = "offline".into();
        self.last_will = true;
        let mut v = serde_json::to_value(&self).expect("serialisable");
        if let Some(o) = v.as_object_mut() {
            for k in ["frames", "outbox", "uptime_s", "camera_error"] {
                o.remove(k);
            }
        }
        serde_json::to_vec(&v).expect("serialisable")
    }
}

/// A command payload on `{prefix}/{device}/cmd/{command}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandMsg {
    pub schema_version: u32,
    /// Echoed in the reply.
    #[serde(default)]
    pub id: Option<String>,
    /// `session/start`: the slide's name.
    #[serde(default)]
    pub session: Option<String>,
    /// `model/activate`: the installed version (`name-version`, as `model list` shows it).
    #[serde(default)]
    pub version: Option<String>,
}

/// `{prefix}/{device}/reply`: the answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyMsg {
    pub schema_version: u32,
    pub id: Option<String>,
    pub command: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// `status`: the current status.
    #[serde(default)]
    pub status: Option<StatusMsg>,
}
