//! Switching models while the service runs: a watcher follows the model store's `active`
//! pointer (moved by `reddino-edge model activate|rollback`, the inbox, or an MQTT command),
//! verifies and loads the version it names, and hands it to the pipeline, which serves it from
//! the next frame cut on (no frame lost, none classified by a mix). A health check then judges
//! the new version on its first [`HEALTH_FRAMES`] frames against the previous model's recent
//! ones; a version that fails it, or that cannot be loaded, is rolled back in the store (the
//! watcher then switches back), and each switch and rollback is published as a `model` event.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use reddino_models::bundle::Bundle;
use reddino_models::preprocess::CropPolicy;

use crate::cells::CellFinderConfig;
use crate::classify::{Counts, SizeInput};
use crate::config::Config;
use crate::error::Result;
use crate::infer::Backend;
use crate::model::manifest_sha256;
use crate::model::open_bundle;
use crate::model::store::Store;
use crate::pipeline::{ModelControl, Shared, HEALTH_WINDOW};
use crate::pipeline::{ModelInfo, Served};

/// How often the watcher reads the store's `active` pointer.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(300);
/// Frames a newly switched version analyses before its health is judged.
pub const HEALTH_FRAMES: usize = 20;

/// Why a version's first frames look wrong next to the previous model's, if they do: a class
/// jumping to near all of the cells (>= 90% where it had under 50%), or the uncertain share
/// tripling (and reaching 10%). `names` are the new model's classes; the previous model's
/// counts are compared by class name.
pub fn unhealthy(
    before: &Counts,
    before_names: &[String],
    after: &Counts,
    names: &[String],
) -> Option<String> {
    let (nb, na) = (before.total(), after.total());
    if nb == 0 || na == 0 {
        return None;
    }
    let share = |k: u64, n: u64| k as f64 / n as f64;
    for (i, name) in names.iter().enumerate() {
        let now = share(after.per_class.get(i).copied().unwrap_or(0), na);
        let was = before_names
            .iter()
            .position(|n| n == name)
            .map(|j| share(before.per_class.get(j).copied().unwrap_or(0), nb))
            .unwrap_or(0.0);
        if now >= 0.9 && was < 0.5 {
            return Some(format!(
                "class {name} took {:.0}% of the cells (the previous model gave it {:.0}%)",
                now * 100.0,
                was * 100.0
            ));
        }
    }
    let (u_now, u_was) = (share(after.uncertain, na), share(before.uncertain, nb));
    if u_now >= 0.1 && u_now >= 3.0 * u_was {
        return Some(format!(
            "{:.0}% of the cells uncertain (the previous model: {:.0}%)",
            u_now * 100.0,
            u_was * 100.0
        ));
    }
    None
}

/// The `model/activate` and `model/rollback` commands: they move the store's pointer; the
/// watcher does the switch.
pub struct StoreControl {
    pub root: PathBuf,
    pub keys: Vec<PathBuf>,
}

impl ModelControl for StoreControl {
    fn activate(&self, version: &str) -> Result<(), String> {
        let store = Store::open(&self.root).map_err(|e| e.to_string())?;
        store
            .activate(version, &self.keys)
            .map_err(|e| e.to_string())
    }

    fn rollback(&self) -> Result<String, String> {
        let store = Store::open(&self.root).map_err(|e| e.to_string())?;
        store.rollback(&self.keys).map_err(|e| e.to_string())
    }
}

/// What the pipeline needs to know of a model: its identity and classes, the cell finder
/// its manifest names (at the config's analysis mode), and its crop policy.
pub fn describe(
    cfg: &Config,
    bundle: &Bundle,
    backend: &dyn Backend,
) -> Result<(ModelInfo, CellFinderConfig, CropPolicy)> {
    let m = bundle.manifest();
    let cells = CellFinderConfig {
        mode: cfg.analysis.mode,
        tile: backend.input_size() as u32,
        ..CellFinderConfig::for_device(m, cfg.analysis.um_per_px)?
    };
    let info = ModelInfo {
        id: format!("{}@{}", m.name, m.version),
        sha256: manifest_sha256(bundle.dir())?,
        backend: backend.name().into(),
        provider: backend.provider().into(),
        backend_detail: backend.describe(),
        class_names: m.class_names.clone(),
        normalization: m.normalization(),
        input_size: backend.input_size() as u32,
        size: SizeInput::of(m, cfg.analysis.um_per_px),
    };
    let crop = m.crop_policy(cfg.analysis.margin);
    if crop.margin != cfg.analysis.margin {
        log::info!(
            "{} cuts cells at {} times their box, the margin it was trained at (its manifest's \
             crop_margin), not at analysis.margin {}",
            info.id,
            crop.margin,
            cfg.analysis.margin
        );
    }
    Ok((info, cells, crop))
}

/// A verified bundle, ready to be switched to: its backend built and warmed by the self-test.
pub fn served(cfg: &Config, bundle: &Bundle) -> Result<Served> {
    let backend = crate::infer::open(&cfg.backend_spec(), bundle)?;
    let (info, cells, crop) = describe(cfg, bundle, backend.as_ref())?;
    Ok(Served::new(info, cells, crop, Some(backend)))
}

