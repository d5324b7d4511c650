//! Flow control: when inference falls behind a live source, the oldest frames are dropped and
//! counted, the frame queue never grows past its capacity, and every frame is accounted for.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use reddino_edge::capture::{Paced, SyntheticSource};
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
        },
        ModelInfo {
            id: "slow@1".into(),
            sha256: "0".repeat(64),
            backend: "slow".into(),
            provider: "cpu".into(),
            backend_detail: "slow test backend".into(),
            class_names: names,
            normalization: Normalization::default(),
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
