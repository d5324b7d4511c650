//! The installed model versions of a device (`reddino-edge model ...`): each verified bundle
//! in its own slot, and which one is active and which came before it.
//!
//! ```text
//! STORE/slots/{name}-{version}/   a verified copy of the bundle's files (never changed)
//! STORE/active                    the active slot's id, one line
//! STORE/previous                  the slot that was active before it
//! ```
//!
//! Installing verifies the bundle (trusted keys, signature, every hash, the graph, the
//! self-test), copies the verified files into a hidden staging folder, verifies the copy again
//! and only then renames it into place; activating verifies the slot again before it points
//! `active` at it. Pointers are replaced by writing a new file, syncing it and renaming it over
//! the old one, then syncing the folder, so a power cut or a kill at any moment leaves either
//! the old pointer or the new one, never a torn one, and never a pointer to a half-copied slot.
//! A failure at any step leaves the active model as it was. The previous version is kept (it
//! cannot be removed) until another one is active.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use reddino_models::bundle::{self, Bundle};

use crate::error::{Error, Result};
use crate::infer::BackendKind;

use super::{manifest_sha256, open_bundle, sha256_hex};

const SLOTS: &str = "slots";
const ACTIVE: &str = "active";
const PREVIOUS: &str = "previous";
/// `ID N`: starts of the active version that have not yet analysed a frame.
const STARTS: &str = "starts";

/// Starts of an activated version that end before its first analysed frame after which the
/// previous version comes back by itself (a crash loop).
pub const CRASH_LOOP_STARTS: u32 = 3;

/// What [`Store::note_start`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum StartCheck {
    /// Serve the active version (this is its `n`th start without a frame analysed yet).
    Serve { id: String, n: u32 },
    /// The active version crash-looped: the previous one is active again.
    RolledBack {
        from: String,
        to: String,
        starts: u32,
    },
}
/// Staging folders start with this; `Store::open` sweeps what a killed install left.
const STAGING: &str = ".staging-";

/// One installed version, as `model list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    /// The slot's id: `{name}-{version}`.
    pub id: String,
    pub name: String,
    pub version: String,
    /// sha256 of the signed manifest, which names every file's hash: it identifies the model.
    pub sha256: String,
    pub active: bool,
    pub previous: bool,
}

