//! The service's state: its settings and model, the counters `status` and the live view
//! read, the active session, and the outbox the stages store results in. The publisher sees it
//! only through [`Link`] and [`Device`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reddino_models::preprocess::{CropPolicy, Normalization};

use super::commands::ModelControl;
use crate::cells::CellFinderConfig;
use crate::classify::{Counts, Session, SizeInput};
use crate::infer::Backend;
use crate::publish::messages::{FrameStats, OutboxStats, ReplyMsg, StatusMsg, VERSION};
use crate::publish::outbox::Outbox;
use crate::publish::{now_ms, Device, Link};
use crate::supervise::Supervisor;

/// What the pipeline needs besides its source and backend.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub device_id: String,
    pub topic_prefix: String,
    /// Cell finder settings; in tile mode `tile` must be the model input size.
    pub cells: CellFinderConfig,
    /// How found cells are cut: the model's policy at the config's margin.
    pub crop: CropPolicy,
    pub min_confidence: f32,
    pub frame_queue: usize,
    pub crop_queue: usize,
    /// Longest wait between attempts to reopen a failing camera.
    pub camera_retry_max: Duration,
    /// How long the inference stage waits for more frames to fill a batch (zero: none).
    pub batch_wait: Duration,
    /// A live source silent this long (no frame, no error) is reported as stalled.
    pub camera_stall: Duration,
    /// Threads for the CPU stages of the frames (decoding, finding cells, cutting and
    /// preprocessing crops); 0 = one per core.
    pub cpu_threads: usize,
    /// Frames the cells stage decodes, finds and cuts side by side; 0 = as many as it has
    /// threads, at least two. 1 = one frame at a time (the lowest latency, the least
    /// throughput).
    pub frame_workers: usize,
}

/// The bundle's identity and classes.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `name@version`.
    pub id: String,
    /// sha256 of the bundle's signed manifest.
    pub sha256: String,
    /// The backend's name (`tract`, `onnxruntime`), its provider (`cpu`, `cuda`, `tensorrt`)
    /// and a one-line description (version, batch, input).
    pub backend: String,
    pub provider: String,
    pub backend_detail: String,
    pub class_names: Vec<String>,
    pub normalization: Normalization,
    /// Side of the model's square input (crops are cut and resized to it).
    pub input_size: u32,
    /// The head's size term, at the device's scale (`analysis.um_per_px`).
    pub size: Option<SizeInput>,
}

/// A model as the stages use it: its identity, how its cells are found and cut, and (until
/// the inference stage takes it) the backend that runs it. A frame is cut and classified by
/// one `Served`, so a switch never mixes two models in one result.
pub struct Served {
    pub info: ModelInfo,
    pub cells: CellFinderConfig,
    pub crop: CropPolicy,
    backend: Mutex<Option<Box<dyn Backend>>>,
}

impl Served {
    pub fn new(
        info: ModelInfo,
        cells: CellFinderConfig,
        crop: CropPolicy,
        backend: Option<Box<dyn Backend>>,
    ) -> Served {
        Served {
            info,
            cells,
            crop,
            backend: Mutex::new(backend),
        }
    }

    /// The backend, once: the inference stage takes it at the first frame cut for this model.
    pub(super) fn take_backend(&self) -> Option<Box<dyn Backend>> {
        lock(&self.backend).take()
    }
}

/// Frames' class counts kept per model for the health check after a switch.
pub const HEALTH_WINDOW: usize = 200;

pub(super) struct ActiveSession {
    pub(super) name: String,
    pub(super) started_ms: u64,
    pub(super) session: Session,
    /// Service restarts (crashes, power cuts) the session was resumed across.
    pub(super) restarts: u64,
}

/// A session that was active when the service went down without closing it, and was resumed
/// within this long of its last stored frame; an older one is closed with its summary.
pub const SESSION_RESUME_MAX: Duration = Duration::from_secs(15 * 60);

/// The active session as saved in the outbox, in the same transaction as each of its frames
/// (so that a crash or a power cut does not lose it).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SessionRecord {
    pub(super) name: String,
    pub(super) started_ms: u64,
    /// When the last frame was stored (or the session started).
    pub(super) updated_ms: u64,
    pub(super) class_names: Vec<String>,
    pub(super) per_class: Vec<u64>,
    pub(super) uncertain: u64,
    pub(super) frames: u64,
    pub(super) restarts: u64,
}

impl ActiveSession {
    /// Its saved form, with `frame` counted in when given (the frame being stored with it).
    pub(super) fn record(&self, frame: Option<&Counts>) -> Vec<u8> {
        let mut counts = self.session.counts.clone();
        if let Some(c) = frame {
            counts.merge(c);
        }
        let rec = SessionRecord {
            name: self.name.clone(),
            started_ms: self.started_ms,
            updated_ms: now_ms(),
            class_names: self.session.class_names.clone(),
            per_class: counts.per_class,
            uncertain: counts.uncertain,
            frames: self.session.frames + u64::from(frame.is_some()),
            restarts: self.restarts,
        };
        serde_json::to_vec(&rec).expect("serialisable")
    }

