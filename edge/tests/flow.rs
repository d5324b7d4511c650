//! Flow control: when inference falls behind a live source, the oldest frames are dropped and
//! counted (a camera's before they are decoded), the frame queue never grows past its capacity,
//! every frame is accounted for, and results are stored in frame order.
//! Batching across frames: crops of several frames share backend calls, and each frame's
//! result is exactly what it is without batching.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reddino_edge::capture::{
    CameraBuffer, CaptureError, Captured, Frame, FrameSource, Paced, PixelFormat, SyntheticSource,
};
use reddino_edge::cells::CellFinderConfig;
use reddino_edge::crop::CropPolicy;
use reddino_edge::infer::{Backend, BatchOutput};
use reddino_edge::pipeline::{ModelInfo, Pipeline, PipelineSettings, Shared};
use reddino_edge::publish::outbox::{Outbox, OutboxLimits};
use reddino_models::preprocess::Normalization;
use reddino_models::synth::SourcePreset;

/// A backend that takes `delay` per call and answers class 0.
struct SlowBackend {
    delay: Duration,
    classes: usize,
}

impl Backend for SlowBackend {
    fn input_size(&self) -> usize {
        14
    }
    fn batch_size(&self) -> usize {
        512
    }
    fn run(&mut self, _pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
        std::thread::sleep(self.delay);
        let mut logits = vec![0.0; n * self.classes];
        for i in 0..n {
            logits[i * self.classes] = 5.0;
        }
        Ok(BatchOutput {
            n,
            dim: 1,
            embeddings: vec![0.0; n],
            classes: self.classes,
            logits: Some(logits),
        })
    }
    fn name(&self) -> &'static str {
        "slow"
    }
    fn provider(&self) -> &str {
        "cpu"
    }
    fn describe(&self) -> String {
        "slow test backend".into()
    }
}

#[test]
fn slow_inference_drops_oldest_frames_with_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    let cap = 2;
    let shared = Shared::new(
        PipelineSettings {
            device_id: "flow".into(),
            topic_prefix: "reddino".into(),
            cells: CellFinderConfig::default(),
            crop: CropPolicy::default(),
            min_confidence: 0.0,
            frame_queue: cap,
            crop_queue: 1,
            camera_retry_max: Duration::from_millis(100),
            batch_wait: Duration::ZERO,
            camera_stall: Duration::from_secs(10),
            cpu_threads: 1,
            frame_workers: 0,
        },
        ModelInfo {
            id: "slow@1".into(),
            sha256: "0".repeat(64),
            backend: "slow".into(),
            provider: "cpu".into(),
            backend_detail: "slow test backend".into(),
            class_names: names,
            normalization: Normalization::default(),
            input_size: 14,
            size: None,
        },
        Outbox::open(&tmp.path().join("o.db"), OutboxLimits::default()).unwrap(),
        Arc::new(AtomicBool::new(false)),
    );
    let frames = 30;
    let source = Paced::new(
        SyntheticSource::new(
            vec![SourcePreset::by_name("mgg_100x").unwrap()],
            320,
            240,
            1,
            Some(frames),
        ),
        200.0,
    );
    let pipeline = Pipeline::start(
        shared.clone(),
        Box::new(source),
        Box::new(SlowBackend {
            delay: Duration::from_millis(150),
            classes: 2,
        }),
    );
    let mut most = 0;
    while !shared.pipeline_idle() {
        most = most.max(pipeline.queued_frames());
        std::thread::sleep(Duration::from_millis(2));
    }
    pipeline.join();
    let s = shared.snapshot();
    assert!(most <= cap, "the frame queue held {most} > {cap}");
    assert_eq!(s.frames.captured, frames);
    assert!(s.frames.dropped > 0, "{:?}", s.frames);
    assert!(s.frames.processed >= 2, "{:?}", s.frames);
    assert_eq!(
        s.frames.processed + s.frames.dropped,
        frames,
        "every frame is analysed or counted as dropped"
    );
    let ob = shared.outbox.lock().unwrap();
    assert_eq!(
        ob.len().unwrap(),
        s.frames.processed,
        "one result per analysed frame"
    );
}

