//! The MQTT event loop (rumqttc): QoS 1, `clean_session=false`, a fixed client id, the retained
//! `status` with a last will, commands on `{prefix}/{device}/cmd/...`. Each connection gets a
//! fresh event loop and a fresh [`Delivery`] (what goes out when, what an acknowledgement
//! deletes: see [`super::delivery`]); this file turns the client's events into its calls.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};

use super::delivery::{Delivery, Sink, Tag};
use super::messages::{ReplyMsg, VERSION};
use super::outbox::Outbox;
use super::Link;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) the broker's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Fixed client id (the broker keeps the session under it); default `reddino-edge-{device_id}`.
    pub client_id: Option<String>,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    pub username: Option<String>,
    /// File holding the password (first line). The password is never logged.
    pub password_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_s: f64,
    /// Messages published and not yet acknowledged at any time.
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// How often the retained status is refreshed.
    #[serde(default = "default_status_interval")]
    pub status_interval_s: f64,
    /// On shutdown, how long to keep sending what the outbox holds.
    #[serde(default = "default_drain")]
    pub drain_timeout_s: f64,
}

fn default_host() -> String {
    "localhost".into()
}
fn default_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "reddino".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_reconnect_max() -> f64 {
    10.0
}
fn default_inflight() -> u16 {
    32
}
fn default_status_interval() -> f64 {
    30.0
}
fn default_drain() -> f64 {
    5.0
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml::from_str("").expect("every MQTT setting has a default")
    }
}

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

/// A file the MQTT settings name that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the MQTT password file {} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error(
        "the MQTT password file {} can be read by other users (mode {mode:o}): `chmod 600` it",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the CA certificate {} holds no PEM certificate{why}", path.display())]
    BadCa { path: PathBuf, why: String },
}

/// The CA file must hold at least one PEM certificate that parses (checked at start, not at
/// the first connection).
fn check_ca(path: &Path, pem: &[u8]) -> Result<(), SettingsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        c.map_err(|e| SettingsError::BadCa {
            path: path.to_path_buf(),
            why: format!(": {e}"),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(SettingsError::BadCa {
            path: path.to_path_buf(),
            why: String::new(),
        });
    }
    Ok(())
}

fn read_file(what: &'static str, p: &Path) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(p).map_err(|source| SettingsError::Read {
        what,
        path: p.to_path_buf(),
        source,
    })
}

impl MqttSettings {
    /// Loads the password and TLS files named in the config; errors name the file.
    pub fn from_config(cfg: &MqttConfig, client_id: String) -> Result<Self, SettingsError> {
        let password = match &cfg.password_file {
            Some(p) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(p)
                    .map_err(|source| SettingsError::Read {
                        what: "MQTT password file",
                        path: p.clone(),
                        source,
                    })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SettingsError::Exposed {
                        path: p.clone(),
                        mode: mode & 0o777,
                    });
                }
                let text = String::from_utf8(read_file("MQTT password file", p)?)
                    .map_err(|_| SettingsError::NotUtf8(p.clone()))?;
                Some(text.lines().next().unwrap_or("").to_string())
            }
            None => None,
        };
        let tls = match &cfg.tls {
            Some(t) => {
                let ca = read_file("CA certificate", &t.ca)?;
                check_ca(&t.ca, &ca)?;
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
    link: Link,
    settings: MqttSettings,
) -> std::thread::JoinHandle<PublisherReport> {
    std::thread::Builder::new()
        .name("mqtt".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cannot start the MQTT runtime");
            rt.block_on(run(link, settings))
        })
        .expect("cannot start the MQTT thread")
}

impl Sink for AsyncClient {
    fn publish(&mut self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        self.try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|e| e.to_string())
    }
}

fn lock(outbox: &Mutex<Outbox>) -> MutexGuard<'_, Outbox> {
    outbox.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection: its client and its delivery state.
struct Conn {
    client: AsyncClient,
    delivery: Delivery,
}

impl Conn {
    fn pump(&mut self, link: &Link, max_inflight: usize, report: &mut PublisherReport) {
        match self
            .delivery
            .pump(&lock(&link.outbox), &mut self.client, max_inflight)
        {
            Ok(n) => report.published += n as u64,
            Err(e) => log::error!("{e}"),
        }
    }

