//! A subscriber that checks what reaches the broker: every result by `seq` (de-duplicated),
//! replies and the retained status; it sends commands too. The demo's and the tests' witness.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::publish::messages::{CountsMsg, ModelEventMsg, ReplyMsg, SessionMsg, StatusMsg};

/// What a subscriber saw.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub seqs: BTreeSet<u64>,
    pub duplicates: u64,
    pub counts: Vec<CountsMsg>,
    pub sessions: Vec<SessionMsg>,
    pub model_events: Vec<ModelEventMsg>,
    pub replies: Vec<ReplyMsg>,
    pub status: Option<StatusMsg>,
    pub malformed: u64,
}

/// An MQTT subscriber to what the device publishes (`{prefix}/{device}/+`: counts, session,
/// model, status, reply; not the commands under `cmd/`) that records results by `seq` (de-duplicated),
/// replies and the status; it can also send commands.
pub struct Monitor {
    client: Client,
    pub seen: Arc<Mutex<Observed>>,
    prefix: String,
}

impl Monitor {
    /// Connects with a persistent session (so results published while it is away are kept
    /// for it by the broker) and subscribes.
    pub fn connect(host: &str, port: u16, client_id: &str, prefix: &str) -> Result<Monitor> {
        let mut o = MqttOptions::new(client_id, host, port);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(o, 256);
        client
            .subscribe(format!("{prefix}/+"), QoS::AtLeastOnce)
            .map_err(|e| Error::Failed(format!("the subscriber could not subscribe: {e}")))?;
        let seen = Arc::new(Mutex::new(Observed::default()));
        let (s2, p2) = (seen.clone(), prefix.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || {
                let mut ready = Some(ready_tx);
                for ev in conn.iter() {
                    match ev {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            record(&s2, &p2, &p.topic, &p.payload)
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::RequestsDone) => break,
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            })
            .map_err(|e| Error::Failed(format!("cannot start the subscriber: {e}")))?;
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| Error::Failed("the subscriber could not subscribe in time".into()))?;
        Ok(Monitor {
            client,
            seen,
            prefix: prefix.to_string(),
        })
    }

    /// Publishes a command (`leaf` after `cmd/`) with a raw payload.
    pub fn command(&self, leaf: &str, payload: &[u8]) -> Result<()> {
        self.command_with(leaf, payload, false)
    }

    /// [`Monitor::command`], with the retain flag as given (the device refuses retained
    /// commands).
    pub fn command_with(&self, leaf: &str, payload: &[u8], retain: bool) -> Result<()> {
        self.client
            .publish(
                format!("{}/cmd/{leaf}", self.prefix),
                QoS::AtLeastOnce,
                retain,
                payload.to_vec(),
            )
            .map_err(|e| Error::Failed(format!("cannot send command {leaf}: {e}")))
    }

    /// Waits until `f` holds for what was seen.
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&Observed) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if f(&self.seen.lock().unwrap()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f(&self.seen.lock().unwrap())
    }

    pub fn observed(&self) -> Observed {
        self.seen.lock().unwrap().clone()
    }

    pub fn disconnect(self) {
        let _ = self.client.disconnect();
    }
}

/// Records a message that carries an outbox `seq`: kept once, a repeat counted as a
/// duplicate, an unparsable payload as malformed.
fn by_seq<M: serde::de::DeserializeOwned>(
    payload: &[u8],
    seq: impl Fn(&M) -> u64,
    seqs: &mut BTreeSet<u64>,
    into: &mut Vec<M>,
    duplicates: &mut u64,
    malformed: &mut u64,
) {
    match serde_json::from_slice::<M>(payload) {
        Ok(m) if seqs.insert(seq(&m)) => into.push(m),
        Ok(_) => *duplicates += 1,
        Err(_) => *malformed += 1,
    }
}

fn record(seen: &Mutex<Observed>, prefix: &str, topic: &str, payload: &[u8]) {
    let mut s = seen.lock().unwrap();
    let leaf = topic
        .strip_prefix(prefix)
        .unwrap_or(topic)
        .trim_start_matches('/');
    match leaf {
        "counts" => {
            let Observed {
                seqs,
                counts,
                duplicates,
                malformed,
                ..
            } = &mut *s;
            by_seq(
                payload,
                |m: &CountsMsg| m.seq,
                seqs,
                counts,
                duplicates,
                malformed,
            )
        }
        "session" => {
            let Observed {
                seqs,
                sessions,
                duplicates,
                malformed,
                ..
            } = &mut *s;
            by_seq(
                payload,
                |m: &SessionMsg| m.seq,
                seqs,
                sessions,
                duplicates,
                malformed,
            )
        }
        "model" => {
            let Observed {
                seqs,
                model_events,
                duplicates,
                malformed,
                ..
            } = &mut *s;
            by_seq(
                payload,
                |m: &ModelEventMsg| m.seq,
                seqs,
                model_events,
                duplicates,
                malformed,
            )
        }
        "reply" => match serde_json::from_slice::<ReplyMsg>(payload) {
            Ok(m) => s.replies.push(m),
            Err(_) => s.malformed += 1,
        },
        "status" => match serde_json::from_slice::<StatusMsg>(payload) {
            Ok(m) => s.status = Some(m),
            Err(_) => s.malformed += 1,
        },
        _ => {}
    }
}

/// Per-class totals over received counts messages.
pub fn totals(counts: &[CountsMsg]) -> BTreeMap<String, u64> {
    let mut t = BTreeMap::new();
    for m in counts {
        for (c, n) in &m.counts {
            *t.entry(c.clone()).or_insert(0) += n;
        }
    }
    t
}