/// The results in the outbox (up to 100), in the order they were stored.
fn stored(shared: &Shared) -> Vec<reddino_edge::publish::messages::CountsMsg> {
    let ob = shared.outbox.lock().unwrap();
    ob.pending_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| serde_json::from_slice(&e.payload).unwrap())
        .collect()
}

/// A camera handing over MJPG buffers as a V4L2 camera does (undecoded): every third one cut
/// short.
struct BufferCamera {
    jpeg: Vec<u8>,
    next: u64,
    frames: u64,
}

impl BufferCamera {
    fn truncated(index: u64) -> bool {
        index % 3 == 2
    }
}

impl FrameSource for BufferCamera {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        self.next_captured()?.map(Captured::decode).transpose()
    }

    fn next_captured(&mut self) -> Result<Option<Captured>, CaptureError> {
        if self.next == self.frames {
            return Ok(None);
        }
        let index = self.next;
        self.next += 1;
        let data = if Self::truncated(index) {
            self.jpeg[..self.jpeg.len() / 2].to_vec()
        } else {
            self.jpeg.clone()
        };
        Ok(Some(Captured::Buffer(CameraBuffer {
            index,
            captured: std::time::SystemTime::now(),
            origin: "camera".into(),
            format: PixelFormat::Mjpg,
            width: 320,
            height: 240,
            data,
        })))
    }

    fn is_live(&self) -> bool {
        true
    }
}

#[test]
fn a_cameras_frames_are_decoded_only_when_analysed_and_bad_ones_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut field = SyntheticSource::new(
        vec![SourcePreset::by_name("mgg_100x").unwrap()],
        320,
        240,
        3,
        Some(1),
    );
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&field.next_frame().unwrap().unwrap().image)
        .unwrap();
    let shared = pixel_shared(
        PipelineSettings {
            frame_queue: 2,
            crop_queue: 1,
            cpu_threads: 2,
            ..settings()
        },
        Outbox::open(&tmp.path().join("o.db"), OutboxLimits::default()).unwrap(),
    );
    let frames = 30;
    let camera = BufferCamera {
        jpeg,
        next: 0,
        frames,
    };
    let pipeline = Pipeline::start(
        shared.clone(),
        Box::new(Paced::new(camera, 200.0)),
        Box::new(SlowBackend {
            delay: Duration::from_millis(150),
            classes: 2,
        }),
    );
    while !shared.pipeline_idle() {
        std::thread::sleep(Duration::from_millis(2));
    }
    pipeline.join();
    let s = shared.snapshot().frames;
    let truncated = (0..frames).filter(|&i| BufferCamera::truncated(i)).count() as u64;
    assert_eq!(s.captured, frames);
    assert!(s.processed >= 2 && s.dropped > 0, "{s:?}");
    assert_eq!(
        s.processed + s.dropped + s.bad,
        frames,
        "every frame analysed, dropped or bad, once: {s:?}"
    );
    // Decoded as they arrived, all ten short frames would be bad; dropped unseen, most are not.
    assert!(
        s.bad < truncated,
        "a dropped frame was decoded: {} of {truncated} short frames found bad",
        s.bad
    );
    let stored: Vec<u64> = stored(&shared).iter().map(|m| m.frame).collect();
    assert_eq!(stored.len() as u64, s.processed);
    assert!(
        stored.windows(2).all(|p| p[0] < p[1]),
        "results stored in frame order: {stored:?}"
    );
    assert!(stored.iter().all(|&i| !BufferCamera::truncated(i)));
}

/// Answers from the pixels (class 0 when the crop is brighter than the middle) and records
/// every call's batch size.
struct PixelBackend {
    calls: Arc<Mutex<Vec<usize>>>,
}