/// A switch whose health is still to be judged.
struct Pending {
    /// The new model's `name@version`, its class names.
    id: String,
    names: Vec<String>,
    /// The previous model's recent counts and classes.
    before: Counts,
    before_names: Vec<String>,
    slot: String,
    since: Instant,
}

/// Starts the watcher; it ends when the service stops. `serving` is the store slot served now
/// (`None`: the config's bundle).
pub fn spawn_watcher(cfg: Config, shared: Arc<Shared>, serving: Option<String>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("model-watch".into())
        .spawn(move || watch(&cfg, &shared, serving))
        .expect("cannot start the model watcher")
}

fn watch(cfg: &Config, sh: &Shared, mut serving: Option<String>) {
    let keys: &[PathBuf] = &cfg.model.trusted_keys;
    let mut pending: Option<Pending> = None;
    // The version a rollback pointed the store back at: switching to it is not judged again.
    let mut returning: Option<Option<String>> = None;
    while !sh.stopping() && !sh.pipeline_done.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(WATCH_INTERVAL);
        let Some(store) = Store::existing(&cfg.model_store()) else {
            continue;
        };
        let active = match store.active() {
            Ok(a) => a,
            Err(e) => {
                log::error!("model store: {e}");
                continue;
            }
        };
        if active != serving {
            pending = None;
            let old = sh.model();
            match switch_to(cfg, sh, &store, active.as_deref()) {
                Ok(()) => {
                    let from = slot_name(&serving);
                    let to = slot_name(&active);
                    serving = active.clone();
                    if returning.take() == Some(active) {
                        log::info!("back on {to}");
                        continue;
                    }
                    event(
                        sh,
                        "activated",
                        &from,
                        &to,
                        "the store's active version changed",
                    );
                    let now = sh.model();
                    let (before, _) = sh.recent_counts(&old.info.id, HEALTH_WINDOW);
                    pending = Some(Pending {
                        id: now.info.id.clone(),
                        names: now.info.class_names.clone(),
                        before,
                        before_names: old.info.class_names.clone(),
                        slot: to,
                        since: Instant::now(),
                    });
                }
                Err(reason) => {
                    let from = slot_name(&active);
                    log::error!("cannot switch to {from}: {reason}");
                    // Serving is unchanged; the store is pointed back at what was active
                    // before (normally what is served).
                    give_up(sh, &store, keys, &from, &reason);
                }
            }
            continue;
        }
        if let Some(p) = &pending {
            let (after, frames) = sh.recent_counts(&p.id, HEALTH_FRAMES);
            if frames < HEALTH_FRAMES {
                continue;
            }
            match unhealthy(&p.before, &p.before_names, &after, &p.names) {
                Some(reason) => {
                    log::error!("model {} failed its health check: {reason}", p.id);
                    if let Some(to) = give_up(sh, &store, keys, &p.slot, &reason) {
                        returning = Some(to);
                    }
                }
                None => log::info!(
                    "model {} healthy after {frames} frames ({:.1} s)",
                    p.id,
                    p.since.elapsed().as_secs_f64()
                ),
            }
            pending = None;
        }
    }
}

/// Loads and verifies the version `active` names (the config's bundle for `None`) and hands
/// it to the pipeline.
fn switch_to(cfg: &Config, sh: &Shared, store: &Store, active: Option<&str>) -> Result<(), String> {
    let path = match active {
        Some(id) => store.slot(id),
        None => cfg.model.bundle.clone(),
    };
    let bundle = open_bundle(&path, &cfg.model.trusted_keys).map_err(|e| e.to_string())?;
    let next = served(cfg, &bundle).map_err(|e| e.to_string())?;
    if next.info.class_names != sh.model().info.class_names && sh.session_active() {
        return Err(format!(
            "{} has other classes than {} and a session is running: stop it first",
            next.info.id,
            sh.model().info.id
        ));
    }
    sh.switch_model(next);
    Ok(())
}

/// Rolls the store back from `from` (to the previous version, or to the config's bundle when
/// there is none), publishes why, and returns the store's active version now.
fn give_up(
    sh: &Shared,
    store: &Store,
    keys: &[PathBuf],
    from: &str,
    reason: &str,
) -> Option<Option<String>> {
    let to = match store.previous() {
        Ok(Some(_)) => store.rollback(keys).map(Some),
        _ => store.deactivate().map(|()| None),
    };
    match to {
        Ok(to) => {
            event(sh, "rollback", from, &slot_name(&to), reason);
            Some(to)
        }
        Err(e) => {
            log::error!("cannot roll back from {from}: {e}");
            None
        }
    }
}

/// A store slot's id, or `config` for the config's bundle.
fn slot_name(slot: &Option<String>) -> String {
    slot.clone().unwrap_or_else(|| "config".into())
}

fn event(sh: &Shared, what: &str, from: &str, to: &str, reason: &str) {
    match sh.model_event(what, from, to, reason) {
        Ok(seq) => log::info!("model event {what}: {from} -> {to} (seq {seq}): {reason}"),
        Err(e) => log::error!("cannot store the model event {what} {from} -> {to}: {e}"),
    }
}
