//! Publishing results: the durable [`outbox`] every result is stored in first, the [`messages`]
//! on the wire, the [`delivery`] state of one broker connection (what is handed over, in
//! flight, acknowledged), and the [`mqtt`] event loop that drives it. The publisher sees the
//! rest of the service only through a [`Link`].

pub mod delivery;
pub mod messages;
pub mod mqtt;
pub mod outbox;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use messages::{ReplyMsg, StatusMsg};
use outbox::Outbox;

/// Milliseconds since the Unix epoch (0 before it): the clock of every message and row.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the publisher asks of the device it publishes for.
pub trait Device: Send + Sync {
    /// The full topic of `leaf` (`{prefix}/{device}/{leaf}`).
    fn topic(&self, leaf: &str) -> String;
    /// The status message in `state` (`online`, `offline`).
    fn status(&self, state: &str) -> StatusMsg;
    /// Handles one command (`leaf` is the topic after `cmd/`); the reply is published.
    fn command(&self, leaf: &str, payload: &[u8]) -> ReplyMsg;
}

/// Everything the publisher shares with the service.
#[derive(Clone)]
pub struct Link {
    /// The results to send; a row is deleted when the broker acknowledges it.
    pub outbox: Arc<Mutex<Outbox>>,
    /// Rung whenever a result is stored.
    pub notify: Arc<tokio::sync::Notify>,
    /// Set once no more results will come: the publisher drains the outbox and stops.
    pub done: Arc<AtomicBool>,
    pub device: Arc<dyn Device>,
}
