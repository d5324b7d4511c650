//! Publishing over MQTT (rumqttc): QoS 1, `clean_session=false`, a fixed client id, the
//! retained `status` with a last will, commands on `{prefix}/{device}/cmd/...`.
//!
//! The outbox is the only record of what is unsent. Each connection gets a fresh event loop;
//! rows are published in `seq` order from the oldest unacknowledged one, at most
//! `max_inflight` at a time, and a row is deleted only when the PUBACK for its packet id
//! arrives. After a disconnect (or a restart) everything still in the outbox is sent again, so
//! a subscriber sees every `seq` at least once and de-duplicates on it.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};

use crate::config::MqttConfig;
use crate::service::Shared;

/// PEM bytes: the CA, and the client certificate + key for mutual TLS.
type TlsFiles = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

/// Connection settings with secrets loaded. `Debug` never shows the password.
#[derive(Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    password: Option<String>,
    tls: Option<TlsFiles>,
    pub keep_alive: Duration,
    pub reconnect_max: Duration,
    pub max_inflight: u16,
    pub status_interval: Duration,
    pub drain_timeout: Duration,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn read_file(what: &str, p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read the {what} {}: {e}", p.display()))
}

impl MqttSettings {
    /// Loads the password and TLS files named in the config; errors name the file.
    pub fn from_config(cfg: &MqttConfig, client_id: String) -> anyhow::Result<Self> {
        let password = match &cfg.password_file {
            Some(p) => {
                let text =
                    String::from_utf8(read_file("MQTT password file", p)?).map_err(|_| {
                        anyhow::anyhow!("the MQTT password file {} is not UTF-8", p.display())
                    })?;
                Some(text.lines().next().unwrap_or("").to_string())
            }
            None => None,
        };
        let tls = match &cfg.tls {
            Some(t) => {
                let ca = read_file("CA certificate", &t.ca)?;
                let client = match (&t.client_cert, &t.client_key) {
                    (Some(c), Some(k)) => Some((
                        read_file("client certificate", c)?,
                        read_file("client key", k)?,
                    )),
                    _ => None,
                };
                Some((ca, client))
            }
            None => None,
        };
        Ok(MqttSettings {
            host: cfg.host.clone(),
            port: cfg.port,
            client_id,
            username: cfg.username.clone(),
            password,
            tls,
            keep_alive: Duration::from_secs(cfg.keep_alive_s.max(5)),
            reconnect_max: Duration::from_secs_f64(cfg.reconnect_max_s),
            max_inflight: cfg.max_inflight,
            status_interval: Duration::from_secs_f64(cfg.status_interval_s),
            drain_timeout: Duration::from_secs_f64(cfg.drain_timeout_s),
        })
    }

    /// Plain TCP to `host:port` with the other settings at their defaults.
    pub fn plain(host: &str, port: u16, client_id: &str) -> Self {
        let cfg = MqttConfig {
            host: host.into(),
            port,
            ..MqttConfig::default()
        };
        Self::from_config(&cfg, client_id.into()).expect("no files to read")
    }

    fn options(&self, will_topic: &str, will: Vec<u8>) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(self.keep_alive)
            .set_clean_session(false)
            .set_inflight(self.max_inflight.saturating_add(16))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_last_will(LastWill::new(will_topic, will, QoS::AtLeastOnce, true));
        if let Some(u) = &self.username {
            o.set_credentials(u.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some((ca, client)) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Simple {
                    ca: ca.clone(),
                    alpn: None,
                    client_auth: client.clone(),
                },
            ));
        }
        o
    }
}

/// What the publisher did, returned when it stops.
#[derive(Debug, Clone, Default)]
pub struct PublisherReport {
    /// Result messages published (resends included).
    pub published: u64,
    /// Result messages acknowledged and deleted from the outbox.
    pub acked: u64,
    /// Successful connections.
    pub connects: u64,
    /// Rows left in the outbox at the end (sent on the next start).
    pub left_in_outbox: u64,
}

/// Starts the publisher thread. It runs until the pipeline is done and the outbox is empty
/// (or `drain_timeout` has passed since the pipeline finished).
pub fn spawn_publisher(
    shared: Arc<Shared>,
    settings: MqttSettings,
) -> std::thread::JoinHandle<PublisherReport> {
    std::thread::Builder::new()
        .name("mqtt".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cannot start the MQTT runtime");
            rt.block_on(run(shared, settings))
        })
        .expect("cannot start the MQTT thread")
}

/// Per-connection bookkeeping.
struct Conn {
    client: AsyncClient,
    /// One tag per QoS 1 publish handed to the client, in order: `Some(seq)` for outbox rows.
    /// rumqttc reports the packet id it gave each publish (`Outgoing::Publish`) in that order.
    queued: VecDeque<Option<u64>>,
    inflight: HashMap<u16, u64>,
    /// Highest `seq` handed to this connection.
    sent_upto: u64,
    connected: bool,
}

impl Conn {
    fn outstanding(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }

    fn publish_other(&mut self, topic: String, retain: bool, payload: Vec<u8>) {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => self.queued.push_back(None),
            Err(e) => log::warn!("MQTT: cannot queue a message: {e}"),
        }
    }

    fn pump(&mut self, shared: &Shared, max_inflight: usize, report: &mut PublisherReport) {
        if !self.connected {
            return;
        }
        let room = max_inflight.saturating_sub(self.outstanding());
        if room == 0 {
            return;
        }
        let rows = match shared
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending_after(self.sent_upto, room)
        {
            Ok(r) => r,
            Err(e) => {
                log::error!("{e}");
                return;
            }
        };
        for r in rows {
            match self
                .client
                .try_publish(r.topic, QoS::AtLeastOnce, false, r.payload)
            {
                Ok(()) => {
                    self.queued.push_back(Some(r.seq));
                    self.sent_upto = r.seq;
                    report.published += 1;
                }
                Err(e) => {
                    log::warn!("MQTT: cannot queue seq {}: {e}", r.seq);
                    break;
                }
            }
        }
    }
}