    /// Back from its saved form; also returns when its last frame was stored.
    pub(super) fn from_record(bytes: &[u8]) -> Result<(ActiveSession, u64), String> {
        let r: SessionRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if r.per_class.len() != r.class_names.len() {
            return Err(format!(
                "{} counts for {} classes",
                r.per_class.len(),
                r.class_names.len()
            ));
        }
        let mut session = Session::new(r.class_names);
        session.counts = Counts {
            per_class: r.per_class,
            uncertain: r.uncertain,
        };
        session.frames = r.frames;
        Ok((
            ActiveSession {
                name: r.name,
                started_ms: r.started_ms,
                session,
                restarts: r.restarts,
            },
            r.updated_ms,
        ))
    }
}

/// Frame latencies kept for percentiles (the last `LATENCY_WINDOW`).
pub(super) const LATENCY_WINDOW: usize = 4096;

#[derive(Default)]
pub(super) struct Stats {
    pub(super) frames: FrameStats,
    pub(super) camera_error: Option<String>,
    /// The outbox's error while a result cannot be stored (disk full, read-only).
    pub(super) store_error: Option<String>,
    /// When the live source last delivered a frame (or reported an error), while it runs;
    /// `None` for sources that are not live.
    pub(super) camera_heard: Option<Instant>,
    pub(super) latencies_ms: std::collections::VecDeque<f64>,
    /// The last frames' counts, by the id of the model that produced them.
    pub(super) recent: std::collections::VecDeque<(String, Counts)>,
}

/// State shared by the stages, the publisher and the caller.
pub struct Shared {
    pub settings: PipelineSettings,
    /// The model new frames are cut and classified by ([`Shared::switch_model`]).
    model: Mutex<Arc<Served>>,
    /// The results not yet acknowledged by the broker (shared with the publisher).
    pub outbox: Arc<Mutex<Outbox>>,
    /// Set to stop: capture ends, queued frames are discarded, the publisher drains.
    pub stop: Arc<AtomicBool>,
    /// Set by the owner once the pipeline has finished (source ended or stopped) and the
    /// outbox holds everything it will get: the publisher then drains and stops.
    pub pipeline_done: Arc<AtomicBool>,
    /// Set by the last stage when it exits.
    pub(super) stages_done: AtomicBool,
    /// Woken whenever a result is stored.
    pub notify: Arc<tokio::sync::Notify>,
    /// systemd's readiness and watchdog (a no-op outside systemd).
    pub supervisor: Supervisor,
    started: Instant,
    pub(super) stats: Mutex<Stats>,
    pub(super) session: Mutex<Option<ActiveSession>>,
    /// The model store the `model/...` commands act on, once the owner sets it.
    model_control: Mutex<Option<Arc<dyn ModelControl>>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot of the counters, for the terminal view and the summary.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub frames: FrameStats,
    pub camera_error: Option<String>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub elapsed: Duration,
    pub session: Option<String>,
    /// Per-class counts of the active session.
    pub session_counts: Option<BTreeMap<String, u64>>,
}

