//! Commands from the broker (`cmd/...`) and the sessions they start and stop. A malformed or
//! refused command changes nothing and is answered with the reason.

use std::time::Duration;

use crate::classify::Session;
use crate::config::valid_id;
use crate::publish::messages::{
    ClassShare, CommandMsg, ModelEventMsg, ReplyMsg, SessionMsg, VERSION,
};
use crate::publish::now_ms;
use crate::publish::outbox::{OutboxError, SessionRow};

use super::state::{lock, ActiveSession, Shared, SESSION_RESUME_MAX};

/// Why a command was refused: the reply's `error`.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(
        "unknown command {0:?}; known: session/start, session/stop, status, model/activate, model/rollback"
    )]
    Unknown(String),
    #[error("model/activate needs \"version\": an installed version (`reddino-edge model list`)")]
    NoVersion,
    #[error("this device has no model store to activate versions from")]
    NoStore,
    /// The store refused (not installed, fails verification, nothing to roll back to).
    #[error("{0}")]
    Model(String),
    #[error("session/start needs \"session\": the slide's name")]
    NoSessionName,
    #[error("session name {0:?} must be 1-64 letters, digits, '-', '_' or '.'")]
    BadSessionName(String),
    #[error("session {0:?} is active; stop it before starting another")]
    SessionActive(String),
    #[error("no session is active")]
    NoSession,
    #[error("cannot store the session: {0}")]
    Store(#[from] OutboxError),
}

/// What `model/...` commands act on: the device's model store. The switch itself follows
/// the store (crate::switch).
pub trait ModelControl: Send + Sync {
    /// Verifies installed version `version` and makes it active.
    fn activate(&self, version: &str) -> Result<(), String>;
    /// Makes the previous version active again; returns it.
    fn rollback(&self) -> Result<String, String>;
}