    fn ack(&mut self, pkid: u16, link: &Link, report: &mut PublisherReport) -> Option<Tag> {
        match self.delivery.acked(pkid, &mut lock(&link.outbox)) {
            Ok(tag) => {
                if let Some(Tag::Row(_)) = tag {
                    report.acked += 1;
                }
                tag
            }
            Err(e) => {
                log::error!("{e}");
                None
            }
        }
    }

    fn status(&mut self, link: &Link, topic: &str, state: &str) -> bool {
        let st = serde_json::to_vec(&link.device.status(state)).expect("serialisable");
        self.delivery
            .send_other(&mut self.client, topic.to_string(), true, st)
    }
}

fn finished(link: &Link, drain_deadline: &mut Option<Instant>, drain: Duration) -> bool {
    if !link.done.load(Ordering::SeqCst) {
        return false;
    }
    let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + drain);
    let empty = lock(&link.outbox).is_empty().unwrap_or(true);
    empty || Instant::now() >= deadline
}

async fn run(link: Link, s: MqttSettings) -> PublisherReport {
    let mut report = PublisherReport::default();
    let status_topic = link.device.topic("status");
    let reply_topic = link.device.topic("reply");
    let cmd_prefix = link.device.topic("cmd/");
    let max_inflight = s.max_inflight as usize;
    let mut backoff = Duration::from_millis(250);
    let mut drain_deadline = None;
    let mut last_error = String::new();
    'connection: loop {
        if finished(&link, &mut drain_deadline, s.drain_timeout) {
            break;
        }
        // The will is set per connection, from the device as it is now.
        let opts = s.options(&status_topic, link.device.status("offline").last_will());
        let (client, mut events) = AsyncClient::new(opts, max_inflight + 32);
        let mut c = Conn {
            client,
            delivery: Delivery::new(),
        };
        let mut status_tick = tokio::time::interval(s.status_interval);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.delivery.connected();
                        report.connects += 1;
                        backoff = Duration::from_millis(250);
                        last_error.clear();
                        log::info!("MQTT: connected to {}:{} as {}", s.host, s.port, s.client_id);
                        // Commands at QoS 0: the broker keeps none for the device while it is
                        // away and resends none at a reconnect, so a command is run when it is
                        // sent or not at all (its sender sees the reply, or none and retries),
                        // and a command the client cannot take (over the packet limit: the
                        // connection drops) is not offered again at every reconnect.
                        if let Err(e) = c.client.try_subscribe(format!("{cmd_prefix}#"), QoS::AtMostOnce) {
                            log::warn!("MQTT: cannot subscribe to commands: {e}");
                        }
                        c.status(&link, &status_topic, "online");
                        c.pump(&link, max_inflight, &mut report);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        c.delivery.sent(pkid);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        c.ack(ack.pkid, &link, &mut report);
                        c.pump(&link, max_inflight, &mut report);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(leaf) = p.topic.strip_prefix(&cmd_prefix) {
                            // A retained command would run again at every reconnect (a stopped
                            // slide restarting by itself): it is refused, never run.
                            let reply = if p.retain {
                                retained_refusal(leaf, &p.payload)
                            } else {
                                link.device.command(leaf, &p.payload)
                            };
                            if reply.ok {
                                log::info!("command {leaf}: ok");
                            } else {
                                log::warn!("command {leaf} refused: {}", reply.error.as_deref().unwrap_or(""));
                            }
                            let body = serde_json::to_vec(&reply).expect("serialisable");
                            c.delivery.send_other(&mut c.client, reply_topic.clone(), false, body);
                            c.pump(&link, max_inflight, &mut report);
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
                _ = link.notify.notified() => c.pump(&link, max_inflight, &mut report),
                _ = status_tick.tick() => {
                    if c.delivery.is_connected() {
                        c.status(&link, &status_topic, "online");
                    }
                }
                _ = check.tick() => {
                    if finished(&link, &mut drain_deadline, s.drain_timeout) {
                        if c.delivery.is_connected() {
                            goodbye(&mut c, &mut events, &link, &status_topic, &mut report).await;
                        }
                        break 'connection;
                    }
                }
            }
        }
        // Lost the connection: wait, then start over with a fresh event loop.
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if finished(&link, &mut drain_deadline, s.drain_timeout) {
                break 'connection;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        backoff = (backoff * 2).min(s.reconnect_max);
    }
    report.left_in_outbox = lock(&link.outbox).len().unwrap_or(0);
    if report.left_in_outbox > 0 {
        log::warn!(
            "{} results are still in the outbox; they are sent on the next start",
            report.left_in_outbox
        );
    }
    report
}

