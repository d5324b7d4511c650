//! Data-parallel training over torch.distributed's process groups: the launch read from the
//! environment torchrun and SLURM set ([`Launch`]), and a process group of libtorch's own
//! c10d (Gloo on CPUs, NCCL on GPUs) over a TCP store ([`ProcessGroup`]), reached through the
//! C++ shim in `csrc/c10d_shim.cpp` (compiled by build.rs against the torch wheel's headers).
//!
//! What the trainer reduces across ranks, as DINOv2 does: the gradients (averaged, in buckets,
//! after the backward pass), the Sinkhorn-Knopp sums and the iBOT masked-patch count, the
//! running-mean centres, and the logged losses. The student starts from rank 0's weights; the
//! EMA teacher then stays identical everywhere because every rank applies the same update.

use std::cell::RefCell;
use std::time::Duration;

use tch::{Kind, Tensor};

use crate::bail;
use crate::error::{Context, Result};

/// Where this process sits in a multi-process run, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Rank on this node: picks the GPU (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already hosts the TCP store (`TORCHELASTIC_USE_AGENT_STORE`): every
    /// rank joins it as a client.
    pub agent_store: bool,
    /// Which launcher's variables were read (for messages).
    pub launcher: &'static str,
}

impl Launch {
    /// The launch described by `env` (a lookup such as `std::env::var`): torchrun's `RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, else SLURM's `SLURM_PROCID`,
    /// `SLURM_NTASKS`, `SLURM_LOCALID` with `MASTER_ADDR` (or `SLURM_LAUNCH_NODE_IPADDR`) and
    /// `MASTER_PORT` (default 29500). None for a single process (no launcher, or a world of 1).
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let num = |key: &str| -> Result<Option<usize>> {
            match env(key) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) => Ok(Some(n)),
                    Err(_) => bail!("{key}={v:?} is not a non-negative integer"),
                },
            }
        };
        let (launcher, rank, world, local) = if let Some(world) = num("WORLD_SIZE")? {
            let rank = num("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            ("torchrun", rank, world, num("LOCAL_RANK")?.unwrap_or(0))
        } else if let Some(world) = num("SLURM_NTASKS")? {
            let rank =
                num("SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
            ("SLURM", rank, world, num("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(None);
        };
        if world == 0 || rank >= world {
            bail!("{launcher}: rank {rank} is not below the world size {world}");
        }
        if world == 1 {
            return Ok(None);
        }
        let master_addr = env("MASTER_ADDR")
            .or_else(|| {
                (launcher == "SLURM")
                    .then(|| env("SLURM_LAUNCH_NODE_IPADDR"))
                    .flatten()
            })
            .filter(|a| !a.trim().is_empty())
            .with_context(|| {
                format!(
                    "{launcher} runs {world} processes but MASTER_ADDR is not set (the address \
                     of rank 0's node; with SLURM: export MASTER_ADDR=$(scontrol show hostnames \
                     \"$SLURM_JOB_NODELIST\" | head -n 1))"
                )
            })?;
        let master_port = match env("MASTER_PORT") {
            None => 29500,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(n) => n,
                Err(_) => bail!("MASTER_PORT={p:?} is not a port number"),
            },
        };
        let agent_store = env("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Ok(Some(Launch {
            rank,
            world,
            local_rank: local,
            master_addr: master_addr.trim().to_string(),
            master_port,
            agent_store,
            launcher,
        }))
    }

    /// [`Launch::from_lookup`] on this process's environment.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_lookup(|k| std::env::var(k).ok())
    }
}

/// Whether this build has the c10d shim (it needs Gloo's headers at build time).
pub const AVAILABLE: bool = cfg!(reddino_c10d);

