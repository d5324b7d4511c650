//! The compiled-engine cache in the state directory (`engines/`). A TensorRT engine is valid
//! for one model, one ONNX Runtime, one TensorRT, one GPU architecture, one precision and one
//! batch profile; ONNX Runtime's own cache file names carry only the compute capability, so
//! each engine set lives in a folder keyed on all of them ([`EngineKey`]). A folder is built
//! in a staging folder and renamed into place when complete, so a crash mid-build leaves no
//! half engine that a later start would load; a key that changes in any part misses and
//! rebuilds.
//!
//! ```text
//! engines/
//!   <model sha256 (16)>-<key hash (16)>/   KEY (the key in full) + the engine files
//!   timing-trt<version>-sm<cc>/            TensorRT's timing cache, shared by all models
//!   .staging-*/                            builds in progress (swept at the next build)
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The file in each engine folder holding its key in full.
pub const KEY_FILE: &str = "KEY";

/// Batch sizes an engine is built for: TensorRT's optimisation profile for the batch
/// dimension (`min <= opt <= max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchProfile {
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

impl BatchProfile {
    /// Batches of 1 to `batch`, tuned for full batches.
    pub fn up_to(batch: usize) -> Self {
        let batch = batch.max(1);
        BatchProfile {
            min: 1,
            opt: batch,
            max: batch,
        }
    }

    /// The distinct batch sizes of the profile, smallest first: what a warm-up runs.
    pub fn shapes(&self) -> Vec<usize> {
        let mut v = vec![self.min, self.opt, self.max];
        v.dedup();
        v
    }
}

/// Everything an engine depends on. Two keys that differ in any field name different folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineKey {
    /// sha256 of the bundle's signed manifest.
    pub model_sha256: String,
    /// ONNX Runtime version, e.g. `1.20.0`.
    pub onnxruntime: String,
    /// TensorRT version, e.g. `10.3.0`.
    pub tensorrt: String,
    /// GPU compute capability, e.g. `8.7` (Jetson Orin).
    pub compute_capability: String,
    /// `fp16` or `fp32`.
    pub precision: String,
    pub profile: BatchProfile,
    /// Input side in pixels.
    pub input_size: usize,
}

impl EngineKey {
    /// The key as `name=value` lines, in a fixed order (the content of [`KEY_FILE`]).
    pub fn canonical(&self) -> String {
        format!(
            "model_sha256={}\nonnxruntime={}\ntensorrt={}\ncompute_capability={}\nprecision={}\n\
             profile={}/{}/{}\ninput={}x{}\n",
            self.model_sha256,
            self.onnxruntime,
            self.tensorrt,
            self.compute_capability,
            self.precision,
            self.profile.min,
            self.profile.opt,
            self.profile.max,
            self.input_size,
            self.input_size
        )
    }