impl Backend for PixelBackend {
    fn input_size(&self) -> usize {
        14
    }
    fn batch_size(&self) -> usize {
        64
    }
    fn run(&mut self, pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
        self.calls.lock().unwrap().push(n);
        let per = pixels.len() / n;
        let mut logits = Vec::new();
        for img in pixels.chunks_exact(per) {
            let mean = img.iter().sum::<f32>() / per as f32;
            logits.extend([mean * 10.0, -mean * 10.0]);
        }
        Ok(BatchOutput {
            n,
            dim: 1,
            embeddings: vec![0.0; n],
            classes: 2,
            logits: Some(logits),
        })
    }
    fn name(&self) -> &'static str {
        "pixel"
    }
    fn provider(&self) -> &str {
        "cpu"
    }
    fn describe(&self) -> String {
        "pixel test backend".into()
    }
}

/// Settings for the pixel-backend tests: queues of 4 and 2, no batching wait, a 10 s stall.
fn settings() -> PipelineSettings {
    PipelineSettings {
        device_id: "flow".into(),
        topic_prefix: "reddino".into(),
        cells: CellFinderConfig::default(),
        crop: CropPolicy::default(),
        min_confidence: 0.0,
        frame_queue: 4,
        crop_queue: 2,
        camera_retry_max: Duration::from_millis(100),
        batch_wait: Duration::ZERO,
        camera_stall: Duration::from_secs(10),
        cpu_threads: 1,
        frame_workers: 0,
    }
}

/// The state of a pipeline classified by [`PixelBackend`] (classes `a`, `b`), over `outbox`.
fn pixel_shared(settings: PipelineSettings, outbox: Outbox) -> Arc<Shared> {
    Shared::new(
        settings,
        ModelInfo {
            id: "pixel@1".into(),
            sha256: "0".repeat(64),
            backend: "pixel".into(),
            provider: "cpu".into(),
            backend_detail: "pixel test backend".into(),
            class_names: vec!["a".into(), "b".into()],
            normalization: Normalization::default(),
            input_size: 14,
            size: None,
        },
        outbox,
        Arc::new(AtomicBool::new(false)),
    )
}

/// Runs 16 synthetic frames through the pipeline with `wait` of batching; returns each
/// stored result (frame, cells, counts) in order and the backend's batch sizes.
fn run_batched(wait: Duration) -> (Vec<(u64, u64, String)>, Vec<usize>) {
    let tmp = tempfile::tempdir().unwrap();
    let shared = pixel_shared(
        PipelineSettings {
            crop_queue: 8,
            batch_wait: wait,
            ..settings()
        },
        Outbox::open(&tmp.path().join("o.db"), OutboxLimits::default()).unwrap(),
    );
    let source = SyntheticSource::new(
        vec![SourcePreset::by_name("mgg_100x").unwrap()],
        320,
        240,
        5,
        Some(16),
    );
    let calls = Arc::new(Mutex::new(Vec::new()));
    let pipeline = Pipeline::start(
        shared.clone(),
        Box::new(source),
        Box::new(PixelBackend {
            calls: calls.clone(),
        }),
    );
    while !shared.pipeline_idle() {
        std::thread::sleep(Duration::from_millis(2));
    }
    pipeline.join();
    assert_eq!(shared.snapshot().frames.processed, 16);
    let rows: Vec<(u64, u64, String)> = stored(&shared)
        .into_iter()
        .map(|m| {
            assert_eq!((m.backend.as_str(), m.provider.as_str()), ("pixel", "cpu"));
            (m.frame, m.cells, format!("{:?}", m.counts))
        })
        .collect();
    let calls = calls.lock().unwrap().clone();
    let frames: Vec<u64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        frames,
        (0..16).collect::<Vec<_>>(),
        "results stored in frame order"
    );
    (rows, calls)
}

#[test]
fn batching_across_frames_fills_batches_and_keeps_each_frames_result() {
    let (alone, calls_alone) = run_batched(Duration::ZERO);
    let (batched, calls_batched) = run_batched(Duration::from_millis(400));
    assert_eq!(alone.len(), 16);
    let cells: u64 = alone.iter().map(|r| r.1).sum();
    assert!(cells > 16, "too few cells to batch: {cells}");
    assert_eq!(
        batched, alone,
        "each frame's stored result must not depend on batching"
    );
    assert!(
        calls_batched.len() < calls_alone.len(),
        "batched {calls_batched:?} against alone {calls_alone:?}"
    );
    let most_per_frame = alone.iter().map(|r| r.1 as usize).max().unwrap();
    assert!(
        calls_batched.iter().any(|&n| n > most_per_frame),
        "no call held more than one frame's crops: {calls_batched:?}"
    );
    assert!(calls_batched.iter().all(|&n| n <= 64));
}