#[cfg(reddino_c10d)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    use torch_sys::C_tensor;
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn rd_c10d_new(
            backend: *const c_char,
            host: *const c_char,
            port: u16,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            store_is_agent: c_int,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn rd_c10d_all_reduce(
            group: *mut c_void,
            ts: *const *mut C_tensor,
            n: c_int,
            op: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn rd_c10d_broadcast(
            group: *mut c_void,
            ts: *const *mut C_tensor,
            n: c_int,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn rd_c10d_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn rd_c10d_free(group: *mut c_void);
        pub fn rd_c10d_free_str(s: *mut c_char);
    }
}

/// Stand-ins for a build without the shim: [`ProcessGroup::new`] refuses before any of them
/// could be reached.
#[cfg(not(reddino_c10d))]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    use torch_sys::C_tensor;
    const NONE: &str = "no process group exists without the shim";
    pub unsafe fn rd_c10d_all_reduce(
        _: *mut c_void,
        _: *const *mut C_tensor,
        _: c_int,
        _: c_int,
        _: *mut *mut c_char,
    ) -> c_int {
        unreachable!("{NONE}")
    }
    pub unsafe fn rd_c10d_broadcast(
        _: *mut c_void,
        _: *const *mut C_tensor,
        _: c_int,
        _: c_int,
        _: *mut *mut c_char,
    ) -> c_int {
        unreachable!("{NONE}")
    }
    pub unsafe fn rd_c10d_barrier(_: *mut c_void, _: *mut *mut c_char) -> c_int {
        unreachable!("{NONE}")
    }
    pub unsafe fn rd_c10d_free(_: *mut c_void) {}
    pub unsafe fn rd_c10d_free_str(_: *mut c_char) {}
}

/// A c10d process group: this process's rank among `world`.
pub struct ProcessGroup {
    ptr: *mut std::os::raw::c_void,
    pub rank: usize,
    pub world: usize,
    /// Rank on this node (picks the GPU).
    pub local_rank: usize,
    pub backend: String,
    /// The first collective that failed inside code that cannot return an error (the losses);
    /// every later collective is skipped and [`ProcessGroup::check`] reports it.
    failed: RefCell<Option<String>>,
}

/// Gradient buckets of about this many bytes are reduced in one collective (DDP's 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

impl ProcessGroup {
    /// Joins the group: rendezvous at the launch's TCP store, then a `backend` ("gloo" or
    /// "nccl") process group. `timeout` bounds the rendezvous and every collective, so a rank
    /// that dies makes the others fail instead of waiting for ever.
    pub fn new(launch: &Launch, backend: &str, timeout: Duration) -> Result<ProcessGroup> {
        #[cfg(reddino_c10d)]
        {
            use std::ffi::CString;
            let (Ok(c_backend), Ok(host)) = (
                CString::new(backend),
                CString::new(launch.master_addr.clone()),
            ) else {
                bail!("the backend name and MASTER_ADDR cannot hold NUL bytes");
            };
            let mut err = std::ptr::null_mut();
            // SAFETY: the strings outlive the call; `err` receives a string we free below.
            let ptr = unsafe {
                ffi::rd_c10d_new(
                    c_backend.as_ptr(),
                    host.as_ptr(),
                    launch.master_port,
                    launch.rank as i32,
                    launch.world as i32,
                    timeout.as_millis() as i64,
                    launch.agent_store as i32,
                    &mut err,
                )
            };
            if ptr.is_null() {
                let why = take_err(err);
                bail!(
                    "rank {} of {}: joining the {backend} process group at {}:{} failed: {why}",
                    launch.rank,
                    launch.world,
                    launch.master_addr,
                    launch.master_port
                );
            }
            Ok(ProcessGroup {
                ptr,
                rank: launch.rank,
                world: launch.world,
                local_rank: launch.local_rank,
                backend: backend.to_string(),
                failed: RefCell::new(None),
            })
        }
        #[cfg(not(reddino_c10d))]
        {
            let _ = timeout;
            bail!(
                "{} asks for {} processes ({backend}), but this trainer was built without \
                 torch.distributed: Gloo's headers were missing at build time (Debian: apt \
                 install libgloo-dev, or set GLOO_INCLUDE) and rebuild",
                launch.launcher,
                launch.world
            )
        }
    }

    /// Errors with the first collective that failed since the last check.
    pub fn check(&self) -> Result<()> {
        match self.failed.borrow_mut().take() {
            Some(why) => bail!("{why}"),
            None => Ok(()),
        }
    }

