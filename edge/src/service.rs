//! The running service: capture -> cells -> inference -> outbox, with bounded queues between
//! the stages (one thread each, so finding cells in one frame overlaps inference on the one
//! before), and the state that commands and `status` read.
//!
//! ```text
//! capture --[frames: drop-oldest when live]--> cells --[crops: bounded]--> infer --> outbox
//!                                                                                   |
//!                                                    publisher (MQTT) <-- notify ---+
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use image::RgbImage;
use reddino_models::preprocess::Normalization;

use crate::analyze::{classify_crops, find_and_crop};
use crate::capture::{Frame, FrameSource};
use crate::cells::CellFinderConfig;
use crate::classify::{Counts, Session};
use crate::config::valid_id;
use crate::infer::Backend;
use crate::messages::{
    self, ClassShare, CommandMsg, CountsMsg, FrameStats, OutboxStats, ReplyMsg, SessionMsg,
    StatusMsg, VERSION,
};
use crate::outbox::Outbox;
use crate::queue::Queue;

/// What the pipeline needs besides its source and backend.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub device_id: String,
    pub topic_prefix: String,
    /// Cell finder settings; in tile mode `tile` must be the model input size.
    pub cells: CellFinderConfig,
    pub margin: f32,
    pub min_confidence: f32,
    pub frame_queue: usize,
    pub crop_queue: usize,
    /// Longest wait between attempts to reopen a failing camera.
    pub camera_retry_max: Duration,
}

/// The bundle's identity and classes.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `name@version`.
    pub id: String,
    pub backend: String,
    pub class_names: Vec<String>,
    pub normalization: Normalization,
    /// The model's crop policy (`Manifest::crop_min_side`).
    pub crop_min_side: f32,
    /// The model's crop policy (`Manifest::blank_neighbours`).
    pub blank_neighbours: bool,
}

struct ActiveSession {
    name: String,
    started_ms: u64,
    session: Session,
}

/// Frame latencies kept for percentiles (the last `LATENCY_WINDOW`).
const LATENCY_WINDOW: usize = 4096;

#[derive(Default)]
struct Stats {
    frames: FrameStats,
    camera_error: Option<String>,
    latencies_ms: std::collections::VecDeque<f64>,
}

