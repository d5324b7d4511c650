//! Inference through ONNX Runtime (the `ort` crate, `load-dynamic`): the library is found at
//! run time (the config's `model.onnxruntime_library`, else `ORT_DYLIB_PATH`, else
//! `libonnxruntime.so` on the loader path), so one binary runs the PyPI build on a workstation
//! and a JetPack build with the TensorRT execution provider on a Jetson.
//!
//! Providers are tried in the configured order, each registered so that its failure is an
//! error (ONNX Runtime would otherwise fall back to the CPU without a word): a failure is
//! logged with its reason and the next is tried; the one that took is what `provider()`
//! reports. The TensorRT provider builds its engines into the [`EngineCache`] at open (never
//! at the first camera frame) and warms up every batch size of its profile.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use reddino_models::bundle::Bundle;
use reddino_models::onnx::{EMBEDDING, INPUT, LOGITS};

use super::engines::{BatchProfile, CacheError, EngineCache, EngineKey};
use super::{gpu, Backend, BackendError, BackendSpec, BatchOutput, Precision, Provider};

/// Oldest ONNX Runtime the bindings work with (`ort`'s API level).
pub const MIN_MINOR: u32 = ort::MINOR_VERSION;

/// The library loaded into this process (one per process: ONNX Runtime keeps one environment).
struct Runtime {
    env: Environment,
    library: PathBuf,
    version: String,
}

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// The library path to load: the config's, else `ORT_DYLIB_PATH`, else the loader's search
/// for `libonnxruntime.so`.
pub fn library_path(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("libonnxruntime.so"),
    }
}

/// The version string of the ONNX Runtime library at `path`, read through its C API entry
/// point, and whether it is new enough. Loading it is the only way to know it is one.
pub fn library_version(path: &Path) -> Result<String, BackendError> {
    let fail = |reason: String| BackendError::Library {
        path: path.to_path_buf(),
        reason,
    };
    if path.components().count() > 1 && !path.exists() {
        return Err(fail(
            "no such file (set model.onnxruntime_library or ORT_DYLIB_PATH to libonnxruntime.so)"
                .into(),
        ));
    }
    // SAFETY: loading a shared library runs its initialisers; the path is the operator's
    // choice of ONNX Runtime, as for any dynamically linked program.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| fail(e.to_string()))?;
    // SAFETY: `OrtGetApiBase` takes nothing and returns a pointer to a static struct whose
    // layout is fixed by ONNX Runtime's C API (`ort::sys::OrtApiBase`).
    let version = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> = lib
            .get(b"OrtGetApiBase")
            .map_err(|_| fail("not an ONNX Runtime library (it has no `OrtGetApiBase`)".into()))?;
        let base = get();
        if base.is_null() {
            return Err(fail("`OrtGetApiBase` returned nothing".into()));
        }
        let s = ((*base).GetVersionString)();
        if s.is_null() {
            return Err(fail("no version string".into()));
        }
        CStr::from_ptr(s).to_string_lossy().into_owned()
    };
    // The library stays loaded: ort loads the same file next and would find it mapped.
    std::mem::forget(lib);
    check_version(path, &version)?;
    Ok(version)
}

/// Refuses versions older than the bindings' API level.
pub fn check_version(path: &Path, version: &str) -> Result<(), BackendError> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(1), Some(minor)) if minor >= MIN_MINOR => Ok(()),
        (Some(major), Some(_)) if major > 1 => Ok(()),
        _ => Err(BackendError::TooOld {
            path: path.to_path_buf(),
            found: version.to_string(),
            needed: format!("1.{MIN_MINOR}"),
        }),
    }
}