/// The `q`-quantile (0..=1) of `sorted` (ascending) by nearest rank.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Shared {
    pub fn new(
        settings: PipelineSettings,
        model: ModelInfo,
        outbox: Outbox,
        stop: Arc<AtomicBool>,
    ) -> Arc<Self> {
        let first = Served::new(model, settings.cells.clone(), settings.crop, None);
        Arc::new(Shared {
            settings,
            model: Mutex::new(Arc::new(first)),
            outbox: Arc::new(Mutex::new(outbox)),
            stop,
            pipeline_done: Arc::new(AtomicBool::new(false)),
            stages_done: AtomicBool::new(false),
            notify: Arc::new(tokio::sync::Notify::new()),
            supervisor: Supervisor::from_env(),
            started: Instant::now(),
            stats: Mutex::new(Stats::default()),
            session: Mutex::new(None),
            model_control: Mutex::new(None),
        })
    }

    /// Lets `model/activate` and `model/rollback` act on `control`.
    pub fn set_model_control(&self, control: Arc<dyn ModelControl>) {
        *lock(&self.model_control) = Some(control);
    }

    pub(super) fn model_control(&self) -> Option<Arc<dyn ModelControl>> {
        lock(&self.model_control).clone()
    }

    /// Whether a session is counting.
    pub fn session_active(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// The model new frames are served by.
    pub fn model(&self) -> Arc<Served> {
        lock(&self.model).clone()
    }

    /// Serves `next` from the next frame cut on: frames already cut finish with the model
    /// that cut them, so no result mixes two models and none is lost. `next` must carry its
    /// backend.
    pub fn switch_model(&self, next: Served) {
        assert!(
            lock(&next.backend).is_some(),
            "a switch needs the new model's backend"
        );
        log::info!(
            "switching to model {} ({})",
            next.info.id,
            next.info.backend
        );
        *lock(&self.model) = Arc::new(next);
    }

    /// Summed class counts of the last `n` frames analysed by model `id` (at most
    /// [`HEALTH_WINDOW`]), and how many frames they are.
    pub fn recent_counts(&self, id: &str, n: usize) -> (Counts, usize) {
        let st = lock(&self.stats);
        let mut total: Option<Counts> = None;
        let mut frames = 0;
        for (_, c) in st.recent.iter().rev().filter(|(m, _)| m == id).take(n) {
            match total.as_mut() {
                Some(t) => t.merge(c),
                None => total = Some(c.clone()),
            }
            frames += 1;
        }
        (total.unwrap_or_else(|| Counts::new(0)), frames)
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!(
            "{}/{}/{leaf}",
            self.settings.topic_prefix, self.settings.device_id
        )
    }

    /// What the publisher is given of this state: the outbox, the bell, the done flag, and
    /// this state as the [`Device`] that answers for status and commands.
    pub fn link(self: &Arc<Self>) -> Link {
        Link {
            outbox: self.outbox.clone(),
            notify: self.notify.clone(),
            done: self.pipeline_done.clone(),
            device: self.clone(),
        }
    }

    /// Whether every pipeline stage has exited.
    pub fn pipeline_idle(&self) -> bool {
        self.stages_done.load(Ordering::SeqCst)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.stats);
        let mut lat: Vec<f64> = st.latencies_ms.iter().copied().collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let sess = lock(&self.session);
        Snapshot {
            frames: st.frames.clone(),
            camera_error: st.camera_error.clone(),
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
            elapsed: self.started.elapsed(),
            session: sess.as_ref().map(|s| s.name.clone()),
            session_counts: sess
                .as_ref()
                .map(|s| s.session.counts.by_name(&s.session.class_names)),
        }
    }

    /// The status message (`online` unless `offline`).
    pub fn status(&self, state: &str) -> StatusMsg {
        let (frames, camera_error, store_error) = {
            let st = lock(&self.stats);
            (
                st.frames.clone(),
                st.camera_error.clone().or_else(|| self.stalled(&st)),
                st.store_error.clone(),
            )
        };
        let model = self.model();
        let outbox = {
            let ob = lock(&self.outbox);
            OutboxStats {
                pending: ob.len().unwrap_or(0),
                dropped: ob.dropped().unwrap_or(0),
                next_seq: ob.next_seq().unwrap_or(0),
                error: store_error,
            }
        };
        StatusMsg {
            schema_version: VERSION,
            device: self.settings.device_id.clone(),
            state: state.into(),
            time_ms: now_ms(),
            model: Some(model.info.id.clone()),
            model_sha256: Some(model.info.sha256.clone()),
            backend: Some(model.info.backend.clone()),
            provider: Some(model.info.provider.clone()),
            backend_detail: Some(model.info.backend_detail.clone()),
            session: lock(&self.session).as_ref().map(|s| s.name.clone()),
            camera_error,
            frames,
            outbox,
            uptime_s: self.started.elapsed().as_secs_f64(),
            last_will: false,
        }
    }

    /// "no frame for N s" when a live source has been silent past `camera_stall`.
    fn stalled(&self, st: &Stats) -> Option<String> {
        let quiet = st.camera_heard?.elapsed();
        (quiet >= self.settings.camera_stall && !self.stopping()).then(|| {
            format!(
                "no frame from the camera for {:.0} s (stalled; it is still being read)",
                quiet.as_secs_f64()
            )
        })
    }

    /// The capture stage of a live source starts (or heard from it: an error is news too).
    pub(super) fn camera_heard(&self) {
        lock(&self.stats).camera_heard = Some(Instant::now());
    }

    /// The source ended: silence from here on is not a stall.
    pub(super) fn camera_done(&self) {
        lock(&self.stats).camera_heard = None;
    }

    pub(super) fn camera_ok(&self) {
        let mut st = lock(&self.stats);
        st.frames.captured += 1;
        if st.camera_heard.is_some() {
            st.camera_heard = Some(Instant::now());
        }
        if st.camera_error.take().is_some() {
            log::info!("camera delivering frames again");
        }
    }
}

impl Device for Shared {
    fn topic(&self, leaf: &str) -> String {
        Shared::topic(self, leaf)
    }

    fn status(&self, state: &str) -> StatusMsg {
        Shared::status(self, state)
    }

    fn command(&self, leaf: &str, payload: &[u8]) -> ReplyMsg {
        self.handle_command(leaf, payload)
    }
}