    /// Runs one collective of the shim on the tensors `ts` (`f` gets the group, the tensor
    /// handles, their count and the error slot). After a failure every later collective is
    /// refused with the first reason, so that no rank waits on a group that is gone.
    fn collective(
        &self,
        what: &str,
        ts: &[&Tensor],
        f: impl FnOnce(
            *mut std::os::raw::c_void,
            *const *mut torch_sys::C_tensor,
            i32,
            *mut *mut std::os::raw::c_char,
        ) -> i32,
    ) -> Result<()> {
        if let Some(why) = self.failed.borrow().as_ref() {
            bail!("{why}");
        }
        let handles: Vec<*mut torch_sys::C_tensor> =
            ts.iter().map(|t| t.as_ptr() as *mut _).collect();
        let mut err = std::ptr::null_mut();
        if f(self.ptr, handles.as_ptr(), handles.len() as i32, &mut err) != 0 {
            let why = format!(
                "rank {} of {}: {what} failed (another rank stopped or the network broke): {}",
                self.rank,
                self.world,
                take_err(err)
            );
            *self.failed.borrow_mut() = Some(why.clone());
            bail!("{why}");
        }
        Ok(())
    }

    /// Sums (or, with `max`, takes the maximum of) each tensor over all ranks, in place. The
    /// tensors must be contiguous.
    pub fn all_reduce(&self, ts: &[&Tensor], max: bool) -> Result<()> {
        // SAFETY: the tensors are alive for the call; c10d writes into their storage.
        self.collective("all-reduce", ts, |g, handles, n, err| unsafe {
            ffi::rd_c10d_all_reduce(g, handles, n, max as i32, err)
        })
    }

    /// Rank `root`'s values of each tensor, in place on every rank.
    pub fn broadcast(&self, ts: &[&Tensor], root: usize) -> Result<()> {
        // SAFETY: as in all_reduce.
        self.collective("broadcast", ts, |g, handles, n, err| unsafe {
            ffi::rd_c10d_broadcast(g, handles, n, root as i32, err)
        })
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the group is alive.
        self.collective("barrier", &[], |g, _, _, err| unsafe {
            ffi::rd_c10d_barrier(g, err)
        })
    }

    /// Sums `t` over all ranks in place, for code that cannot return an error (the losses):
    /// a failure is recorded for [`ProcessGroup::check`] and leaves `t` as it was.
    pub fn sum_in_place(&self, t: &Tensor) {
        let _ = self.all_reduce(&[t], false);
    }

    /// Averages the gradients of `params` over all ranks, in buckets of about `bucket_bytes`:
    /// each bucket is flattened into one buffer, summed in one collective, divided by the world
    /// size and copied back. Parameters without a gradient are left out (on every rank alike:
    /// the ranks run the same graph).
    pub fn average_gradients(&self, params: &[Tensor], bucket_bytes: usize) -> Result<()> {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len() && (end == start || bytes < bucket_bytes) {
                bytes += grads[end].numel() * grads[end].kind().elt_size_in_bytes();
                end += 1;
            }
            let bucket = &grads[start..end];
            let flat = Tensor::cat(
                &bucket.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                0,
            )
            .to_kind(Kind::Float);
            self.all_reduce(&[&flat], false)?;
            let flat = flat / self.world as f64;
            let mut off = 0;
            tch::no_grad(|| {
                for g in bucket {
                    let n = g.numel() as i64;
                    let part = flat.narrow(0, off, n).view_as(g).to_kind(g.kind());
                    g.shallow_clone().copy_(&part);
                    off += n;
                }
            });
            start = end;
        }
        Ok(())
    }
}

fn take_err(err: *mut std::os::raw::c_char) -> String {
    if err.is_null() {
        return "no reason given".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed here once.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .trim()
        .to_string();
    unsafe { ffi::rd_c10d_free_str(err) };
    s
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by rd_c10d_new, freed once.
        unsafe { ffi::rd_c10d_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_environments() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let l = launch(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "3"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.master_port, l.agent_store),
            (3, 8, 3, 29400, true)
        );
        assert_eq!(l.master_addr, "10.0.0.1");
        let s = launch(&[
            ("SLURM_NTASKS", "16"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.master_port),
            (9, 16, 1, 29500)
        );
        assert_eq!((s.master_addr.as_str(), s.agent_store), ("10.0.0.7", false));
        let err = |v: &[(&str, &str)]| format!("{:#}", launch(v).unwrap_err());
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("not below"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "x")]).contains("RANK=\"x\""));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("MASTER_ADDR"));
        assert!(err(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "99999")
        ])
        .contains("MASTER_PORT"));
    }
}