/// A device's model store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store at `root`, created if missing; staging left by an interrupted install is
    /// removed.
    pub fn open(root: &Path) -> Result<Store> {
        let slots = root.join(SLOTS);
        fs::create_dir_all(&slots).map_err(|e| Error::file("creating", &slots, e))?;
        for entry in fs::read_dir(&slots).map_err(|e| Error::file("reading", &slots, e))? {
            let entry = entry.map_err(|e| Error::file("reading", &slots, e))?;
            if entry.file_name().to_string_lossy().starts_with(STAGING) {
                let p = entry.path();
                log::warn!("removing {} left by an interrupted install", p.display());
                fs::remove_dir_all(&p).map_err(|e| Error::file("removing", &p, e))?;
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The store at `root` if one was ever created there, without creating anything.
    pub fn existing(root: &Path) -> Option<Store> {
        root.join(SLOTS).is_dir().then(|| Store {
            root: root.to_path_buf(),
        })
    }

    /// Where a slot's files are.
    pub fn slot(&self, id: &str) -> PathBuf {
        self.root.join(SLOTS).join(id)
    }

    /// The active slot's id, if one was activated.
    pub fn active(&self) -> Result<Option<String>> {
        self.pointer(ACTIVE)
    }

    /// The slot that was active before the active one.
    pub fn previous(&self) -> Result<Option<String>> {
        self.pointer(PREVIOUS)
    }

    /// Verifies `bundle` against `keys` (signature, hashes, graph, self-test) and installs it
    /// in its own slot; returns the slot's id. Installing the same model twice is a no-op;
    /// another model under an installed name and version is refused.
    pub fn install(&self, bundle: &Path, keys: &[PathBuf]) -> Result<String> {
        let verified = open_bundle(bundle, keys)?;
        let id = slot_id(&verified)?;
        let sha = manifest_sha256(verified.dir())?;
        let dest = self.slot(&id);
        if dest.exists() {
            let have = manifest_sha256(&dest)?;
            if have == sha {
                log::info!("{id} is already installed");
                return Ok(id);
            }
            return Err(Error::Usage(format!(
                "{id} is already installed with other contents (manifest sha256 {have}, this \
                 bundle's {sha}): give the new model another version, or remove {id} first"
            )));
        }
        let staging = self.root.join(SLOTS).join(format!("{STAGING}{id}"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| Error::file("removing", &staging, e))?;
        }
        fs::create_dir(&staging).map_err(|e| Error::file("creating", &staging, e))?;
        let copied = copy_bundle_files(&verified, &staging).and_then(|()| {
            // The copy is what will run: verify it, not only its source.
            open_bundle(&staging, keys)?;
            sync_dir(&staging)
        });
        if let Err(e) = copied {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        fs::rename(&staging, &dest).map_err(|e| Error::file("installing", &dest, e))?;
        sync_dir(&self.root.join(SLOTS))?;
        log::info!("installed {id} (manifest sha256 {sha})");
        Ok(id)
    }

    /// Verifies the installed slot `id` again and makes it the active model; the one active
    /// before becomes `previous`.
    pub fn activate(&self, id: &str, keys: &[PathBuf]) -> Result<()> {
        let slot = self.installed_slot(id)?;
        open_bundle(&slot, keys)?;
        let active = self.active()?;
        if active.as_deref() == Some(id) {
            log::info!("{id} is already active");
            return Ok(());
        }
        // `previous` first: a kill between the two writes leaves the old model active with
        // the right fallback, never an active model without one.
        if let Some(old) = &active {
            self.set_pointer(PREVIOUS, old)?;
        }
        self.set_pointer(ACTIVE, id)?;
        log::info!("activated {id}");
        Ok(())
    }

    /// Makes the previous version active again (after verifying it); the one rolled back from
    /// becomes `previous`. Returns the id now active.
    pub fn rollback(&self, keys: &[PathBuf]) -> Result<String> {
        let prev = self
            .previous()?
            .ok_or_else(|| Error::Usage("no previous model version to roll back to".into()))?;
        let slot = self.installed_slot(&prev)?;
        open_bundle(&slot, keys)?;
        let active = self.active()?;
        self.set_pointer(ACTIVE, &prev)?;
        match active {
            Some(a) if a != prev => self.set_pointer(PREVIOUS, &a)?,
            _ => {}
        }
        log::info!("rolled back to {prev}");
        Ok(prev)
    }

    /// No version active any more: `run` serves the config's bundle (a rollback with no
    /// previous version to go back to). `previous` is kept.
    pub fn deactivate(&self) -> Result<()> {
        let p = self.root.join(ACTIVE);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::file("removing", &p, e)),
        }
    }

    /// Removes an installed version that is neither active nor the previous one.
    pub fn remove(&self, id: &str) -> Result<()> {
        let slot = self.installed_slot(id)?;
        if self.active()?.as_deref() == Some(id) {
            return Err(Error::Usage(format!(
                "{id} is the active model: activate another version first"
            )));
        }
        if self.previous()?.as_deref() == Some(id) {
            return Err(Error::Usage(format!(
                "{id} is the previous model, kept for a rollback until another version is active"
            )));
        }
        // Renamed out of the slots first, so a kill mid-removal leaves staging to sweep and
        // never a half-removed slot that looks installed.
        let doomed = self.root.join(SLOTS).join(format!("{STAGING}removed-{id}"));
        fs::rename(&slot, &doomed).map_err(|e| Error::file("removing", &slot, e))?;
        sync_dir(&self.root.join(SLOTS))?;
        fs::remove_dir_all(&doomed).map_err(|e| Error::file("removing", &doomed, e))?;
        log::info!("removed {id}");
        Ok(())
    }

    /// Every installed version, by id.
    pub fn list(&self) -> Result<Vec<Installed>> {
        let (active, previous) = (self.active()?, self.previous()?);
        let slots = self.root.join(SLOTS);
        let mut out = Vec::new();
        for entry in fs::read_dir(&slots).map_err(|e| Error::file("reading", &slots, e))? {
            let entry = entry.map_err(|e| Error::file("reading", &slots, e))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with(STAGING) {
                continue;
            }
            let manifest_path = entry.path().join(bundle::MANIFEST);
            let text =
                fs::read(&manifest_path).map_err(|e| Error::file("reading", &manifest_path, e))?;
            let m: bundle::Manifest = serde_json::from_slice(&text).map_err(|e| {
                Error::Failed(format!("{}: not a manifest: {e}", manifest_path.display()))
            })?;
            out.push(Installed {
                active: active.as_deref() == Some(id.as_str()),
                previous: previous.as_deref() == Some(id.as_str()),
                sha256: sha256_hex(&text),
                name: m.name,
                version: m.version,
                id,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Called by `run` before it opens the active version: counts this start, and when the
    /// active version has started [`CRASH_LOOP_STARTS`] times without analysing a frame and a
    /// previous version is installed, activates the previous one instead. `None` when no
    /// version is active.
    pub fn note_start(&self, keys: &[PathBuf]) -> Result<Option<StartCheck>> {
        let Some(active) = self.active()? else {
            return Ok(None);
        };
        let starts = match self.read_starts()? {
            Some((id, n)) if id == active => n,
            _ => 0,
        };
        if starts >= CRASH_LOOP_STARTS {
            if let Some(prev) = self.previous()? {
                let to = self.rollback(keys)?;
                debug_assert_eq!(to, prev);
                self.set_pointer(STARTS, &format!("{to} 1"))?;
                log::error!(
                    "model {active} started {starts} times without analysing a frame: rolled back to {to}"
                );
                return Ok(Some(StartCheck::RolledBack {
                    from: active,
                    to,
                    starts,
                }));
            }
        }
        self.set_pointer(STARTS, &format!("{active} {}", starts + 1))?;
        Ok(Some(StartCheck::Serve {
            id: active,
            n: starts + 1,
        }))
    }

    /// The active version analysed a frame: it is healthy, its start count is cleared.
    pub fn note_healthy(&self, id: &str) -> Result<()> {
        if matches!(self.read_starts()?, Some((ref a, n)) if a == id && n > 0) {
            self.set_pointer(STARTS, &format!("{id} 0"))?;
        }
        Ok(())
    }

    fn read_starts(&self) -> Result<Option<(String, u32)>> {
        let p = self.root.join(STARTS);
        match fs::read_to_string(&p) {
            Ok(s) => {
                let mut it = s.split_whitespace();
                match (it.next(), it.next().and_then(|n| n.parse().ok())) {
                    (Some(id), Some(n)) => Ok(Some((id.to_string(), n))),
                    // A torn or foreign file counts as no record.
                    _ => Ok(None),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::file("reading", &p, e)),
        }
    }

    /// The model `run` should open: the active slot if it verifies, else the previous one if
    /// it does, else `None` (the config's bundle). Each refusal is logged with its reason.
    pub fn runnable(&self, keys: &[PathBuf]) -> Result<Option<(String, Bundle)>> {
        for id in [self.active()?, self.previous()?].into_iter().flatten() {
            match self.installed_slot(&id).and_then(|p| open_bundle(&p, keys)) {
                Ok(b) => return Ok(Some((id, b))),
                Err(e) => log::error!("installed model {id} cannot run: {e}"),
            }
        }
        Ok(None)
    }

    /// Installs and activates each bundle in the inbox `dir` (a `.tar` or a bundle folder; names
    /// starting with `.` are still being copied in and are skipped), in name order; writes
    /// NAME.result.json beside each and moves it to `dir/done`. Returns each bundle's outcome;
    /// a refused bundle leaves the active model as it was.
    pub fn inbox(&self, dir: &Path, keys: &[PathBuf]) -> Result<Vec<(String, Result<String>)>> {
        let done = dir.join("done");
        fs::create_dir_all(&done).map_err(|e| Error::file("creating", &done, e))?;
        let mut names: Vec<String> = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| Error::file("reading", dir, e))? {
            let entry = entry.map_err(|e| Error::file("reading", dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let p = entry.path();
            let is_bundle = if p.is_dir() {
                p.join(bundle::MANIFEST).is_file()
            } else {
                name.ends_with(".tar")
            };
            if is_bundle && !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let p = dir.join(&name);
            let outcome = self.install(&p, keys).and_then(|id| {
                self.activate(&id, keys)?;
                Ok(id)
            });
            let record = match &outcome {
                Ok(id) => serde_json::json!({"bundle": name, "ok": true, "active": id}),
                Err(e) => serde_json::json!({"bundle": name, "ok": false, "error": e.to_string()}),
            };
            match &outcome {
                Ok(id) => log::info!("inbox: {name} installed and activated as {id}"),
                Err(e) => log::error!("inbox: {name} refused: {e}"),
            }
            let result = dir.join(format!("{name}.result.json"));
            let tmp = dir.join(format!(".{name}.result.json"));
            fs::write(&tmp, format!("{record:#}\n"))
                .and_then(|()| fs::rename(&tmp, &result))
                .map_err(|e| Error::file("writing", &result, e))?;
            let moved = done.join(&name);
            if moved.exists() {
                let _ = if moved.is_dir() {
                    fs::remove_dir_all(&moved)
                } else {
                    fs::remove_file(&moved)
                };
            }
            fs::rename(&p, &moved).map_err(|e| Error::file("moving", &p, e))?;
            out.push((name, outcome));
        }
        Ok(out)
    }

    fn installed_slot(&self, id: &str) -> Result<PathBuf> {
        if !valid_slot_id(id) {
            return Err(Error::Usage(format!("{id:?} is not a model version id")));
        }
        let slot = self.slot(id);
        if !slot.is_dir() {
            let known: Vec<String> = self.list()?.into_iter().map(|i| i.id).collect();
            return Err(Error::Usage(format!(
                "{id} is not installed (installed: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(slot)
    }

    fn pointer(&self, name: &str) -> Result<Option<String>> {
        let p = self.root.join(name);
        match fs::read_to_string(&p) {
            Ok(s) => {
                let id = s.trim();
                if !valid_slot_id(id) {
                    return Err(Error::Failed(format!(
                        "{} holds {id:?}, not a model version id",
                        p.display()
                    )));
                }
                Ok(Some(id.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::file("reading", &p, e)),
        }
    }

    /// Replaces pointer `name` atomically: a new file written and synced, renamed over the
    /// old one, the folder synced.
    fn set_pointer(&self, name: &str, id: &str) -> Result<()> {
        let tmp = self.root.join(format!(".{name}.new"));
        let dest = self.root.join(name);
        let mut f = fs::File::create(&tmp).map_err(|e| Error::file("writing", &tmp, e))?;
        f.write_all(format!("{id}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::file("writing", &tmp, e))?;
        fs::rename(&tmp, &dest).map_err(|e| Error::file("writing", &dest, e))?;
        sync_dir(&self.root)
    }
}

/// `{name}-{version}` of a verified bundle, refused when it could not be a folder name.
fn slot_id(b: &Bundle) -> Result<String> {
    let m = b.manifest();
    let id = format!("{}-{}", m.name, m.version);
    if valid_slot_id(&id) {
        Ok(id)
    } else {
        Err(Error::Usage(format!(
            "model name {:?} and version {:?} cannot name a slot: letters, digits, `.`, `-`, `_` only",
            m.name, m.version
        )))
    }
}

fn valid_slot_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The manifest, its signature and every file it lists, copied from a verified bundle's
/// folder into `dest`, each synced.
fn copy_bundle_files(b: &Bundle, dest: &Path) -> Result<()> {
    let names = [bundle::MANIFEST, bundle::SIGNATURE]
        .into_iter()
        .map(str::to_string)
        .chain(b.manifest().files.keys().cloned());
    for name in names {
        let from = b.dir().join(&name);
        let to = dest.join(&name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::file("creating", parent, e))?;
        }
        fs::copy(&from, &to).map_err(|e| Error::file("copying", &from, e))?;
        fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::file("syncing", &to, e))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::file("syncing", dir, e))
}

/// `reddino-edge model`: the arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The device's config: its trusted keys and its store (`model.store`, or `models` beside
    /// the outbox).
    #[arg(long)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub action: ModelAction,
}

/// What `reddino-edge model` does.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ModelAction {
    /// Verify a bundle (signature against the config's trusted keys, every hash, the graph,
    /// the self-test) and install it in its own slot; the active model is left as it is
    /// unless --activate.
    Install {
        bundle: PathBuf,
        /// Activate it once installed.
        #[arg(long)]
        activate: bool,
    },
    /// The installed versions, the active and previous ones marked.
    List,
    /// Verify an installed version again and make it the active model.
    Activate { version: String },
    /// Make the previous version active again.
    Rollback,
    /// Verify a bundle as install would, without installing it.
    Verify { bundle: PathBuf },
    /// Remove an installed version (never the active or the previous one).
    Remove { version: String },
    /// Open an installed version (default: the active one) with the configured backend, as
    /// the service will: with ONNX Runtime and TensorRT this builds its engines into the state
    /// directory's cache (minutes on a Jetson), so that the service loads them at start.
    /// `install` and `inbox` run it after installing when the backend is onnxruntime.
    Compile { version: Option<String> },
    /// Install and activate every bundle dropped in DIR (default: `inbox` beside the outbox;
    /// the systemd path unit runs this when the folder changes): each gets NAME.result.json
    /// beside it, saying what was done or why it was refused, and moves to DIR/done. Names
    /// starting with `.` are skipped: copy a bundle in under such a name, then rename it.
    Inbox { dir: Option<PathBuf> },
}

/// Runs `reddino-edge model ...`; what it did is printed on stdout.
pub fn command(args: &ModelArgs) -> Result<()> {
    let cfg = crate::config::Config::load(&args.config)?;
    let keys = &cfg.model.trusted_keys;
    let store = || Store::open(&cfg.model_store());
    match &args.action {
        ModelAction::Verify { bundle } => {
            let b = open_bundle(bundle, keys)?;
            let m = b.manifest();
            println!(
                "{}: {} {} verified (signature, hashes, graph, self-test); manifest sha256 {}",
                bundle.display(),
                m.name,
                m.version,
                manifest_sha256(b.dir())?
            );
        }
        ModelAction::Install { bundle, activate } => {
            let store = store()?;
            let id = store.install(bundle, keys)?;
            println!("installed {id}");
            if *activate {
                store.activate(&id, keys)?;
                println!("active: {id}");
            }
            if cfg.model.backend == BackendKind::Onnxruntime {
                println!("{}", compile(&cfg, &store, &id)?);
            }
        }
        ModelAction::Compile { version } => {
            let store = store()?;
            let id = match version {
                Some(v) => v.clone(),
                None => store.active()?.ok_or_else(|| {
                    Error::Usage("no active version: name one (`model compile VERSION`)".into())
                })?,
            };
            println!("{}", compile(&cfg, &store, &id)?);
        }
        ModelAction::List => {
            let store = store()?;
            let all = store.list()?;
            if all.is_empty() {
                println!("no model installed in {}", store.root.display());
            }
            for i in all {
                let mark = if i.active {
                    "active"
                } else if i.previous {
                    "previous"
                } else {
                    ""
                };
                println!("{:<40} {:<8} {}", i.id, mark, i.sha256);
            }
        }
        ModelAction::Activate { version } => {
            store()?.activate(version, keys)?;
            println!("active: {version}");
        }
        ModelAction::Rollback => println!("active: {}", store()?.rollback(keys)?),
        ModelAction::Remove { version } => {
            let store = store()?;
            store.remove(version)?;
            println!("removed {version}");
            let keep: Vec<String> = store.list()?.into_iter().map(|i| i.sha256).collect();
            let engines = crate::infer::engines::EngineCache::new(cfg.state_dir().join("engines"));
            let n = engines.prune(&keep);
            if n > 0 {
                println!("removed {n} compiled engine folder(s) of models no longer installed");
            }
        }
        ModelAction::Inbox { dir } => {
            let dir = dir.clone().unwrap_or_else(|| cfg.state_dir().join("inbox"));
            let store = store()?;
            for (name, outcome) in store.inbox(&dir, keys)? {
                match outcome {
                    Ok(id) => {
                        println!("{name}: installed and activated {id}");
                        if cfg.model.backend == BackendKind::Onnxruntime {
                            match compile(&cfg, &store, &id) {
                                Ok(line) => println!("{line}"),
                                Err(e) => println!("{name}: {e}"),
                            }
                        }
                    }
                    Err(e) => println!("{name}: refused: {e}"),
                }
            }
        }
    }
    Ok(())
}

/// Opens installed version `id` with the configured backend (building TensorRT engines into
/// the cache when they are not there yet); says which backend and provider it got, and how
/// long it took.
fn compile(cfg: &crate::config::Config, store: &Store, id: &str) -> Result<String> {
    let b = open_bundle(&store.slot(id), &cfg.model.trusted_keys)?;
    let t = std::time::Instant::now();
    let backend = crate::infer::open(&cfg.backend_spec(), &b).map_err(|e| {
        Error::Failed(format!(
            "{id} is installed, but the configured backend could not open it: {e}"
        ))
    })?;
    Ok(format!(
        "{id}: {} ready in {:.1} s",
        backend.describe(),
        t.elapsed().as_secs_f64()
    ))
}