impl Shared {
    /// Handles one command (`leaf` is the topic part after `cmd/`). A malformed or refused
    /// command changes nothing and gets `ok: false` with the reason.
    pub fn handle_command(&self, leaf: &str, payload: &[u8]) -> ReplyMsg {
        let mut reply = ReplyMsg {
            schema_version: VERSION,
            id: None,
            command: leaf.to_string(),
            ok: false,
            error: None,
            status: None,
        };
        let cmd: CommandMsg = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                // Echo the id when the JSON at least has one.
                reply.id = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from));
                reply.error = Some(format!("malformed command payload: {e}"));
                return reply;
            }
        };
        reply.id = cmd.id.clone();
        if cmd.schema_version != VERSION {
            reply.error = Some(format!(
                "payload version {} is not supported (this device speaks {VERSION})",
                cmd.schema_version
            ));
            return reply;
        }
        let result = match leaf {
            "session/start" => self.start_session(cmd.session.as_deref()),
            "session/stop" => self.stop_session().map(|_| ()),
            "status" => {
                reply.status = Some(self.status("online"));
                Ok(())
            }
            "model/activate" => match (cmd.version.as_deref(), self.model_control()) {
                (None, _) => Err(CommandError::NoVersion),
                (_, None) => Err(CommandError::NoStore),
                (Some(v), Some(c)) => c.activate(v).map_err(CommandError::Model),
            },
            "model/rollback" => match self.model_control() {
                None => Err(CommandError::NoStore),
                Some(c) => c.rollback().map(|_| ()).map_err(CommandError::Model),
            },
            other => Err(CommandError::Unknown(other.to_string())),
        };
        match result {
            Ok(()) => reply.ok = true,
            Err(e) => reply.error = Some(e.to_string()),
        }
        reply
    }

    /// Starts a session (a slide): frames from now on are counted into it.
    pub fn start_session(&self, name: Option<&str>) -> Result<(), CommandError> {
        let name = name.ok_or(CommandError::NoSessionName)?;
        if !valid_id(name) {
            return Err(CommandError::BadSessionName(name.to_string()));
        }
        let mut s = lock(&self.session);
        if let Some(a) = s.as_ref() {
            return Err(CommandError::SessionActive(a.name.clone()));
        }
        let a = ActiveSession {
            name: name.to_string(),
            started_ms: now_ms(),
            session: Session::new(self.model().info.class_names.clone()),
            restarts: 0,
        };
        // Saved before it counts: a crash from here on resumes it.
        lock(&self.outbox).save_session(SessionRow::Save(&a.record(None)))?;
        log::info!("session {name} started");
        *s = Some(a);
        Ok(())
    }

    /// After a start: resumes the session that was active when the service went down without
    /// closing it (a crash, a power cut), or closes it with its summary when its last frame
    /// is older than [`SESSION_RESUME_MAX`] or the served model has other classes. Returns
    /// the session's name and whether it was resumed.
    pub fn resume_session(&self) -> Result<Option<(String, bool)>, CommandError> {
        let Some(bytes) = lock(&self.outbox).saved_session()? else {
            return Ok(None);
        };
        let (mut a, updated_ms) = match ActiveSession::from_record(&bytes) {
            Ok(v) => v,
            Err(e) => {
                log::error!(
                    "the saved session state is unreadable ({e}); it is cleared: {}",
                    String::from_utf8_lossy(&bytes)
                );
                lock(&self.outbox).save_session(SessionRow::Clear)?;
                return Ok(None);
            }
        };
        a.restarts += 1;
        let age = Duration::from_millis(now_ms().saturating_sub(updated_ms));
        let same_classes = a.session.class_names == self.model().info.class_names;
        let name = a.name.clone();
        let mut s = lock(&self.session);
        if age <= SESSION_RESUME_MAX && same_classes {
            lock(&self.outbox).save_session(SessionRow::Save(&a.record(None)))?;
            log::warn!(
                "session {name} resumed after a restart ({} frames so far, last {:.0} s ago)",
                a.session.frames,
                age.as_secs_f64()
            );
            *s = Some(a);
            return Ok(Some((name, true)));
        }
        let why = if same_classes {
            format!("its last frame is {:.0} min old", age.as_secs_f64() / 60.0)
        } else {
            "the model now served has other classes".to_string()
        };
        let seq = self.store_summary(&a, updated_ms)?;
        log::warn!(
            "session {name} was left open by a restart and is closed ({why}; summary seq {seq})"
        );
        Ok(Some((name, false)))
    }

    /// Stops the active session and stores its summary; returns the summary's `seq`.
    pub fn stop_session(&self) -> Result<u64, CommandError> {
        let mut s = lock(&self.session);
        let Some(a) = s.as_ref() else {
            return Err(CommandError::NoSession);
        };
        let seq = self.store_summary(a, now_ms())?;
        log::info!("session {} stopped (summary seq {seq})", a.name);
        *s = None;
        drop(s);
        self.notify.notify_one();
        Ok(seq)
    }

    /// Stores a session's summary, ending at `ended_ms`, and clears the saved session in the
    /// same transaction.
    fn store_summary(&self, a: &ActiveSession, ended_ms: u64) -> Result<u64, CommandError> {
        let props = a.session.proportions();
        let para = a.session.parasitemia_pct();
        let mut msg = SessionMsg {
            schema_version: VERSION,
            seq: 0,
            device: self.settings.device_id.clone(),
            session: a.name.clone(),
            started_ms: a.started_ms,
            ended_ms,
            restarts: a.restarts,
            frames: a.session.frames,
            cells: a.session.counts.per_class.iter().sum(),
            uncertain: a.session.counts.uncertain,
            classes: props
                .into_iter()
                .map(|p| ClassShare {
                    class: p.class,
                    count: p.count,
                    proportion: p.proportion,
                    ci95: [p.ci95.0, p.ci95.1],
                })
                .collect(),
            parasitemia_pct: para.map(|p| p.0),
            parasitemia_ci95: para.map(|p| [p.1 .0, p.1 .1]),
        };
        let topic = self.topic("session");
        let seq = lock(&self.outbox).push_with_session(
            &topic,
            |seq| {
                msg.seq = seq;
                serde_json::to_vec(&msg).expect("serialisable")
            },
            SessionRow::Clear,
        )?;
        self.notify.notify_one();
        Ok(seq)
    }

    /// Stores a `model` event (the served model changed by itself) for the broker; returns
    /// its `seq`.
    pub fn model_event(
        &self,
        event: &str,
        from: &str,
        to: &str,
        reason: &str,
    ) -> Result<u64, CommandError> {
        let mut msg = ModelEventMsg {
            schema_version: VERSION,
            seq: 0,
            device: self.settings.device_id.clone(),
            time_ms: now_ms(),
            event: event.into(),
            from: from.into(),
            to: to.into(),
            reason: reason.into(),
        };
        let seq = lock(&self.outbox).push(&self.topic("model"), |seq| {
            msg.seq = seq;
            serde_json::to_vec(&msg).expect("serialisable")
        })?;
        self.notify.notify_one();
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use reddino_models::preprocess::{CropPolicy, Normalization};

    use crate::cells::CellFinderConfig;
    use crate::publish::messages::{ReplyMsg, SessionMsg};
    use crate::publish::outbox::{Outbox, OutboxLimits};

    use super::super::state::{lock, ModelInfo, PipelineSettings, Shared};
    use crate::publish::outbox::SessionRow;

    fn shared(dir: &tempfile::TempDir) -> Arc<Shared> {
        let settings = PipelineSettings {
            device_id: "scope-1".into(),
            topic_prefix: "reddino".into(),
            cells: CellFinderConfig::default(),
            crop: CropPolicy::default(),
            min_confidence: 0.5,
            frame_queue: 2,
            crop_queue: 2,
            camera_retry_max: Duration::from_secs(1),
            batch_wait: Duration::ZERO,
            camera_stall: Duration::from_secs(10),
            cpu_threads: 1,
            frame_workers: 0,
        };
        let model = ModelInfo {
            id: "test@1".into(),
            sha256: "0".repeat(64),
            backend: "tract".into(),
            provider: "cpu".into(),
            backend_detail: "tract".into(),
            class_names: vec!["normal".into(), "target".into()],
            normalization: Normalization::default(),
            input_size: 14,
            size: None,
        };
        let outbox = Outbox::open(&dir.path().join("outbox.db"), OutboxLimits::default()).unwrap();
        Shared::new(settings, model, outbox, Arc::new(AtomicBool::new(false)))
    }

    fn stored(sh: &Shared) -> Vec<(String, Vec<u8>)> {
        lock(&sh.outbox)
            .pending_after(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| (e.topic, e.payload))
            .collect()
    }

    fn refused(r: &ReplyMsg, needle: &str) {
        assert!(!r.ok, "{r:?}");
        let e = r.error.as_deref().unwrap_or_default();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }

    #[test]
    fn malformed_json_is_refused_and_echoes_the_id_it_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(&dir);
        let r = sh.handle_command("session/start", b"{not json");
        refused(&r, "malformed command payload");
        assert_eq!(r.id, None);
        // Valid JSON with an id but the wrong shape: the id comes back.
        let r = sh.handle_command("session/start", br#"{"id":"abc","schema_version":"one"}"#);
        refused(&r, "malformed command payload");
        assert_eq!(r.id.as_deref(), Some("abc"));
        assert_eq!(r.command, "session/start");
        assert!(lock(&sh.session).is_none());
        assert!(stored(&sh).is_empty());
    }

    #[test]
    fn other_schema_versions_and_unknown_commands_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(&dir);
        let r = sh.handle_command(
            "session/start",
            br#"{"schema_version":2,"id":"x","session":"slide-1"}"#,
        );
        refused(&r, "version 2 is not supported");
        assert_eq!(r.id.as_deref(), Some("x"));
        assert!(lock(&sh.session).is_none());
        let r = sh.handle_command("reboot", br#"{"schema_version":1}"#);
        refused(&r, "unknown command \"reboot\"");
        assert!(stored(&sh).is_empty());
    }

    #[test]
    fn session_names_are_checked_and_one_session_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(&dir);
        refused(
            &sh.handle_command("session/start", br#"{"schema_version":1}"#),
            "needs \"session\"",
        );
        refused(
            &sh.handle_command(
                "session/start",
                br#"{"schema_version":1,"session":"../etc"}"#,
            ),
            "must be 1-64 letters",
        );
        assert!(lock(&sh.session).is_none());
        let r = sh.handle_command(
            "session/start",
            br#"{"schema_version":1,"id":"s1","session":"slide-1"}"#,
        );
        assert!(r.ok, "{r:?}");
        assert_eq!(r.id.as_deref(), Some("s1"));
        refused(
            &sh.handle_command(
                "session/start",
                br#"{"schema_version":1,"session":"slide-2"}"#,
            ),
            "session \"slide-1\" is active",
        );
        assert_eq!(lock(&sh.session).as_ref().unwrap().name, "slide-1");
    }

    #[test]
    fn stop_stores_the_summary_in_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(&dir);
        refused(
            &sh.handle_command("session/stop", br#"{"schema_version":1}"#),
            "no session is active",
        );
        assert!(
            sh.handle_command(
                "session/start",
                br#"{"schema_version":1,"session":"slide-7"}"#
            )
            .ok
        );
        // Two frames counted into the session.
        {
            let mut s = lock(&sh.session);
            let a = s.as_mut().unwrap();
            let mut c = crate::classify::Counts::new(2);
            c.per_class = vec![3, 1];
            a.session.add_frame(&c);
            a.session.add_frame(&c);
        }
        let r = sh.handle_command("session/stop", br#"{"schema_version":1,"id":"end"}"#);
        assert!(r.ok, "{r:?}");
        assert!(lock(&sh.session).is_none());
        let out = stored(&sh);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "reddino/scope-1/session");
        let msg: SessionMsg = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(msg.session, "slide-7");
        assert_eq!(msg.device, "scope-1");
        assert_eq!((msg.frames, msg.cells), (2, 8));
        assert_eq!(msg.seq, 1);
        let normal = msg.classes.iter().find(|c| c.class == "normal").unwrap();
        assert_eq!(normal.count, 6);
        assert!((normal.proportion - 0.75).abs() < 1e-9);
        // A second stop is refused and stores nothing more.
        refused(
            &sh.handle_command("session/stop", br#"{"schema_version":1}"#),
            "no session is active",
        );
        assert_eq!(stored(&sh).len(), 1);
    }

    #[test]
    fn status_reply_carries_the_device_state() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(&dir);
        sh.start_session(Some("slide-3")).unwrap();
        let r = sh.handle_command("status", br#"{"schema_version":1,"id":"q"}"#);
        assert!(r.ok, "{r:?}");
        let st = r.status.expect("status in the reply");
        assert_eq!(st.device, "scope-1");
        assert_eq!(st.state, "online");
        assert_eq!(st.model.as_deref(), Some("test@1"));
        assert_eq!(st.session.as_deref(), Some("slide-3"));
        assert_eq!(st.outbox.pending, 0);
    }

    /// A store stand-in that records what it was asked.
    struct FakeStore(std::sync::Mutex<Vec<String>>);

    impl super::ModelControl for FakeStore {
        fn activate(&self, version: &str) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("activate {version}"));
            if version == "rbc-9" {
                Err("rbc-9 is not installed (installed: rbc-1)".into())
            } else {
                Ok(())
            }
        }
        fn rollback(&self) -> Result<String, String> {
            self.0.lock().unwrap().push("rollback".into());
            Err("no previous model version to roll back to".into())
        }
    }

    #[test]
    fn model_commands_need_a_store_and_a_version_and_pass_refusals_on() {
        let dir = tempfile::tempdir().unwrap();
        let sh = shared(&dir);
        let v1 = br#"{"schema_version":1,"id":"m1","version":"rbc-1"}"#;
        refused(&sh.handle_command("model/activate", v1), "no model store");
        refused(
            &sh.handle_command("model/rollback", br#"{"schema_version":1}"#),
            "no model store",
        );
        let store = Arc::new(FakeStore(Default::default()));
        sh.set_model_control(store.clone());
        refused(
            &sh.handle_command("model/activate", br#"{"schema_version":1}"#),
            "needs \"version\"",
        );
        let r = sh.handle_command("model/activate", v1);
        assert!(r.ok && r.id.as_deref() == Some("m1"), "{r:?}");
        refused(
            &sh.handle_command(
                "model/activate",
                br#"{"schema_version":1,"version":"rbc-9"}"#,
            ),
            "not installed",
        );
        refused(
            &sh.handle_command("model/rollback", br#"{"schema_version":1}"#),
            "no previous",
        );
        assert_eq!(
            *store.0.lock().unwrap(),
            ["activate rbc-1", "activate rbc-9", "rollback"]
        );
        // Nothing was stored for the broker by a command that only moves the store.
        assert!(stored(&sh).is_empty());
    }

    /// A service's state directory reopened after a crash: the same outbox file, with the
    /// session `name` saved as `edit` leaves its record.
    fn reopened(dir: &tempfile::TempDir, edit: impl FnOnce(&mut serde_json::Value)) -> Arc<Shared> {
        let sh = shared(dir);
        sh.start_session(Some("slide-9")).unwrap();
        let bytes = lock(&sh.outbox).saved_session().unwrap().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["frames"] = 4.into();
        v["per_class"] = serde_json::json!([30, 2]);
        v["uncertain"] = 1.into();
        edit(&mut v);
        lock(&sh.outbox)
            .save_session(SessionRow::Save(&serde_json::to_vec(&v).unwrap()))
            .unwrap();
        drop(sh);
        shared(dir)
    }

    #[test]
    fn a_recent_session_is_resumed_after_a_restart_with_its_counts() {
        let dir = tempfile::tempdir().unwrap();
        let sh = reopened(&dir, |_| {});
        assert_eq!(
            sh.resume_session().unwrap(),
            Some(("slide-9".to_string(), true))
        );
        assert!(stored(&sh).is_empty(), "resumed, not closed");
        let seq = sh.stop_session().unwrap();
        let (topic, body) = stored(&sh).pop().unwrap();
        assert_eq!(topic, "reddino/scope-1/session");
        let m: SessionMsg = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (m.seq, m.frames, m.cells, m.uncertain, m.restarts),
            (seq, 4, 32, 1, 1)
        );
        // Stopped: nothing left to resume.
        assert!(lock(&sh.outbox).saved_session().unwrap().is_none());
        drop(sh);
        assert_eq!(shared(&dir).resume_session().unwrap(), None);
    }

    #[test]
    fn an_old_session_or_one_of_other_classes_is_closed_with_its_summary() {
        for (what, edit) in [
            (
                "old",
                Box::new(|v: &mut serde_json::Value| {
                    let old = super::now_ms() - 20 * 60 * 1000;
                    v["updated_ms"] = old.into();
                }) as Box<dyn FnOnce(&mut serde_json::Value)>,
            ),
            (
                "classes",
                Box::new(|v: &mut serde_json::Value| {
                    v["class_names"] = serde_json::json!(["a", "b"]);
                }),
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let sh = reopened(&dir, edit);
            assert_eq!(
                sh.resume_session().unwrap(),
                Some(("slide-9".to_string(), false)),
                "{what}"
            );
            assert!(lock(&sh.session).is_none(), "{what}");
            let rows = stored(&sh);
            assert_eq!(rows.len(), 1, "{what}");
            let m: SessionMsg = serde_json::from_slice(&rows[0].1).unwrap();
            assert_eq!(
                (m.session.as_str(), m.frames, m.restarts),
                ("slide-9", 4, 1),
                "{what}"
            );
            assert!(
                lock(&sh.outbox).saved_session().unwrap().is_none(),
                "{what}"
            );
        }
    }

    #[test]
    fn an_unreadable_saved_session_is_cleared_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sh = reopened(&dir, |v| v["per_class"] = serde_json::json!([1]));
        assert_eq!(sh.resume_session().unwrap(), None);
        assert!(lock(&sh.outbox).saved_session().unwrap().is_none());
        assert!(lock(&sh.session).is_none());
    }
}
