//! Telling the service manager (systemd, `Type=notify`) how the service is: `READY=1` once the
//! model is loaded and the first frame has been analysed and stored, then `WATCHDOG=1` after
//! analysed frames (at most every quarter of `WatchdogSec`), so a pipeline that stops
//! analysing (a stuck camera, a hung backend) is restarted by systemd while one that works is
//! left alone; `STOPPING=1` when it shuts down. Outside systemd (no `NOTIFY_SOCKET`) every call
//! is a no-op.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Run once, on the first analysed frame.
type OnReady = Box<dyn FnOnce() + Send>;

/// The service's side of the systemd notification protocol.
pub struct Supervisor {
    enabled: bool,
    /// A quarter of the watchdog timeout: the longest gap between two pings.
    ping_every: Option<Duration>,
    ready: AtomicBool,
    last_ping: Mutex<Option<Instant>>,
    on_ready: Mutex<Option<OnReady>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("enabled", &self.enabled)
            .field("ping_every", &self.ping_every)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// From the environment systemd gives the service (`NOTIFY_SOCKET`, `WATCHDOG_USEC`).
    pub fn from_env() -> Supervisor {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog = if enabled {
            sd_notify::watchdog_enabled()
        } else {
            None
        };
        if let Some(t) = watchdog {
            log::info!("systemd watchdog: {t:?}; pinged while frames are analysed");
        }
        Supervisor {
            enabled,
            ping_every: watchdog.map(|t| t / 4),
            ready: AtomicBool::new(false),
            last_ping: Mutex::new(None),
            on_ready: Mutex::new(None),
        }
    }

    /// One that never notifies.
    pub fn disabled() -> Supervisor {
        Supervisor {
            enabled: false,
            ping_every: None,
            ready: AtomicBool::new(false),
            last_ping: Mutex::new(None),
            on_ready: Mutex::new(None),
        }
    }

    /// Runs `f` on the first analysed frame (the model store marks its version healthy).
    /// Runs now if a frame was analysed already.
    pub fn on_first_frame(&self, f: impl FnOnce() + Send + 'static) {
        let mut slot = self.on_ready.lock().unwrap_or_else(|e| e.into_inner());
        // Decided under the lock `frame_done` takes the callback under: never run twice or
        // missed.
        if self.ready.load(Ordering::SeqCst) {
            drop(slot);
            f();
        } else {
            *slot = Some(Box::new(f));
        }
    }

    /// A frame was analysed and its result stored: ready after the first, a watchdog ping
    /// when one is due.
    pub fn frame_done(&self, model: &str) {
        let first = {
            let mut slot = self.on_ready.lock().unwrap_or_else(|e| e.into_inner());
            (!self.ready.swap(true, Ordering::SeqCst)).then(|| slot.take())
        };
        if let Some(f) = first {
            log::info!("ready: first frame analysed with {model}");
            if let Some(f) = f {
                f();
            }
            if self.enabled {
                let status = format!("analysing frames with {model}");
                self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
        if !self.enabled {
            return;
        }
        if let Some(every) = self.ping_every {
            let mut last = self.last_ping.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| t.elapsed() >= every) {
                *last = Some(Instant::now());
                drop(last);
                self.send(&[NotifyState::Watchdog]);
            }
        }
    }

    /// The service is shutting down (systemd waits for it instead of calling it failed).
    pub fn stopping(&self) {
        if self.enabled {
            self.send(&[NotifyState::Stopping]);
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("cannot notify systemd: {e}");
        }
    }
}
