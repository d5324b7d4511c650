//! Wiring for `reddino-edge run`: config -> outbox, verified bundle, backend, frame source,
//! pipeline and publisher; runs until the source ends or a stop is requested, then drains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reddino_models::bundle::Bundle;

use crate::capture::{build_source, FrameSource};
use crate::config::Config;
use crate::error::Result;
use crate::infer::Backend;
use crate::model::open_bundle;
use crate::model::store::{StartCheck, Store};
use crate::pipeline::{CommandError, Pipeline, PipelineSettings, Shared, Snapshot};
use crate::publish::mqtt::{spawn_publisher, MqttSettings, PublisherReport};
use crate::publish::outbox::Outbox;

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub snapshot: Snapshot,
    pub publisher: PublisherReport,
}

/// The parts of a running service, for callers that watch it (the demo's live view).
pub struct Service {
    pub shared: Arc<Shared>,
    pipeline: Option<Pipeline>,
    publisher: Option<std::thread::JoinHandle<PublisherReport>>,
}

impl Service {
    /// Starts everything. Nothing is started if the outbox cannot be opened.
    pub fn start(
        cfg: &Config,
        bundle: &Bundle,
        backend: Box<dyn Backend>,
        source: Box<dyn FrameSource>,
        stop: Arc<AtomicBool>,
        initial_session: Option<&str>,
    ) -> Result<Service> {
        let outbox = Outbox::open(&cfg.outbox.path, cfg.outbox.limits())?;
        let mqtt = MqttSettings::from_config(&cfg.mqtt, cfg.client_id())?;
        let (model, cells, crop) = crate::switch::describe(cfg, bundle, backend.as_ref())?;
        let settings = PipelineSettings {
            device_id: cfg.device_id.clone(),
            topic_prefix: cfg.mqtt.topic_prefix.clone(),
            cells,
            crop,
            min_confidence: cfg.model.min_confidence,
            frame_queue: cfg.pipeline.frame_queue,
            crop_queue: cfg.pipeline.crop_queue,
            camera_retry_max: Duration::from_secs_f64(cfg.camera.retry_max_s),
            batch_wait: Duration::from_millis(cfg.pipeline.batch_wait_ms),
            camera_stall: Duration::from_secs_f64(cfg.camera.stall_s),
            cpu_threads: cfg.analysis.threads,
            frame_workers: 0,
        };
        {
            let ob = &outbox;
            let pending = ob.len()?;
            if pending > 0 {
                log::info!(
                    "outbox {}: {pending} results from before are sent first",
                    ob.path().display()
                );
            }
        }
        let shared = Shared::new(settings, model, outbox, stop);
        log::info!(
            "device {}: {} on {}; publishing to {}:{}",
            cfg.device_id,
            shared.model().info.id,
            shared.model().info.backend,
            cfg.mqtt.host,
            cfg.mqtt.port
        );
        // A session a crash or power cut left open: resumed, or closed with its summary.
        shared.resume_session()?;
        if let Some(name) = initial_session {
            shared.start_session(Some(name))?;
        }
        let publisher = spawn_publisher(shared.link(), mqtt);
        let pipeline = Pipeline::start(shared.clone(), source, backend);
        Ok(Service {
            shared,
            pipeline: Some(pipeline),
            publisher: Some(publisher),
        })
    }

    /// Whether the pipeline threads are still working (source not ended, no stop).
    pub fn pipeline_running(&self) -> bool {
        !self.shared.pipeline_idle()
    }

    /// Waits for the pipeline, stores the summary of an active session, lets the publisher
    /// drain the outbox and stop.
    pub fn finish(mut self) -> RunReport {
        if let Some(p) = self.pipeline.take() {
            p.join();
        }
        // Frames have stopped; what is left is draining the outbox.
        self.shared.supervisor.stopping();
        match self.shared.stop_session() {
            Ok(seq) => log::info!("active session closed at shutdown (summary seq {seq})"),
            Err(CommandError::NoSession) => {}
            Err(e) => log::error!("{e}"),
        }
        self.shared.pipeline_done.store(true, Ordering::SeqCst);
        self.shared.notify.notify_one();
        let publisher = self
            .publisher
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        RunReport {
            snapshot: self.shared.snapshot(),
            publisher,
        }
    }
}

/// `reddino-edge run --config FILE`: loads the config, stops on SIGTERM or SIGINT, runs, and
/// logs what was done.
pub fn command(config: &std::path::Path) -> Result<()> {
    let cfg = Config::load(config)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| crate::error::Error::Failed(format!("cannot handle signal {sig}: {e}")))?;
    }
    let report = run(&cfg, stop)?;
    let f = &report.snapshot.frames;
    log::info!(
        "stopped: {} frames analysed, {} cells, {} dropped, {} bad; {} results acknowledged, {} left in the outbox",
        f.processed,
        f.cells,
        f.dropped,
        f.bad,
        report.publisher.acked,
        report.publisher.left_in_outbox
    );
    Ok(())
}

/// The model a run serves: the store's active version (or, when it cannot run, the previous
/// one), else the config's `model.bundle`.
pub fn open_model(cfg: &Config) -> Result<Bundle> {
    Ok(open_served(cfg)?.0)
}

/// An installed version being served, and what its start did.
struct FromStore {
    store: Store,
    id: String,
    check: Option<StartCheck>,
}

/// [`open_model`], with the store's crash-loop check counted for this start.
fn open_served(cfg: &Config) -> Result<(Bundle, Option<FromStore>)> {
    if let Some(store) = Store::existing(&cfg.model_store()) {
        let check = store.note_start(&cfg.model.trusted_keys)?;
        if let Some((id, bundle)) = store.runnable(&cfg.model.trusted_keys)? {
            log::info!("serving installed model {id}");
            return Ok((bundle, Some(FromStore { store, id, check })));
        }
    }
    Ok((
        open_bundle(&cfg.model.bundle, &cfg.model.trusted_keys)?,
        None,
    ))
}

/// `reddino-edge run`: everything from a config, until the source ends or `stop` is set.
pub fn run(cfg: &Config, stop: Arc<AtomicBool>) -> Result<RunReport> {
    let (bundle, served) = open_served(cfg)?;
    let backend = crate::infer::open(&cfg.backend_spec(), &bundle)?;
    log::info!("inference: {}", backend.describe());
    let source = build_source(&cfg.camera)?;
    let svc = Service::start(cfg, &bundle, backend, source, stop, None)?;
    svc.shared
        .set_model_control(Arc::new(crate::switch::StoreControl {
            root: cfg.model_store(),
            keys: cfg.model.trusted_keys.clone(),
        }));
    let watcher = crate::switch::spawn_watcher(
        cfg.clone(),
        svc.shared.clone(),
        served.as_ref().map(|s| s.id.clone()),
    );
    if let Some(FromStore { store, id, check }) = served {
        if let Some(StartCheck::RolledBack { from, to, starts }) = check {
            svc.shared.model_event(
                "rollback",
                &from,
                &to,
                &format!("{from} started {starts} times without analysing a frame"),
            )?;
        }
        // A version that analyses a frame is healthy: its start count is cleared.
        svc.shared.supervisor.on_first_frame(move || {
            if let Err(e) = store.note_healthy(&id) {
                log::error!("cannot record that {id} is healthy: {e}");
            }
        });
    }
    let report = svc.finish();
    if watcher.join().is_err() {
        log::error!("the model watcher panicked");
    }
    Ok(report)
}