/// State shared by the stages, the publisher and the caller.
pub struct Shared {
    pub settings: PipelineSettings,
    pub model: ModelInfo,
    pub outbox: Mutex<Outbox>,
    /// Set to stop: capture ends, queued frames are discarded, the publisher drains.
    pub stop: Arc<AtomicBool>,
    /// Set by the owner once the pipeline has finished (source ended or stopped) and the
    /// outbox holds everything it will get: the publisher then drains and stops.
    pub pipeline_done: AtomicBool,
    /// Set by the last stage when it exits.
    stages_done: AtomicBool,
    /// Woken whenever a result is stored.
    pub notify: tokio::sync::Notify,
    started: Instant,
    stats: Mutex<Stats>,
    session: Mutex<Option<ActiveSession>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

/// The `q`-quantile (0..=1) of `v` by nearest rank.
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

impl Shared {
    pub fn new(
        settings: PipelineSettings,
        model: ModelInfo,
        outbox: Outbox,
        stop: Arc<AtomicBool>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            settings,
            model,
            outbox: Mutex::new(outbox),
            stop,
            pipeline_done: AtomicBool::new(false),
            stages_done: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            started: Instant::now(),
            stats: Mutex::new(Stats::default()),
            session: Mutex::new(None),
        })
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!(
            "{}/{}/{leaf}",
            self.settings.topic_prefix, self.settings.device_id
        )
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
        let lat: Vec<f64> = st.latencies_ms.iter().copied().collect();
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
        let (frames, camera_error) = {
            let st = lock(&self.stats);
            (st.frames.clone(), st.camera_error.clone())
        };
        let outbox = {
            let ob = lock(&self.outbox);
            OutboxStats {
                pending: ob.len().unwrap_or(0),
                dropped: ob.dropped().unwrap_or(0),
                next_seq: ob.next_seq().unwrap_or(0),
            }
        };
        StatusMsg {
            schema_version: VERSION,
            device: self.settings.device_id.clone(),
            state: state.into(),
            time_ms: messages::now_ms(),
            model: Some(self.model.id.clone()),
            backend: Some(self.model.backend.clone()),
            session: lock(&self.session).as_ref().map(|s| s.name.clone()),
            camera_error,
            frames,
            outbox,
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Handles one command (`leaf` is the topic part after `cmd/`). A malformed or refused
    /// command changes nothing and gets `ok: false` with the reason.
    pub fn handle_command(&self, leaf: &str, payload: &[u8]) -> ReplyMsg {
        let mut reply = ReplyMsg {
            schema_version: VERSION,
            id: None,
            command: leaf.to_string(),
            ok: false,
            error: None,
            status: None,
        };
        let cmd: CommandMsg = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                // Echo the id when the JSON at least has one.
                reply.id = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from));
                reply.error = Some(format!("malformed command payload: {e}"));
                return reply;
            }
        };
        reply.id = cmd.id.clone();
        if cmd.schema_version != VERSION {
            reply.error = Some(format!(
                "payload version {} is not supported (this device speaks {VERSION})",
                cmd.schema_version
            ));
            return reply;
        }
        let result = match leaf {
            "session/start" => self.start_session(cmd.session.as_deref()),
            "session/stop" => self.stop_session().map(|_| ()),
            "status" => {
                reply.status = Some(self.status("online"));
                Ok(())
            }
            other => Err(format!(
                "unknown command {other:?}; known: session/start, session/stop, status"
            )),
        };
        match result {
            Ok(()) => reply.ok = true,
            Err(e) => reply.error = Some(e),
        }
        reply
    }

    /// Starts a session (a slide): frames from now on are counted into it.
    pub fn start_session(&self, name: Option<&str>) -> Result<(), String> {
        let name = name.ok_or("session/start needs \"session\": the slide's name")?;
        if !valid_id(name) {
            return Err(format!(
                "session name {name:?} must be 1-64 letters, digits, '-', '_' or '.'"
            ));
        }
        let mut s = lock(&self.session);
        if let Some(a) = s.as_ref() {
            return Err(format!(
                "session {:?} is active; stop it before starting another",
                a.name
            ));
        }
        log::info!("session {name} started");
        *s = Some(ActiveSession {
            name: name.to_string(),
            started_ms: messages::now_ms(),
            session: Session::new(self.model.class_names.clone()),
        });
        Ok(())
    }

    /// Stops the active session and stores its summary; returns the summary's `seq`.
    pub fn stop_session(&self) -> Result<u64, String> {
        let mut s = lock(&self.session);
        let Some(a) = s.as_ref() else {
            return Err("no session is active".into());
        };
        let props = a.session.proportions();
        let para = a.session.parasitemia_pct();
        let mut msg = SessionMsg {
            schema_version: VERSION,
            seq: 0,
            device: self.settings.device_id.clone(),
            session: a.name.clone(),
            started_ms: a.started_ms,
            ended_ms: messages::now_ms(),
            frames: a.session.frames,
            cells: a.session.counts.per_class.iter().sum(),
            uncertain: a.session.counts.uncertain,
            classes: props
                .into_iter()
                .map(|p| ClassShare {
                    class: p.class,
                    count: p.count,
                    proportion: p.proportion,
                    ci95: [p.ci95.0, p.ci95.1],
                })
                .collect(),
            parasitemia_pct: para.map(|p| p.0),
            parasitemia_ci95: para.map(|p| [p.1 .0, p.1 .1]),
        };
        let topic = self.topic("session");
        let seq = lock(&self.outbox)
            .push(&topic, |seq| {
                msg.seq = seq;
                serde_json::to_vec(&msg).expect("serialisable")
            })
            .map_err(|e| format!("cannot store the session summary: {e}"))?;
        log::info!("session {} stopped (summary seq {seq})", a.name);
        *s = None;
        drop(s);
        self.notify.notify_one();
        Ok(seq)
    }

    fn camera_ok(&self) {
        let mut st = lock(&self.stats);
        st.frames.captured += 1;
        if st.camera_error.take().is_some() {
            log::info!("camera delivering frames again");
        }
    }
}

struct Job {
    frame: Frame,
    arrived: Instant,
    crops: Vec<RgbImage>,
}

/// Handles to the running pipeline threads.
pub struct Pipeline {
    threads: Vec<std::thread::JoinHandle<()>>,
    frames: Arc<Queue<(Frame, Instant)>>,
}

