//! The durable outbox: every result is written here (SQLite, WAL, synchronous=FULL) before it is
//! published, and deleted only when the broker acknowledges it. Sequence numbers are allocated
//! in the same transaction as the row, so they are per-device monotonic across restarts and never
//! reused, even after rows are deleted or dropped.
//!
//! The outbox is capped by row count and by age; when a cap is exceeded the oldest rows are
//! dropped and counted (the count survives restarts and is reported in `status`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::now_ms;

/// Why the outbox could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("outbox {path}: cannot create its directory: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Limits on what the outbox keeps while the broker is unreachable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxLimits {
    /// Most rows kept; the oldest are dropped beyond it.
    pub max_rows: u64,
    /// Rows older than this are dropped.
    pub max_age: Duration,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_rows: 100_000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    /// Milliseconds since the Unix epoch when it was stored.
    pub created_ms: u64,
}

/// What a push does to the saved session state (its bytes are the pipeline's business).
#[derive(Debug, Clone, Copy)]
pub enum SessionRow<'a> {
    Keep,
    Save(&'a [u8]),
    Clear,
}

/// The outbox. One connection; share it behind a mutex.
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    limits: OutboxLimits,
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`.
    pub fn open(path: &Path, limits: OutboxLimits) -> Result<Self, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OutboxError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| OutboxError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
        let ob = Outbox {
            conn,
            path: path.to_path_buf(),
            limits,
        };
        ob.conn
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 PRAGMA synchronous=FULL;
                 PRAGMA busy_timeout=5000;
                 CREATE TABLE IF NOT EXISTS outbox (
                     seq INTEGER PRIMARY KEY,
                     topic TEXT NOT NULL,
                     payload BLOB NOT NULL,
                     created_ms INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS session (id INTEGER PRIMARY KEY CHECK (id = 1),
                                                     state BLOB NOT NULL);
                 INSERT OR IGNORE INTO meta VALUES ('next_seq', 1);
                 INSERT OR IGNORE INTO meta VALUES ('dropped', 0);",
            )
            .map_err(|e| ob.err(e))?;
        Ok(ob)
    }

    fn err(&self, source: rusqlite::Error) -> OutboxError {
        OutboxError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Caps the database at its present size (SQLite's `max_page_count`), so that every write
    /// needing a new page fails as on a full disk; `false` lifts the cap. The fault tests'
    /// full disk, without a file system to fill.
    pub fn set_full(&mut self, full: bool) -> Result<(), OutboxError> {
        let pages: u64 = if full {
            self.conn
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(|e| self.err(e))?
        } else {
            0xFFFF_FFFE
        };
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(|e| self.err(e))
    }

    /// Stores a message whose payload depends on its sequence number; returns the number.
    /// The row is on disk when this returns.
    pub fn push(
        &mut self,
        topic: &str,
        payload: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<u64, OutboxError> {
        self.push_with_session(topic, payload, SessionRow::Keep)
    }

    /// [`Outbox::push`], and in the same transaction the active session's saved state
    /// replaced or cleared: after a crash the session row covers exactly the stored messages.
    pub fn push_with_session(
        &mut self,
        topic: &str,
        payload: impl FnOnce(u64) -> Vec<u8>,
        session: SessionRow<'_>,
    ) -> Result<u64, OutboxError> {
        let path = self.path.clone();
        let e = |source| OutboxError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        let seq: u64 = tx
            .query_row("SELECT value FROM meta WHERE key='next_seq'", [], |r| {
                r.get(0)
            })
            .map_err(e)?;
        let body = payload(seq);
        tx.execute(
            "INSERT INTO outbox (seq, topic, payload, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![seq, topic, body, now_ms()],
        )
        .map_err(e)?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key='next_seq'",
            params![seq + 1],
        )
        .map_err(e)?;
        Self::enforce(&tx, &self.limits).map_err(e)?;
        Self::write_session(&tx, session).map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(seq)
    }

    fn write_session(tx: &rusqlite::Transaction, session: SessionRow<'_>) -> rusqlite::Result<()> {
        match session {
            SessionRow::Keep => Ok(()),
            SessionRow::Save(state) => tx
                .execute(
                    "INSERT OR REPLACE INTO session (id, state) VALUES (1, ?1)",
                    params![state],
                )
                .map(|_| ()),
            SessionRow::Clear => tx.execute("DELETE FROM session", []).map(|_| ()),
        }
    }

    /// Saves (or clears) the active session's state on its own (a session start).
    pub fn save_session(&mut self, session: SessionRow<'_>) -> Result<(), OutboxError> {
        let path = self.path.clone();
        let e = |source| OutboxError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        Self::write_session(&tx, session).map_err(e)?;
        tx.commit().map_err(e)
    }

    /// The saved state of the session that was active when the service last stopped without
    /// closing it (a crash or a power cut), if any.
    pub fn saved_session(&self) -> Result<Option<Vec<u8>>, OutboxError> {
        self.conn
            .query_row("SELECT state FROM session WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    fn enforce(tx: &rusqlite::Transaction, limits: &OutboxLimits) -> rusqlite::Result<()> {
        let cutoff = now_ms().saturating_sub(limits.max_age.as_millis() as u64);
        let old = tx.execute("DELETE FROM outbox WHERE created_ms < ?1", params![cutoff])?;
        let rows: u64 = tx.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        let mut over = 0;
        if rows > limits.max_rows {
            over = tx.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)",
                params![rows - limits.max_rows],
            )?;
        }
        let dropped = (old + over) as u64;
        if dropped > 0 {
            log::warn!("outbox full or stale: dropped the {dropped} oldest unsent results");
            tx.execute(
                "UPDATE meta SET value = value + ?1 WHERE key='dropped'",
                params![dropped],
            )?;
        }
        Ok(())
    }

    /// Drops rows past the age limit now (also done on every push).
    pub fn expire(&mut self) -> Result<(), OutboxError> {
        let path = self.path.clone();
        let e = |source| OutboxError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(e)?;
        Self::enforce(&tx, &self.limits).map_err(e)?;
        tx.commit().map_err(e)
    }

    /// Up to `limit` stored messages with `seq > after`, in `seq` order.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, topic, payload, created_ms FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, limit as u64], |r| {
                Ok(Entry {
                    seq: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    created_ms: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Deletes an acknowledged message. Unknown numbers are ignored (a duplicate ack).
    pub fn ack(&mut self, seq: u64) -> Result<bool, OutboxError> {
        let n = self
            .conn
            .execute("DELETE FROM outbox WHERE seq = ?1", params![seq])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Messages waiting for an acknowledgement.
    pub fn len(&self) -> Result<u64, OutboxError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }

    /// Messages dropped by the caps since the outbox was created.
    pub fn dropped(&self) -> Result<u64, OutboxError> {
        self.meta("dropped").map(|v| v.unwrap_or(0))
    }

    /// The sequence number the next message will get.
    pub fn next_seq(&self) -> Result<u64, OutboxError> {
        self.meta("next_seq").map(|v| v.unwrap_or(1))
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, OutboxError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq}}}").into_bytes()
    }

    #[test]
    fn sequence_numbers_survive_reopen_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/outbox.db");
        let mut ob = Outbox::open(&p, OutboxLimits::default()).unwrap();
        assert_eq!(ob.push("t", body).unwrap(), 1);
        assert_eq!(ob.push("t", body).unwrap(), 2);
        assert!(ob.ack(2).unwrap());
        assert!(!ob.ack(2).unwrap(), "second ack of the same seq is a no-op");
        drop(ob);
        let mut ob = Outbox::open(&p, OutboxLimits::default()).unwrap();
        assert_eq!(ob.push("t", body).unwrap(), 3, "numbers are never reused");
        let pending = ob.pending_after(0, 10).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(pending[1].payload, body(3));
        assert_eq!(ob.pending_after(1, 10).unwrap().len(), 1);
        assert_eq!(ob.len().unwrap(), 2);
    }

    #[test]
    fn row_cap_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.db");
        let limits = OutboxLimits {
            max_rows: 3,
            ..OutboxLimits::default()
        };
        let mut ob = Outbox::open(&p, limits).unwrap();
        for _ in 0..5 {
            ob.push("t", body).unwrap();
        }
        let seqs: Vec<u64> = ob
            .pending_after(0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(ob.dropped().unwrap(), 2);
        drop(ob);
        let ob = Outbox::open(&p, limits).unwrap();
        assert_eq!(ob.dropped().unwrap(), 2, "the drop count is persistent");
    }

    #[test]
    fn age_cap_drops_stale_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(
            &dir.path().join("o.db"),
            OutboxLimits {
                max_rows: 100,
                max_age: Duration::from_millis(50),
            },
        )
        .unwrap();
        ob.push("t", body).unwrap();
        std::thread::sleep(Duration::from_millis(120));
        ob.push("t", body).unwrap();
        assert_eq!(ob.pending_after(0, 10).unwrap()[0].seq, 2);
        assert_eq!(ob.dropped().unwrap(), 1);
    }

    #[test]
    fn unwritable_location_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = Outbox::open(&file.join("o.db"), OutboxLimits::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("o.db"), "{e}");
    }
}