/// 20 synthetic frames with the outbox capped at its size when created (the rows that fit in
/// its last page go in, then it is full); `release` decides what happens once a store has
/// failed: lift the cap, or stop the pipeline. Returns the shared state after the pipeline
/// ended, the status seen while the outbox was full and the frames stored before it filled.
fn run_with_full_outbox(
    release: impl FnOnce(&Shared),
) -> (
    Arc<Shared>,
    reddino_edge::publish::messages::StatusMsg,
    u64,
    tempfile::TempDir,
) {
    let tmp = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(&tmp.path().join("o.db"), OutboxLimits::default()).unwrap();
    outbox.set_full(true).unwrap();
    let shared = pixel_shared(settings(), outbox);
    let source = SyntheticSource::new(
        vec![SourcePreset::by_name("mgg_100x").unwrap()],
        320,
        240,
        9,
        Some(20),
    );
    let pipeline = Pipeline::start(
        shared.clone(),
        Box::new(source),
        Box::new(PixelBackend {
            calls: Arc::new(Mutex::new(Vec::new())),
        }),
    );
    let t = std::time::Instant::now();
    let seen = loop {
        let s = shared.status("online");
        if s.outbox.error.is_some() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the full outbox never showed"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Nothing moves while the outbox is full.
    let before = shared.snapshot().frames.processed;
    assert!(before < 20);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(shared.snapshot().frames.processed, before);
    release(&shared);
    while !shared.pipeline_idle() {
        std::thread::sleep(Duration::from_millis(5));
    }
    pipeline.join();
    (shared, seen, before, tmp)
}

#[test]
fn a_full_outbox_holds_results_until_it_can_store_them() {
    let (shared, seen, _, _tmp) =
        run_with_full_outbox(|sh| sh.outbox.lock().unwrap().set_full(false).unwrap());
    let err = seen.outbox.error.unwrap();
    assert!(err.contains("full"), "status while full: {err}");
    let s = shared.snapshot();
    assert_eq!(s.frames.processed, 20, "{:?}", s.frames);
    assert_eq!(s.frames.failed, 0);
    assert!(shared.status("online").outbox.error.is_none());
    let ob = shared.outbox.lock().unwrap();
    let rows = ob.pending_after(0, 100).unwrap();
    let seqs: Vec<u64> = rows.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>(), "no gap, no loss");
    let frames: Vec<u64> = rows
        .iter()
        .map(|e| {
            serde_json::from_slice::<reddino_edge::publish::messages::CountsMsg>(&e.payload)
                .unwrap()
                .frame
        })
        .collect();
    assert_eq!(
        frames,
        (0..20).collect::<Vec<u64>>(),
        "every frame once, in order"
    );
}