fn finished(shared: &Shared, drain_deadline: &mut Option<Instant>, drain: Duration) -> bool {
    if !shared.pipeline_done.load(Ordering::SeqCst) {
        return false;
    }
    let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + drain);
    let empty = shared
        .outbox
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
        .unwrap_or(true);
    empty || Instant::now() >= deadline
}

async fn run(shared: Arc<Shared>, s: MqttSettings) -> PublisherReport {
    let mut report = PublisherReport::default();
    let status_topic = shared.topic("status");
    let reply_topic = shared.topic("reply");
    let cmd_prefix = shared.topic("cmd/");
    let will = serde_json::to_vec(&shared.status("offline")).expect("serialisable");
    let opts = s.options(&status_topic, will);
    let max_inflight = s.max_inflight as usize;
    let mut backoff = Duration::from_millis(250);
    let mut drain_deadline = None;
    let mut last_error = String::new();
    'connection: loop {
        if finished(&shared, &mut drain_deadline, s.drain_timeout) {
            break;
        }
        let (client, mut events) = AsyncClient::new(opts.clone(), max_inflight + 32);
        let mut c = Conn {
            client,
            queued: VecDeque::new(),
            inflight: HashMap::new(),
            sent_upto: 0,
            connected: false,
        };
        let mut status_tick = tokio::time::interval(s.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.connected = true;
                        report.connects += 1;
                        backoff = Duration::from_millis(250);
                        last_error.clear();
                        log::info!("MQTT: connected to {}:{} as {}", s.host, s.port, s.client_id);
                        if let Err(e) = c.client.try_subscribe(format!("{cmd_prefix}#"), QoS::AtLeastOnce) {
                            log::warn!("MQTT: cannot subscribe to commands: {e}");
                        }
                        let st = serde_json::to_vec(&shared.status("online")).expect("serialisable");
                        c.publish_other(status_topic.clone(), true, st);
                        c.pump(&shared, max_inflight, &mut report);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(Some(seq)) = c.queued.pop_front() {
                            c.inflight.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = c.inflight.remove(&ack.pkid) {
                            match shared.outbox.lock().unwrap_or_else(|e| e.into_inner()).ack(seq) {
                                Ok(_) => report.acked += 1,
                                Err(e) => log::error!("{e}"),
                            }
                        }
                        c.pump(&shared, max_inflight, &mut report);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(leaf) = p.topic.strip_prefix(&cmd_prefix) {
                            let reply = shared.handle_command(leaf, &p.payload);
                            if reply.ok {
                                log::info!("command {leaf}: ok");
                            } else {
                                log::warn!("command {leaf} refused: {}", reply.error.as_deref().unwrap_or(""));
                            }
                            c.publish_other(reply_topic.clone(), false, serde_json::to_vec(&reply).expect("serialisable"));
                            c.pump(&shared, max_inflight, &mut report);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_error {
                            log::warn!("MQTT: broker {}:{} unreachable ({msg}); results stay in the outbox, retrying", s.host, s.port);
                            last_error = msg;
                        }
                        break;
                    }
                },
                _ = shared.notify.notified() => c.pump(&shared, max_inflight, &mut report),
                _ = status_tick.tick() => {
                    if c.connected {
                        let st = serde_json::to_vec(&shared.status("online")).expect("serialisable");
                        c.publish_other(status_topic.clone(), true, st);
                    }
                }
                _ = check.tick() => {
                    if finished(&shared, &mut drain_deadline, s.drain_timeout) {
                        if c.connected {
                            goodbye(&mut c, &mut events, &shared, &status_topic, &mut report).await;
                        }
                        break 'connection;
                    }
                }
            }
        }
        // Lost the connection: wait, then start over with a fresh event loop.
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if finished(&shared, &mut drain_deadline, s.drain_timeout) {
                break 'connection;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        backoff = (backoff * 2).min(s.reconnect_max);
    }
    report.left_in_outbox = shared
        .outbox
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len()
        .unwrap_or(0);
    if report.left_in_outbox > 0 {
        log::warn!(
            "{} results are still in the outbox; they are sent on the next start",
            report.left_in_outbox
        );
    }
    report
}

/// Publishes the retained `offline` status and disconnects cleanly (so the will is not needed).
/// Acknowledgements that arrive meanwhile still clear their outbox rows.
async fn goodbye(
    c: &mut Conn,
    events: &mut rumqttc::EventLoop,
    shared: &Shared,
    topic: &str,
    report: &mut PublisherReport,
) {
    let st = serde_json::to_vec(&shared.status("offline")).expect("serialisable");
    if c.client
        .try_publish(topic, QoS::AtLeastOnce, true, st)
        .is_err()
    {
        return;
    }
    c.queued.push_back(None);
    let mut status_pkid = None;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                let before = c.queued.len();
                match c.queued.pop_front() {
                    Some(Some(seq)) => {
                        c.inflight.insert(pkid, seq);
                    }
                    // The status is the last publish queued.
                    Some(None) if before == 1 => status_pkid = Some(pkid),
                    _ => {}
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(seq) = c.inflight.remove(&ack.pkid) {
                    if shared
                        .outbox
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .ack(seq)
                        .is_ok()
                    {
                        report.acked += 1;
                    }
                }
                if status_pkid == Some(ack.pkid) && c.client.try_disconnect().is_err() {
                    return;
                }
            }
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => return,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {}
        }
    }
}
