//! The running pipeline: capture -> cells (decode, find, cut) -> inference and counts ->
//! outbox, one thread per stage with bounded queues between them (so cutting one frame
//! overlaps inference on the one before). The cells stage works on two or more frames side by
//! side and hands them on in frame order; a camera's frames wait in the frame queue undecoded,
//! so those dropped because the stages behind are busy cost no decode. [`state`] holds what the
//! stages share, [`commands`] what the broker may ask, [`queue`] the queue between stages.
//!
//! ```text
//! capture --[buffers: drop-oldest when live]--> cells workers (decode, find, cut; in order)
//!     --[crops: bounded]--> infer --> outbox
//!                                       |
//!        publisher (MQTT) <-- notify ---+
//! ```

mod commands;
pub mod queue;
pub mod state;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::capture::{Captured, Frame, FrameSource};
use crate::classify::{Counts, Prediction};
use crate::crop::{find_and_cut_into, FrameInputs};
use crate::infer::{classify_inputs, Backend, CellInputs};
use crate::publish::messages::{CountsMsg, VERSION};
use crate::publish::outbox::SessionRow;
pub use commands::{CommandError, ModelControl};
use queue::Queue;
pub use state::HEALTH_WINDOW;
use state::{lock, LATENCY_WINDOW};
pub use state::{percentile, ModelInfo, PipelineSettings, Served, Shared, Snapshot};

/// First and longest wait between attempts to store a result the outbox refused.
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);

struct Job {
    /// The frame cut; its image is empty (its pixels went to the next frame's decoding).
    frame: Frame,
    arrived: Instant,
    /// The cells' crops, cut, resized and normalised for the model (`3 x size x size` each).
    inputs: Vec<f32>,
    /// The cells' boxes, in the order of `inputs`.
    boxes: Vec<[u32; 4]>,
    /// The model that cut the crops, and so classifies them.
    model: Arc<Served>,
}

/// Handles to the running pipeline threads.
pub struct Pipeline {
    threads: Vec<std::thread::JoinHandle<()>>,
    frames: Arc<Queue<(Captured, Instant)>>,
}