#[test]
fn a_stop_while_the_outbox_is_full_counts_the_result_it_could_not_store() {
    let (shared, _, before, _tmp) = run_with_full_outbox(|sh| {
        sh.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let s = shared.snapshot();
    assert_eq!(s.frames.processed, before);
    assert_eq!(
        s.frames.failed, 1,
        "the waiting result is counted: {:?}",
        s.frames
    );
}

/// A live camera that delivers `before` frames, goes silent for `silence`, then delivers
/// `after` more and ends.
struct StallingCamera {
    inner: SyntheticSource,
    n: u64,
    before: u64,
    silence: Duration,
    total: u64,
}

impl reddino_edge::capture::FrameSource for StallingCamera {
    fn next_frame(
        &mut self,
    ) -> Result<Option<reddino_edge::capture::Frame>, reddino_edge::capture::CaptureError> {
        if self.n == self.total {
            return Ok(None);
        }
        if self.n == self.before {
            std::thread::sleep(self.silence);
        }
        self.n += 1;
        std::thread::sleep(Duration::from_millis(20));
        self.inner.next_frame()
    }
    fn is_live(&self) -> bool {
        true
    }
}

#[test]
fn a_stalled_camera_shows_in_status_and_clears_when_frames_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = pixel_shared(
        PipelineSettings {
            camera_stall: Duration::from_millis(300),
            ..settings()
        },
        Outbox::open(&tmp.path().join("o.db"), OutboxLimits::default()).unwrap(),
    );
    let camera = StallingCamera {
        inner: SyntheticSource::new(
            vec![SourcePreset::by_name("mgg_100x").unwrap()],
            160,
            120,
            3,
            None,
        ),
        n: 0,
        before: 3,
        silence: Duration::from_millis(1500),
        total: 13,
    };
    let pipeline = Pipeline::start(
        shared.clone(),
        Box::new(camera),
        Box::new(PixelBackend {
            calls: Arc::new(Mutex::new(Vec::new())),
        }),
    );
    let (mut saw_stall, mut cleared_after) = (None, false);
    while !shared.pipeline_idle() {
        let s = shared.status("online");
        match (&s.camera_error, &saw_stall) {
            (Some(e), None) => saw_stall = Some(e.clone()),
            // Cleared while the camera still delivers (not by the source's end).
            (None, Some(_)) if (4..13).contains(&s.frames.captured) => cleared_after = true,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    pipeline.join();
    let e = saw_stall.expect("the stall never showed in status");
    assert!(e.contains("no frame from the camera"), "{e}");
    assert!(
        cleared_after,
        "the stall did not clear when frames came back"
    );
    assert_eq!(shared.snapshot().frames.captured, 13);
    // The source ended: its silence now is not a stall.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(shared.status("online").camera_error, None);
}

/// A live camera that delivers 3 frames, then fails like an unplugged camera for `failures`
/// reads, then delivers 3 more and ends.
struct UnpluggedCamera {
    inner: SyntheticSource,
    reads: u64,
    failures: u64,
}

impl reddino_edge::capture::FrameSource for UnpluggedCamera {
    fn next_frame(
        &mut self,
    ) -> Result<Option<reddino_edge::capture::Frame>, reddino_edge::capture::CaptureError> {
        self.reads += 1;
        std::thread::sleep(Duration::from_millis(10));
        match self.reads {
            r if r <= 3 => self.inner.next_frame(),
            r if r <= 3 + self.failures => Err(reddino_edge::capture::CaptureError::Camera {
                device: "/dev/video0".into(),
                msg: "cannot open: No such device".into(),
            }),
            r if r <= 6 + self.failures => self.inner.next_frame(),
            _ => Ok(None),
        }
    }
    fn is_live(&self) -> bool {
        true
    }
}

#[test]
fn a_camera_that_disappears_is_retried_reported_and_used_again_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = pixel_shared(
        settings(),
        Outbox::open(&tmp.path().join("o.db"), OutboxLimits::default()).unwrap(),
    );
    let camera = UnpluggedCamera {
        inner: SyntheticSource::new(
            vec![SourcePreset::by_name("mgg_100x").unwrap()],
            160,
            120,
            4,
            None,
        ),
        reads: 0,
        failures: 6,
    };
    let pipeline = Pipeline::start(
        shared.clone(),
        Box::new(camera),
        Box::new(PixelBackend {
            calls: Arc::new(Mutex::new(Vec::new())),
        }),
    );
    let mut reported = None;
    while !shared.pipeline_idle() {
        if let Some(e) = shared.status("online").camera_error {
            reported.get_or_insert(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    pipeline.join();
    let e = reported.expect("the unplugged camera never showed in status");
    assert!(
        e.contains("/dev/video0") && e.contains("No such device"),
        "{e}"
    );
    let s = shared.snapshot();
    assert_eq!(s.frames.captured, 6, "frames before and after the outage");
    assert_eq!(s.frames.processed, 6);
    assert_eq!(s.frames.bad, 0, "a device failure is not a bad frame");
    assert_eq!(
        shared.status("online").camera_error,
        None,
        "cleared once frames came back"
    );
}