impl Pipeline {
    /// Starts capture, cell finding and inference threads.
    pub fn start(
        shared: Arc<Shared>,
        mut source: Box<dyn FrameSource>,
        mut backend: Box<dyn Backend>,
    ) -> Pipeline {
        let frames = Arc::new(Queue::<(Frame, Instant)>::new(shared.settings.frame_queue));
        let jobs = Arc::new(Queue::<Job>::new(shared.settings.crop_queue));
        let mut threads = Vec::new();

        // Capture.
        {
            let (sh, q) = (shared.clone(), frames.clone());
            threads.push(spawn("capture", move || {
                let live = source.is_live();
                let mut backoff = Duration::from_millis(250);
                while !sh.stopping() {
                    match source.next_frame() {
                        Ok(Some(f)) => {
                            sh.camera_ok();
                            backoff = Duration::from_millis(250);
                            let item = (f, Instant::now());
                            if live {
                                if let Ok(Some(_)) = q.push_drop_oldest(item) {
                                    lock(&sh.stats).frames.dropped += 1;
                                }
                            } else if q.push_wait(item).is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) if e.is_device_error() => {
                            let msg = e.to_string();
                            let changed = lock(&sh.stats).camera_error.replace(msg.clone())
                                != Some(msg.clone());
                            if changed {
                                log::error!(
                                    "{msg}; retrying (up to every {:.0?})",
                                    sh.settings.camera_retry_max
                                );
                            }
                            sleep_unless_stopped(&sh, backoff);
                            backoff = (backoff * 2).min(sh.settings.camera_retry_max);
                        }
                        Err(e) => {
                            lock(&sh.stats).frames.bad += 1;
                            log::warn!("bad frame skipped: {e}");
                        }
                    }
                }
                q.close();
            }));
        }

        // Cell finding and cropping.
        {
            let (sh, fq, jq) = (shared.clone(), frames.clone(), jobs.clone());
            threads.push(spawn("cells", move || {
                let cfg = sh.settings.cells.clone();
                while let Ok(item) = fq.pop_timeout(Duration::from_millis(200)) {
                    let Some((frame, arrived)) = item else {
                        continue;
                    };
                    if sh.stopping() {
                        continue;
                    }
                    let (_, crops) = find_and_crop(
                        &frame.image,
                        &cfg,
                        sh.settings.margin,
                        sh.model.crop_min_side,
                        sh.model.blank_neighbours,
                    );
                    let job = Job {
                        frame,
                        arrived,
                        crops,
                    };
                    if jq.push_wait(job).is_err() {
                        break;
                    }
                }
                jq.close();
            }));
        }

        // Inference, classification, outbox.
        {
            let (sh, jq) = (shared.clone(), jobs.clone());
            threads.push(spawn("infer", move || {
                while let Ok(item) = jq.pop_timeout(Duration::from_millis(200)) {
                    let Some(job) = item else { continue };
                    if sh.stopping() {
                        continue;
                    }
                    match process(&sh, backend.as_mut(), &job) {
                        Ok(()) => sh.notify.notify_one(),
                        Err(e) => {
                            lock(&sh.stats).frames.failed += 1;
                            log::error!("frame {} ({}): {e}", job.frame.index, job.frame.origin);
                        }
                    }
                }
                sh.stages_done.store(true, Ordering::SeqCst);
            }));
        }
        Pipeline { threads, frames }
    }

    /// Frames waiting for cell finding now.
    pub fn queued_frames(&self) -> usize {
        self.frames.len()
    }

    /// Waits for every stage to finish.
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                log::error!("a pipeline thread panicked");
            }
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("cannot start a pipeline thread")
}

fn sleep_unless_stopped(sh: &Shared, d: Duration) {
    let end = Instant::now() + d;
    while !sh.stopping() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// Classifies a job's crops and stores the frame's counts in the outbox.
fn process(sh: &Shared, backend: &mut dyn Backend, job: &Job) -> Result<(), String> {
    let names = &sh.model.class_names;
    let predictions = classify_crops(
        &job.crops,
        backend,
        names,
        &sh.model.normalization,
        sh.settings.min_confidence,
    )
    .map_err(|e| e.to_string())?;
    let mut counts = Counts::new(names.len());
    predictions.iter().for_each(|p| counts.add(p));
    let by_name = counts.by_name(names);
    let latency_ms = job.arrived.elapsed().as_secs_f64() * 1e3;
    let mut msg = CountsMsg {
        schema_version: VERSION,
        seq: 0,
        device: sh.settings.device_id.clone(),
        frame: job.frame.index,
        captured_ms: job
            .frame
            .captured
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        origin: job.frame.origin.clone(),
        session: None,
        model: sh.model.id.clone(),
        cells: counts.total(),
        counts: by_name,
        latency_ms,
    };
    let topic = sh.topic("counts");
    // The session lock is held while the row is stored, so a session summary covers exactly
    // the frames stored before it.
    let mut sess = lock(&sh.session);
    msg.session = sess.as_ref().map(|s| s.name.clone());
    lock(&sh.outbox)
        .push(&topic, |seq| {
            msg.seq = seq;
            serde_json::to_vec(&msg).expect("serialisable")
        })
        .map_err(|e| format!("cannot store the result: {e}"))?;
    if let Some(s) = sess.as_mut() {
        s.session.add_frame(&counts);
    }
    drop(sess);
    let mut st = lock(&sh.stats);
    st.frames.processed += 1;
    st.frames.cells += counts.total();
    if st.latencies_ms.len() == LATENCY_WINDOW {
        st.latencies_ms.pop_front();
    }
    st.latencies_ms.push_back(latency_ms);
    Ok(())
}