/// Loads the library once per process and returns its environment and version. A second
/// call with another path is refused (one ONNX Runtime per process).
fn runtime(configured: Option<&Path>) -> Result<(Environment, String), BackendError> {
    let path = library_path(configured);
    let mut rt = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = rt.as_ref() {
        if r.library != path {
            return Err(BackendError::Library {
                path,
                reason: format!(
                    "ONNX Runtime is already loaded from {} in this process",
                    r.library.display()
                ),
            });
        }
        return Ok((r.env.clone(), r.version.clone()));
    }
    let version = library_version(&path)?;
    let builder = ort::init_from(&path).map_err(|e| BackendError::Library {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let env = builder
        .with_name("reddino-edge")
        .build()
        .map_err(|e| BackendError::Ort(format!("creating the ONNX Runtime environment: {e}")))?;
    log::info!("ONNX Runtime {version} loaded from {}", path.display());
    *rt = Some(Runtime {
        env: env.clone(),
        library: path,
        version: version.clone(),
    });
    Ok((env, version))
}

/// An exported RedDino graph and what the engine cache and the outputs need of it.
pub struct OrtModel {
    pub onnx: Vec<u8>,
    /// Identifies the model in the engine cache key (the bundle's manifest sha256).
    pub sha256: String,
    pub input_size: usize,
    pub embed_dim: usize,
    /// Classes of the head (0: no head).
    pub classes: usize,
}

/// ONNX Runtime inference of one model with the first provider that registers.
pub struct OrtBackend {
    session: Session,
    provider: Provider,
    version: String,
    batch: usize,
    size: usize,
    dim: usize,
    classes: usize,
    /// Where the TensorRT engines of this model live (TensorRT only).
    engines: Option<PathBuf>,
}

fn ort_err(what: &str) -> impl FnOnce(ort::Error) -> BackendError + '_ {
    move |e| BackendError::Ort(format!("{what}: {e}"))
}

impl OrtBackend {
    /// Opens a verified bundle's model with the first of `spec.providers` that registers.
    pub fn open(spec: &BackendSpec, bundle: &Bundle) -> Result<Self, BackendError> {
        let m = bundle.manifest();
        let model = OrtModel {
            onnx: bundle.read_model()?,
            sha256: crate::model::manifest_sha256(bundle.dir())
                .map_err(|e| BackendError::Ort(e.to_string()))?,
            input_size: m.input_size,
            embed_dim: m.embed_dim,
            classes: m.class_names.len(),
        };
        Self::from_model(spec, &model)
    }

    /// Opens an exported graph (the benchmark's way in; the service opens bundles).
    pub fn from_model(spec: &BackendSpec, model: &OrtModel) -> Result<Self, BackendError> {
        if spec.providers.is_empty() {
            return Err(BackendError::NoProvider(vec![]));
        }
        let (env, version) = runtime(spec.library.as_deref())?;
        let size = model.input_size;
        let batch = spec.batch.max(1);
        let mut tried = Vec::new();
        for &provider in &spec.providers {
            let t = Instant::now();
            match open_with(&env, &version, spec, model, provider) {
                Ok((session, engines)) => {
                    let mut b = OrtBackend {
                        session,
                        provider,
                        version: version.clone(),
                        batch,
                        size,
                        dim: model.embed_dim,
                        classes: model.classes,
                        engines,
                    };
                    if provider != Provider::Tensorrt {
                        // TensorRT warmed up inside its build; the others warm up here.
                        for n in BatchProfile::up_to(batch).shapes() {
                            b.warm_up(n)?;
                        }
                    }
                    log::info!(
                        "ONNX Runtime {version}: {} provider ready in {:.1} s{}",
                        provider.name(),
                        t.elapsed().as_secs_f64(),
                        b.engines
                            .as_ref()
                            .map(|e| format!(", engines in {}", e.display()))
                            .unwrap_or_default()
                    );
                    return Ok(b);
                }
                Err(e) => {
                    log::warn!(
                        "ONNX Runtime {version}: the {} provider is not used: {e}",
                        provider.name()
                    );
                    tried.push((provider.name().to_string(), e.to_string()));
                }
            }
        }
        Err(BackendError::NoProvider(tried))
    }

    /// The TensorRT engine folder, when the TensorRT provider runs.
    pub fn engines(&self) -> Option<&Path> {
        self.engines.as_deref()
    }

    fn warm_up(&mut self, n: usize) -> Result<(), BackendError> {
        let per = 3 * self.size * self.size;
        let x = vec![0.0f32; n * per];
        self.run(&x, n)?;
        Ok(())
    }
}

/// A session of `onnx` with `provider` registered so that its failure is an error. For
/// TensorRT, the engines come from (or are built into) the engine cache, and every profile
/// shape runs once before the session is returned.
fn open_with(
    env: &Environment,
    version: &str,
    spec: &BackendSpec,
    model: &OrtModel,
    provider: Provider,
) -> Result<(Session, Option<PathBuf>), BackendError> {
    let builder = |eps: Vec<ExecutionProviderDispatch>| -> Result<Session, BackendError> {
        let mut b = Session::builder(env)
            .map_err(ort_err("session options"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| BackendError::Ort(e.to_string()))?
            .with_intra_threads(spec.threads)
            .map_err(|e| BackendError::Ort(e.to_string()))?;
        if !eps.is_empty() {
            b = b
                .with_execution_providers(eps)
                .map_err(|e| BackendError::Ort(e.to_string()))?;
        }
        b.commit_from_memory(&model.onnx)
            .map_err(ort_err("loading the model"))
    };
    match provider {
        Provider::Cpu => Ok((builder(vec![])?, None)),
        Provider::Cuda => {
            let cuda = ep::CUDA::default()
                .with_device_id(spec.device_id)
                .build()
                .error_on_failure();
            Ok((builder(vec![cuda])?, None))
        }
        Provider::Tensorrt => {
            let Some(root) = spec.engines.as_ref() else {
                return Err(BackendError::Ort(
                    "TensorRT needs an engine cache folder (the state directory)".into(),
                ));
            };
            let key = EngineKey {
                model_sha256: model.sha256.clone(),
                onnxruntime: version.to_string(),
                tensorrt: gpu::tensorrt_version().map_err(BackendError::Gpu)?,
                compute_capability: gpu::compute_capability(spec.device_id)
                    .map_err(BackendError::Gpu)?,
                precision: spec.precision.name().into(),
                profile: BatchProfile::up_to(spec.batch),
                input_size: model.input_size,
            };
            let cache = EngineCache::new(root);
            // Nodes TensorRT cannot take run on CUDA when the config lists it (else on the
            // CPU); CUDA's own failure there is not fatal: TensorRT registered already.
            let with_cuda = |trt: ExecutionProviderDispatch| {
                let mut eps = vec![trt];
                if spec.providers.contains(&Provider::Cuda) {
                    eps.push(
                        ep::CUDA::default()
                            .with_device_id(spec.device_id)
                            .build()
                            .fail_silently(),
                    );
                }
                eps
            };
            let trt = |engines: &Path, timing: &Path| {
                let shape = |n: usize| {
                    let s = model.input_size;
                    format!("{INPUT}:{n}x3x{s}x{s}")
                };
                let p = key.profile;
                ep::TensorRT::default()
                    .with_device_id(spec.device_id)
                    .with_fp16(spec.precision == Precision::Fp16)
                    .with_layer_norm_fp32_fallback(true)
                    .with_profile_min_shapes(shape(p.min))
                    .with_profile_opt_shapes(shape(p.opt))
                    .with_profile_max_shapes(shape(p.max))
                    .with_engine_cache(true)
                    .with_engine_cache_path(engines.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(timing.display())
                    .build()
                    .error_on_failure()
            };
            if let Some(dir) = cache.lookup(&key) {
                log::info!("TensorRT engines of this model found in {}", dir.display());
                let mut s = builder(with_cuda(trt(&dir, &cache.timing_dir(&key))))?;
                warm_up_session(&mut s, &key)?;
                return Ok((s, Some(dir)));
            }
            log::info!(
                "building TensorRT engines ({}, batch {}..{}); this takes minutes the first time",
                key.precision,
                key.profile.min,
                key.profile.max
            );
            let t = Instant::now();
            let (s, dir) = cache
                .build(&key, |engines, timing| {
                    let mut s = builder(with_cuda(trt(engines, timing)))?;
                    warm_up_session(&mut s, &key)?;
                    Ok::<_, BackendError>(s)
                })
                .map_err(|e| match e {
                    CacheError::Build(e) => e,
                    e @ CacheError::Io { .. } => BackendError::Ort(e.to_string()),
                })?;
            log::info!(
                "TensorRT engines built in {:.0} s into {}",
                t.elapsed().as_secs_f64(),
                dir.display()
            );
            Ok((s, Some(dir)))
        }
    }
}

/// Runs every batch size of the profile once (TensorRT builds or loads its engines for each).
fn warm_up_session(s: &mut Session, key: &EngineKey) -> Result<(), BackendError> {
    let size = key.input_size;
    for n in key.profile.shapes() {
        let x = vec![0.0f32; n * 3 * size * size];
        let t = TensorRef::from_array_view(([n, 3, size, size], &x[..]))
            .map_err(ort_err("warm-up input"))?;
        s.run(ort::inputs![INPUT => t])
            .map_err(ort_err("warm-up run"))?;
    }
    Ok(())
}

impl Backend for OrtBackend {
    fn input_size(&self) -> usize {
        self.size
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn run(&mut self, pixels: &[f32], n: usize) -> Result<BatchOutput, reddino_models::Error> {
        let per = 3 * self.size * self.size;
        if n == 0 || n > self.batch || pixels.len() != n * per {
            return Err(reddino_models::Error::Inference(format!(
                "batch of {n} images with {} values; the backend takes 1 to {} images of {per} values",
                pixels.len(),
                self.batch
            )));
        }
        let e = |what: &str| {
            let what = what.to_string();
            move |e: ort::Error| {
                reddino_models::Error::Inference(format!("onnxruntime {what}: {e}"))
            }
        };
        // The caller's pixels are borrowed as the input tensor, not copied.
        let size = self.size;
        let input = TensorRef::from_array_view(([n, 3, size, size], pixels)).map_err(e("input"))?;
        let out = self
            .session
            .run(ort::inputs![INPUT => input])
            .map_err(e("run"))?;
        let (_, emb) = out[EMBEDDING]
            .try_extract_tensor::<f32>()
            .map_err(e("embedding"))?;
        if emb.len() != n * self.dim {
            return Err(reddino_models::Error::Inference(format!(
                "onnxruntime gave {} embedding values for {n} images of dimension {}",
                emb.len(),
                self.dim
            )));
        }
        let logits = match out.get(LOGITS) {
            Some(v) => Some(
                v.try_extract_tensor::<f32>()
                    .map_err(e("logits"))?
                    .1
                    .to_vec(),
            ),
            None => None,
        };
        Ok(BatchOutput {
            n,
            dim: self.dim,
            embeddings: emb.to_vec(),
            classes: if logits.is_some() { self.classes } else { 0 },
            logits,
        })
    }

    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn provider(&self) -> &str {
        self.provider.name()
    }

    fn describe(&self) -> String {
        format!(
            "onnxruntime {} ({} provider), batch {}, input {}",
            self.version,
            self.provider.name(),
            self.batch,
            self.size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_older_than_the_bindings_are_refused_with_both_versions() {
        let p = Path::new("/opt/ort/libonnxruntime.so");
        let err = check_version(p, "1.16.3").unwrap_err().to_string();
        assert!(
            err.contains("/opt/ort/libonnxruntime.so")
                && err.contains("1.16.3")
                && err.contains(&format!("1.{MIN_MINOR} or newer")),
            "{err}"
        );
        assert!(check_version(p, &format!("1.{MIN_MINOR}.0")).is_ok());
        assert!(check_version(p, "1.32.0").is_ok());
        assert!(check_version(p, "2.0.0").is_ok());
        assert!(check_version(p, "unknown").is_err());
    }

    #[test]
    fn the_library_path_comes_from_the_config_then_the_environment() {
        let p = library_path(Some(Path::new("/a/libonnxruntime.so")));
        assert_eq!(p, Path::new("/a/libonnxruntime.so"));
    }
}