impl Pipeline {
    /// Starts capture, cell finding and inference threads.
    pub fn start(
        shared: Arc<Shared>,
        mut source: Box<dyn FrameSource>,
        mut backend: Box<dyn Backend>,
    ) -> Pipeline {
        let frames = Arc::new(Queue::<(Captured, Instant)>::new(
            shared.settings.frame_queue,
        ));
        let jobs = Arc::new(Queue::<Job>::new(shared.settings.crop_queue));
        let mut threads = Vec::new();

        // Capture.
        {
            let (sh, q) = (shared.clone(), frames.clone());
            threads.push(spawn("capture", move || {
                let live = source.is_live();
                if live {
                    sh.camera_heard();
                }
                let mut backoff = Duration::from_millis(250);
                while !sh.stopping() {
                    match source.next_captured() {
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
                            if live {
                                sh.camera_heard();
                            }
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
                sh.camera_done();
                q.close();
            }));
        }

        // Decoding, cell finding and cropping: `frame_workers` frames side by side, each on
        // the pool of `cpu_threads` threads, handed on in the order they were taken.
        {
            let (sh, fq, jq) = (shared.clone(), frames.clone(), jobs.clone());
            threads.push(spawn("cells", move || {
                let pool = cpu_pool(sh.settings.cpu_threads);
                let workers = match sh.settings.frame_workers {
                    0 => frame_workers(pool.as_ref()),
                    n => n,
                };
                let order = Order::default();
                std::thread::scope(|scope| {
                    for k in 1..workers {
                        let (sh, fq, jq, pool, order) = (&sh, &fq, &jq, pool.as_ref(), &order);
                        std::thread::Builder::new()
                            .name(format!("cells-frame-{k}"))
                            .spawn_scoped(scope, move || cut_frames(sh, fq, jq, pool, order))
                            .expect("cannot start a pipeline thread");
                    }
                    cut_frames(&sh, &fq, &jq, pool.as_ref(), &order);
                });
                jq.close();
            }));
        }

        // Inference, classification, outbox. With `batch_wait`, the crops of the frames that
        // arrive within it (cut for the same model) share the backend's batches.
        {
            let (sh, jq) = (shared.clone(), jobs.clone());
            threads.push(spawn("infer", move || {
                let mut serving = sh.model();
                let mut carried: Option<Job> = None;
                loop {
                    let job = match carried.take() {
                        Some(j) => j,
                        None => match jq.pop_timeout(Duration::from_millis(200)) {
                            Ok(Some(j)) => j,
                            Ok(None) => continue,
                            Err(_) => break,
                        },
                    };
                    if sh.stopping() {
                        continue;
                    }
                    if !Arc::ptr_eq(&job.model, &serving) {
                        // The first frame cut for a new model: its backend takes over.
                        match job.model.take_backend() {
                            Some(b) => {
                                backend = b;
                                serving = job.model.clone();
                                log::info!(
                                    "frame {}: now classified by {}",
                                    job.frame.index,
                                    serving.info.id
                                );
                            }
                            None => {
                                lock(&sh.stats).frames.failed += 1;
                                log::error!("frame {}: its model has no backend", job.frame.index);
                                continue;
                            }
                        }
                    }
                    let mut batch = vec![job];
                    let wait = sh.settings.batch_wait;
                    if !wait.is_zero() {
                        let deadline = Instant::now() + wait;
                        let full = backend.batch_size();
                        while batch.iter().map(|j| j.boxes.len()).sum::<usize>() < full {
                            let now = Instant::now();
                            if now >= deadline {
                                break;
                            }
                            match jq.pop_timeout(deadline - now) {
                                Ok(Some(j)) if Arc::ptr_eq(&j.model, &serving) => batch.push(j),
                                // Another model's frame starts the next batch.
                                Ok(Some(j)) => {
                                    carried = Some(j);
                                    break;
                                }
                                Ok(None) | Err(_) => break,
                            }
                        }
                    }
                    process(&sh, backend.as_mut(), &batch);
                }
                sh.stages_done.store(true, Ordering::SeqCst);
            }));
        }
        Pipeline { threads, frames }
    }

    /// Frames waiting for the cells stage now (the capture stage's queue, bounded by
    /// `frame_queue`).
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

/// How many frames the cells stage works on side by side: as many as the pool has threads, and
/// at least two. A frame's serial steps (its decoding, parts of the finder) leave the pool's
/// other threads to the next frame, and the camera is kept up with at the pool's full width.
fn frame_workers(pool: Option<&rayon::ThreadPool>) -> usize {
    pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
        .max(2)
}

/// Hands the frames on in the order they were taken, whichever is cut first.
#[derive(Default)]
struct Order {
    /// The next frame's place in the order. Held while a frame is taken and its model read,
    /// so that the frames after a model switch are all cut for the new model.
    taken: std::sync::Mutex<u64>,
    /// The next frame to hand on.
    turn: std::sync::Mutex<u64>,
    turned: std::sync::Condvar,
}

/// One of the cells stage's workers: takes the next frame, decodes it (a bad buffer is counted
/// and skipped), finds its cells and cuts the model's input batch on `pool`, and hands the job
/// on in its turn. Returns when the frame queue is closed and empty, or the job queue closed.
/// A frame's pixels are not needed once its cells are cut: the worker decodes the next
/// camera frame into them (and a job waiting for the model holds no frame-sized image).
fn cut_frames(
    sh: &Shared,
    fq: &Queue<(Captured, Instant)>,
    jq: &Queue<Job>,
    pool: Option<&rayon::ThreadPool>,
    order: &Order,
) {
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let (seq, (captured, arrived), model) = {
            let mut taken = lock(&order.taken);
            match fq.pop_timeout(Duration::from_millis(200)) {
                Err(_) => return,
                Ok(None) => continue,
                Ok(Some(item)) => {
                    let seq = *taken;
                    *taken += 1;
                    (seq, item, sh.model())
                }
            }
        };
        let job = (!sh.stopping())
            .then(|| {
                let index = captured.index();
                let spare = &mut spare;
                let served = &model;
                let work = move || {
                    let mut frame = captured.decode_into(std::mem::take(spare))?;
                    let (size, norm) = (served.info.input_size, &served.info.normalization);
                    let cut =
                        find_and_cut_into(&frame.image, &served.cells, &served.crop, size, norm);
                    *spare = std::mem::take(&mut frame.image).into_raw();
                    Ok::<_, crate::capture::CaptureError>((frame, cut))
                };
                let done = match pool {
                    Some(p) => p.install(work),
                    None => work(),
                };
                match done {
                    Ok((frame, FrameInputs { boxes, inputs, .. })) => Some(Job {
                        frame,
                        arrived,
                        inputs,
                        boxes,
                        model,
                    }),
                    Err(e) => {
                        lock(&sh.stats).frames.bad += 1;
                        log::warn!("bad frame {index} skipped: {e}");
                        None
                    }
                }
            })
            .flatten();
        let mut turn = lock(&order.turn);
        while *turn != seq {
            turn = order.turned.wait(turn).unwrap_or_else(|e| e.into_inner());
        }
        let handed = job.is_none_or(|j| jq.push_wait(j).is_ok());
        *turn += 1;
        drop(turn);
        order.turned.notify_all();
        if !handed {
            return;
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

/// The pool the CPU stages of a frame run on: `threads` threads (0 = one per core: rayon's
/// global pool). `None` when it cannot be built (then the global pool, with a warning).
fn cpu_pool(threads: usize) -> Option<rayon::ThreadPool> {
    if threads == 0 {
        return None;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cells-{i}"))
        .build()
        .map_err(|e| {
            log::warn!(
                "cannot start {threads} threads for cell finding ({e}): one per core instead"
            )
        })
        .ok()
}

/// Why a frame's result was not stored (counted in `frames.failed` and logged).
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("cannot store the result: {0}")]
    Store(#[from] crate::publish::outbox::OutboxError),
}

/// Classifies the crops of `jobs` (frames cut for one model) together, then stores each
/// frame's counts in the outbox, in order. A failed inference fails every frame of the batch.
fn process(sh: &Shared, backend: &mut dyn Backend, jobs: &[Job]) {
    let model = &jobs[0].model.info;
    let joined: (Vec<f32>, Vec<[u32; 4]>);
    let (inputs, boxes) = match jobs {
        [one] => (&one.inputs[..], &one.boxes[..]),
        _ => {
            joined = (
                jobs.iter().flat_map(|j| j.inputs.iter().copied()).collect(),
                jobs.iter().flat_map(|j| j.boxes.iter().copied()).collect(),
            );
            (&joined.0[..], &joined.1[..])
        }
    };
    let classified = if backend.input_size() as u32 == model.input_size {
        classify_inputs(
            CellInputs {
                pixels: inputs,
                boxes,
                size: model.size.as_ref(),
            },
            backend,
            &model.class_names,
            sh.settings.min_confidence,
        )
    } else {
        Err(reddino_models::Error::Inference(format!(
            "crops cut at {0}x{0} for a backend of input {1}x{1}",
            model.input_size,
            backend.input_size()
        )))
    };
    let predictions = match classified {
        Ok(p) => p,
        Err(e) => {
            lock(&sh.stats).frames.failed += jobs.len() as u64;
            for job in jobs {
                log::error!(
                    "frame {} ({}): inference failed: {e}",
                    job.frame.index,
                    job.frame.origin
                );
            }
            return;
        }
    };
    let mut rest = &predictions[..];
    for job in jobs {
        let (mine, after) = rest.split_at(job.boxes.len());
        rest = after;
        match store(sh, job, mine) {
            Ok(()) => sh.notify.notify_one(),
            Err(e) => {
                lock(&sh.stats).frames.failed += 1;
                log::error!("frame {} ({}): {e}", job.frame.index, job.frame.origin);
            }
        }
    }
}

/// Stores one frame's counts in the outbox.
fn store(sh: &Shared, job: &Job, predictions: &[Prediction]) -> Result<(), FrameError> {
    let model = &job.model.info;
    let names = &model.class_names;
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
        model: model.id.clone(),
        model_sha256: model.sha256.clone(),
        backend: model.backend.clone(),
        provider: model.provider.clone(),
        cells: counts.total(),
        counts: by_name,
        latency_ms,
    };
    let topic = sh.topic("counts");
    // A result that cannot be stored (disk full, state directory read-only) keeps its place:
    // it is tried again until it is stored, with the error in `status.outbox.error`, while the
    // frames behind it wait (a live camera's are dropped and counted). Only a stop while it
    // still fails loses it, counted in `frames.failed`.
    let mut wait = STORE_RETRY_FIRST;
    let mut failing_since: Option<Instant> = None;
    loop {
        // The session lock is held while the row is stored, so a session summary covers
        // exactly the frames stored before it.
        let mut sess = lock(&sh.session);
        msg.session = sess.as_ref().map(|s| s.name.clone());
        // The session's saved state moves with the row, in its transaction.
        let saved = sess.as_ref().map(|s| s.record(Some(&counts)));
        let pushed = lock(&sh.outbox).push_with_session(
            &topic,
            |seq| {
                msg.seq = seq;
                serde_json::to_vec(&msg).expect("serialisable")
            },
            match &saved {
                Some(b) => SessionRow::Save(b),
                None => SessionRow::Keep,
            },
        );
        match pushed {
            Ok(_) => {
                if let Some(s) = sess.as_mut() {
                    s.session.add_frame(&counts);
                }
                drop(sess);
                if let Some(t) = failing_since {
                    lock(&sh.stats).store_error = None;
                    log::warn!(
                        "outbox writable again after {:.1} s: frame {} stored",
                        t.elapsed().as_secs_f64(),
                        job.frame.index
                    );
                }
                break;
            }
            Err(e) => {
                drop(sess);
                let text = e.to_string();
                let changed =
                    lock(&sh.stats).store_error.replace(text.clone()) != Some(text.clone());
                if changed {
                    log::error!(
                        "frame {}: cannot store its result ({text}); retrying until it is stored",
                        job.frame.index
                    );
                }
                failing_since.get_or_insert_with(Instant::now);
                if sh.stopping() {
                    return Err(FrameError::Store(e));
                }
                sleep_unless_stopped(sh, wait);
                wait = (wait * 2).min(STORE_RETRY_MAX);
            }
        }
    }
    let mut st = lock(&sh.stats);
    st.frames.processed += 1;
    st.frames.cells += counts.total();
    if st.latencies_ms.len() == LATENCY_WINDOW {
        st.latencies_ms.pop_front();
    }
    st.latencies_ms.push_back(latency_ms);
    if st.recent.len() == HEALTH_WINDOW {
        st.recent.pop_front();
    }
    st.recent.push_back((model.id.clone(), counts.clone()));
    drop(st);
    sh.supervisor.frame_done(&model.id);
    Ok(())
}