    /// The folder name: the model's hash prefix (so a person sees which model) and a hash of
    /// the whole key.
    pub fn dir_name(&self) -> String {
        let h = Sha256::digest(self.canonical().as_bytes());
        let model: String = self
            .model_sha256
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .take(16)
            .collect();
        format!("{model}-{}", hex(&h[..8]))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Errors of the cache itself (the engine build's own errors pass through).
#[derive(Debug, thiserror::Error)]
pub enum CacheError<E> {
    #[error("engine cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(E),
}

fn io<E>(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError<E> + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `engines/` folder of a state directory.
#[derive(Debug, Clone)]
pub struct EngineCache {
    root: PathBuf,
}

impl EngineCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        EngineCache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The ready folder for `key`, if a complete build with exactly this key is there.
    pub fn lookup(&self, key: &EngineKey) -> Option<PathBuf> {
        let dir = self.root.join(key.dir_name());
        match fs::read_to_string(dir.join(KEY_FILE)) {
            Ok(k) if k == key.canonical() => Some(dir),
            _ => None,
        }
    }

    /// TensorRT's timing cache for one TensorRT version and GPU architecture: it survives
    /// model changes and makes later builds faster.
    pub fn timing_dir(&self, key: &EngineKey) -> PathBuf {
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        self.root.join(format!(
            "timing-trt{}-sm{}",
            safe(&key.tensorrt),
            safe(&key.compute_capability)
        ))
    }

    /// Builds the folder for `key`: `build` gets a fresh staging folder for the engine files
    /// and a staging copy of the timing cache; when it succeeds the key file is written, every
    /// file synced, the folder renamed into place (replacing a stale one) and the timing cache
    /// updated file by file (write, sync, rename). When it fails, nothing of it stays.
    pub fn build<T, E>(
        &self,
        key: &EngineKey,
        build: impl FnOnce(&Path, &Path) -> Result<T, E>,
    ) -> Result<(T, PathBuf), CacheError<E>> {
        fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        self.sweep_staging();
        let name = key.dir_name();
        let staging = self
            .root
            .join(format!(".staging-{name}-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        let engines = staging.join("engines");
        let timing = staging.join("timing");
        fs::create_dir_all(&engines).map_err(io(&engines))?;
        fs::create_dir_all(&timing).map_err(io(&timing))?;
        let shared_timing = self.timing_dir(key);
        if let Ok(rd) = fs::read_dir(&shared_timing) {
            for e in rd.flatten() {
                if e.path().is_file() {
                    fs::copy(e.path(), timing.join(e.file_name())).map_err(io(&e.path()))?;
                }
            }
        }
        let result = match build(&engines, &timing) {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(CacheError::Build(e));
            }
        };
        let done = (|| -> Result<PathBuf, CacheError<E>> {
            let key_path = engines.join(KEY_FILE);
            write_synced(&key_path, key.canonical().as_bytes()).map_err(io(&key_path))?;
            for e in fs::read_dir(&engines).map_err(io(&engines))?.flatten() {
                if e.path().is_file() {
                    fs::File::open(e.path())
                        .and_then(|f| f.sync_all())
                        .map_err(io(&e.path()))?;
                }
            }
            let dest = self.root.join(&name);
            if dest.exists() {
                fs::remove_dir_all(&dest).map_err(io(&dest))?;
            }
            fs::rename(&engines, &dest).map_err(io(&dest))?;
            fs::create_dir_all(&shared_timing).map_err(io(&shared_timing))?;
            for e in fs::read_dir(&timing).map_err(io(&timing))?.flatten() {
                if !e.path().is_file() {
                    continue;
                }
                let bytes = fs::read(e.path()).map_err(io(&e.path()))?;
                let tmp = shared_timing.join(format!(".{}.tmp", e.file_name().to_string_lossy()));
                write_synced(&tmp, &bytes).map_err(io(&tmp))?;
                fs::rename(&tmp, shared_timing.join(e.file_name())).map_err(io(&tmp))?;
            }
            sync_dir(&shared_timing);
            sync_dir(&self.root);
            Ok(dest)
        })();
        let _ = fs::remove_dir_all(&staging);
        Ok((result, done?))
    }

    /// Removes staging folders that no running process is writing (a build cut short).
    pub fn sweep_staging(&self) {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(".staging-") else {
                continue;
            };
            let pid = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| {
                p != std::process::id() && Path::new(&format!("/proc/{p}")).exists()
            });
            if !alive {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes the engine folders of models other than `keep` (sha256s of the installed
    /// versions); returns how many.
    pub fn prune(&self, keep: &[String]) -> usize {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return 0;
        };
        let mut removed = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with("timing-") || !e.path().is_dir() {
                continue;
            }
            let model = name.split('-').next().unwrap_or("");
            if !keep.iter().any(|k| k.starts_with(model)) && fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EngineKey {
        EngineKey {
            model_sha256: "ab".repeat(32),
            onnxruntime: "1.20.0".into(),
            tensorrt: "10.3.0".into(),
            compute_capability: "8.7".into(),
            precision: "fp16".into(),
            profile: BatchProfile::up_to(8),
            input_size: 224,
        }
    }

    /// A stand-in engine build: writes one engine file and appends to the timing cache, and
    /// counts how often it ran.
    fn build_into(
        cache: &EngineCache,
        k: &EngineKey,
        builds: &mut usize,
    ) -> Result<PathBuf, CacheError<String>> {
        if let Some(dir) = cache.lookup(k) {
            return Ok(dir);
        }
        *builds += 1;
        let ((), dir) = cache.build(k, |engines, timing| -> Result<(), String> {
            fs::write(engines.join("model_ctx.engine"), k.canonical()).unwrap();
            let t = timing.join("trt.timing");
            let old = fs::read(&t).unwrap_or_default();
            fs::write(&t, [old, vec![1]].concat()).unwrap();
            Ok(())
        })?;
        Ok(dir)
    }

    #[test]
    fn every_key_part_forces_a_rebuild_and_the_same_key_hits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = EngineCache::new(tmp.path().join("engines"));
        let mut builds = 0;
        let base = key();
        let first = build_into(&cache, &base, &mut builds).unwrap();
        assert_eq!(builds, 1);
        assert_eq!(build_into(&cache, &base, &mut builds).unwrap(), first);
        assert_eq!(builds, 1, "the same key must load the cached engines");
        assert_eq!(
            fs::read_to_string(first.join("model_ctx.engine")).unwrap(),
            base.canonical()
        );

        type Change = Box<dyn Fn(&mut EngineKey)>;
        let changes: Vec<(&str, Change)> = vec![
            ("model", Box::new(|k| k.model_sha256 = "cd".repeat(32))),
            ("onnxruntime", Box::new(|k| k.onnxruntime = "1.21.1".into())),
            ("tensorrt", Box::new(|k| k.tensorrt = "10.7.0".into())),
            ("gpu", Box::new(|k| k.compute_capability = "9.0".into())),
            ("precision", Box::new(|k| k.precision = "fp32".into())),
            ("profile min", Box::new(|k| k.profile.min = 2)),
            ("profile opt", Box::new(|k| k.profile.opt = 4)),
            ("profile max", Box::new(|k| k.profile.max = 16)),
            ("input size", Box::new(|k| k.input_size = 112)),
        ];
        let mut names = vec![base.dir_name()];
        for (what, change) in &changes {
            let mut k = base.clone();
            change(&mut k);
            assert!(
                cache.lookup(&k).is_none(),
                "{what}: a changed key must miss"
            );
            let before = builds;
            let dir = build_into(&cache, &k, &mut builds).unwrap();
            assert_eq!(builds, before + 1, "{what}: must rebuild");
            assert!(!names.contains(&k.dir_name()), "{what}: same folder name");
            names.push(k.dir_name());
            assert_eq!(
                fs::read_to_string(dir.join(KEY_FILE)).unwrap(),
                k.canonical()
            );
        }
        // The base key still hits after all the others were built.
        assert_eq!(build_into(&cache, &base, &mut builds).unwrap(), first);
        assert_eq!(builds, 1 + changes.len());
    }

    #[test]
    fn a_failed_or_interrupted_build_leaves_nothing_that_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = EngineCache::new(tmp.path().join("engines"));
        let k = key();
        let r = cache.build(&k, |engines, _| -> Result<(), String> {
            fs::write(engines.join("half.engine"), b"half").unwrap();
            Err("the builder ran out of memory".into())
        });
        assert!(matches!(r, Err(CacheError::Build(ref m)) if m.contains("out of memory")));
        assert!(cache.lookup(&k).is_none());
        assert_eq!(
            fs::read_dir(cache.root()).unwrap().count(),
            0,
            "staging left"
        );

        // A build cut short by a crash: a staging folder of a dead process, and a folder whose
        // key file was never written.
        let dead = cache
            .root()
            .join(format!(".staging-{}-4000000000", k.dir_name()));
        fs::create_dir_all(dead.join("engines")).unwrap();
        let torn = cache.root().join(k.dir_name());
        fs::create_dir_all(&torn).unwrap();
        fs::write(torn.join("model_ctx.engine"), b"torn").unwrap();
        assert!(
            cache.lookup(&k).is_none(),
            "a folder without its key must miss"
        );
        let mut builds = 0;
        let dir = build_into(&cache, &k, &mut builds).unwrap();
        assert_eq!(builds, 1);
        assert!(!dead.exists(), "the dead build's staging is swept");
        assert_eq!(
            fs::read_to_string(dir.join("model_ctx.engine")).unwrap(),
            k.canonical()
        );
        // A key file that does not match (edited, or another key's folder) misses too.
        fs::write(dir.join(KEY_FILE), "model_sha256=other\n").unwrap();
        assert!(cache.lookup(&k).is_none());
    }

    #[test]
    fn the_timing_cache_is_shared_per_tensorrt_and_gpu_and_carried_between_builds() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = EngineCache::new(tmp.path().join("engines"));
        let mut builds = 0;
        let a = key();
        let mut b = key();
        b.model_sha256 = "cd".repeat(32);
        build_into(&cache, &a, &mut builds).unwrap();
        build_into(&cache, &b, &mut builds).unwrap();
        let t = cache.timing_dir(&a).join("trt.timing");
        assert_eq!(
            fs::read(&t).unwrap(),
            vec![1, 1],
            "the second build saw the first's"
        );
        let mut c = key();
        c.compute_capability = "9.0".into();
        assert_ne!(cache.timing_dir(&c), cache.timing_dir(&a));
        // Prune keeps the listed models' engines and the timing caches.
        assert_eq!(cache.prune(std::slice::from_ref(&a.model_sha256)), 1);
        assert!(cache.lookup(&a).is_some());
        assert!(cache.lookup(&b).is_none());
        assert!(t.exists());
    }

    #[test]
    fn profile_shapes_cover_min_opt_max_once() {
        assert_eq!(BatchProfile::up_to(8).shapes(), vec![1, 8]);
        assert_eq!(BatchProfile::up_to(1).shapes(), vec![1]);
        assert_eq!(
            BatchProfile {
                min: 1,
                opt: 4,
                max: 16
            }
            .shapes(),
            vec![1, 4, 16]
        );
    }
}