/// The reply to a command that came retained: refused, and not run.
fn retained_refusal(leaf: &str, payload: &[u8]) -> ReplyMsg {
    ReplyMsg {
        schema_version: VERSION,
        id: serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from)),
        command: leaf.to_string(),
        ok: false,
        error: Some(
            "retained commands are refused (the broker would replay them at every reconnect): \
             publish commands without the retain flag, and clear this one with an empty \
             retained message"
                .into(),
        ),
        status: None,
    }
}

/// Publishes the retained `offline` status and disconnects cleanly (so the will is not needed).
/// Acknowledgements that arrive meanwhile still clear their outbox rows.
async fn goodbye(
    c: &mut Conn,
    events: &mut rumqttc::EventLoop,
    link: &Link,
    topic: &str,
    report: &mut PublisherReport,
) {
    if !c.status(link, topic, "offline") {
        return;
    }
    // The status is the last publish handed over: the last id the client gives out.
    let mut waiting = c.delivery.queued();
    let mut status_pkid = None;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if c.delivery.sent(pkid).is_some() {
                    waiting -= 1;
                    if waiting == 0 {
                        status_pkid = Some(pkid);
                    }
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                c.ack(ack.pkid, link, report);
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A self-signed CA certificate, for parsing only.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBizCCATGgAwIBAgIURXtsutoPdbBW0ZwTuP6KONUWrtswCgYIKoZIzj0EAwIw\nGjEYMBYGA1UEAwwPcmVkZGluby10ZXN0LWNhMCAXDTI2MTIwNDIyMzU0OFoYDzIx\nMjYxMTEwMjIzNTQ4WjAaMRgwFgYDVQQDDA9yZWRkaW5vLXRlc3QtY2EwWTATBgcq\nhkjOPQIBBggqhkjOPQMBBwNCAAQWSW16B1GMxLb8ty/kuedI3Ai1YpTSA84K8ETX\nEgx6dWGguCOXObleRwo/1yA2HDylmNODpud41knueitvjpGMo1MwUTAdBgNVHQ4E\nFgQUD2d1r2b7UcS79KjFNVfRvuyq1uIwHwYDVR0jBBgwFoAUD2d1r2b7UcS79KjF\nNVfRvuyq1uIwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAo7mT\npjPqdOG3WT+LsdWRmW9dMlcMTA/cfUB0tZM1HrACIHBc/2H/+5IQky7rf7kMxi5Q\nLqQPjGVbNvUQH/VoLiJG\n-----END CERTIFICATE-----\n";

    fn settings(f: impl FnOnce(&mut MqttConfig)) -> Result<MqttSettings, SettingsError> {
        let mut cfg = MqttConfig::default();
        f(&mut cfg);
        MqttSettings::from_config(&cfg, "t".into())
    }

    #[test]
    fn a_password_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let with = |c: &mut MqttConfig| {
            c.username = Some("edge".into());
            c.password_file = Some(p.clone());
        };
        let e = settings(with).unwrap_err().to_string();
        assert!(
            e.contains("chmod 600") && e.contains("644") && !e.contains("s3cret"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = settings(with).unwrap();
        assert_eq!(s.password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let with = |c: &mut MqttConfig| {
            c.tls = Some(TlsConfig {
                ca: ca.clone(),
                client_cert: None,
                client_key: None,
            })
        };
        for bad in [
            "",
            "not a certificate",
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        ] {
            std::fs::write(&ca, bad).unwrap();
            let e = settings(with).unwrap_err().to_string();
            assert!(
                e.contains("ca.pem") && e.contains("CA certificate"),
                "{bad:?}: {e}"
            );
        }
        std::fs::write(&ca, TEST_CA).unwrap();
        assert!(settings(with).unwrap().tls.is_some());
    }
}
