//! The delivery state of one broker connection, apart from the event loop that drives it (as
//! rumqttc keeps its `MqttState` apart from its network loop): which publishes were handed to
//! the client and in what order, which packet id each one got, which are still unacknowledged.
//!
//! The outbox is the only record of what is unsent. Rows are handed over in `seq` order from
//! the oldest one, at most `max_inflight` outstanding; a row is deleted only when the PUBACK for
//! its packet id arrives, in whatever order PUBACKs come. A new connection starts from a fresh
//! [`Delivery`], so everything still in the outbox is sent again, oldest first: a subscriber
//! sees every `seq` at least once and de-duplicates on it.

use std::collections::{HashMap, VecDeque};

use super::outbox::{Outbox, OutboxError};

/// One QoS 1 publish handed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// The outbox row with this `seq`.
    Row(u64),
    /// Anything else (status, a reply): not in the outbox, nothing to delete.
    Other,
}

/// Where publishes go: the MQTT client, or a recorder in tests. `Err` means the publish was
/// not taken (the client's queue is full or closed).
pub trait Sink {
    fn publish(&mut self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), String>;
}

/// The publishes of one connection.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Handed to the client, packet id not known yet, oldest first: the client gives ids in
    /// the order it was handed publishes (`Outgoing::Publish`).
    queued: VecDeque<Tag>,
    /// Sent with this packet id, not acknowledged yet.
    inflight: HashMap<u16, Tag>,
    /// Highest `seq` handed to this connection.
    sent_upto: u64,
    connected: bool,
}

impl Delivery {
    /// A new connection: nothing handed over, not connected yet.
    pub fn new() -> Self {
        Delivery::default()
    }

    /// The broker accepted the connection (CONNACK): rows may be handed over.
    pub fn connected(&mut self) {
        self.connected = true;
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Publishes handed over and not acknowledged.
    pub fn outstanding(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }

    /// Publishes handed over that have no packet id yet.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Highest `seq` handed to this connection (0: none).
    pub fn sent_upto(&self) -> u64 {
        self.sent_upto
    }

    /// Hands the next outbox rows to `sink`, oldest first, until `max_inflight` are
    /// outstanding or the sink refuses one; returns how many rows were handed over. Nothing
    /// before the connection is accepted.
    pub fn pump(
        &mut self,
        outbox: &Outbox,
        sink: &mut impl Sink,
        max_inflight: usize,
    ) -> Result<usize, OutboxError> {
        if !self.connected {
            return Ok(0);
        }
        let room = max_inflight.saturating_sub(self.outstanding());
        if room == 0 {
            return Ok(0);
        }
        let mut handed = 0;
        for row in outbox.pending_after(self.sent_upto, room)? {
            if let Err(e) = sink.publish(row.topic, false, row.payload) {
                log::warn!("MQTT: cannot queue seq {}: {e}", row.seq);
                break;
            }
            self.queued.push_back(Tag::Row(row.seq));
            self.sent_upto = row.seq;
            handed += 1;
        }
        Ok(handed)
    }

    /// Hands a message that is not an outbox row to `sink`; whether it was taken.
    pub fn send_other(
        &mut self,
        sink: &mut impl Sink,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    ) -> bool {
        match sink.publish(topic, retain, payload) {
            Ok(()) => {
                self.queued.push_back(Tag::Other);
                true
            }
            Err(e) => {
                log::warn!("MQTT: cannot queue a message: {e}");
                false
            }
        }
    }

    /// The client sent the oldest handed publish with packet id `pkid`; returns its tag.
    pub fn sent(&mut self, pkid: u16) -> Option<Tag> {
        let tag = self.queued.pop_front()?;
        self.inflight.insert(pkid, tag);
        Some(tag)
    }

    /// A PUBACK for `pkid`: deletes the row it acknowledges from `outbox` and returns its tag;
    /// `None` for a packet id this connection is not waiting for (a duplicate PUBACK).
    pub fn acked(&mut self, pkid: u16, outbox: &mut Outbox) -> Result<Option<Tag>, OutboxError> {
        let Some(tag) = self.inflight.remove(&pkid) else {
            return Ok(None);
        };
        if let Tag::Row(seq) = tag {
            outbox.ack(seq)?;
        }
        Ok(Some(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::outbox::OutboxLimits;

    /// A client that takes up to `room` publishes and numbers them as rumqttc does (1, 2, ...).
    #[derive(Default)]
    struct Recorder {
        sent: Vec<(String, bool, Vec<u8>)>,
        refuse: bool,
    }

    impl Sink for Recorder {
        fn publish(&mut self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), String> {
            if self.refuse {
                return Err("queue full".into());
            }
            self.sent.push((topic, retain, payload));
            Ok(())
        }
    }

    fn outbox_with(dir: &tempfile::TempDir, n: u64) -> Outbox {
        let mut ob = Outbox::open(&dir.path().join("outbox.db"), OutboxLimits::default()).unwrap();
        for _ in 0..n {
            ob.push("t/counts", |seq| format!("{seq}").into_bytes())
                .unwrap();
        }
        ob
    }

    fn seqs(r: &Recorder) -> Vec<u64> {
        r.sent
            .iter()
            .map(|(_, _, p)| String::from_utf8(p.clone()).unwrap().parse().unwrap())
            .collect()
    }

    /// Sends everything handed over: packet ids `first..` in order.
    fn send_all(d: &mut Delivery, first: u16) -> Vec<(u16, Tag)> {
        let mut out = vec![];
        let mut id = first;
        while let Some(tag) = d.sent(id) {
            out.push((id, tag));
            id += 1;
        }
        out
    }

    #[test]
    fn rows_go_out_in_seq_order_up_to_the_inflight_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ob = outbox_with(&dir, 5);
        let mut d = Delivery::new();
        let mut sink = Recorder::default();
        assert_eq!(
            d.pump(&ob, &mut sink, 3).unwrap(),
            0,
            "nothing before CONNACK"
        );
        d.connected();
        assert_eq!(d.pump(&ob, &mut sink, 3).unwrap(), 3);
        assert_eq!(seqs(&sink), [1, 2, 3]);
        // Full: nothing more until something is acknowledged, and nothing twice.
        assert_eq!(d.pump(&ob, &mut sink, 3).unwrap(), 0);
        assert_eq!(d.outstanding(), 3);
        assert_eq!(d.sent_upto(), 3);
        let sent = send_all(&mut d, 1);
        assert_eq!(sent, [(1, Tag::Row(1)), (2, Tag::Row(2)), (3, Tag::Row(3))]);
    }

    #[test]
    fn pubacks_out_of_order_delete_exactly_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = outbox_with(&dir, 4);
        let mut d = Delivery::new();
        let mut sink = Recorder::default();
        d.connected();
        d.pump(&ob, &mut sink, 4).unwrap();
        send_all(&mut d, 10);
        // Acknowledged 3rd, then 1st: rows 3 and 1 go, 2 and 4 stay.
        assert_eq!(d.acked(12, &mut ob).unwrap(), Some(Tag::Row(3)));
        assert_eq!(d.acked(10, &mut ob).unwrap(), Some(Tag::Row(1)));
        let left: Vec<u64> = ob
            .pending_after(0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [2, 4]);
        assert_eq!(d.outstanding(), 2);
        // Room again: the next rows go out (none left here beyond those in flight).
        assert_eq!(d.pump(&ob, &mut sink, 4).unwrap(), 0);
        assert_eq!(seqs(&sink), [1, 2, 3, 4]);
    }

    #[test]
    fn a_reconnect_sends_again_what_is_unacknowledged_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = outbox_with(&dir, 5);
        let mut d = Delivery::new();
        let mut sink = Recorder::default();
        d.connected();
        d.pump(&ob, &mut sink, 5).unwrap();
        send_all(&mut d, 1);
        d.acked(2, &mut ob).unwrap();
        d.acked(4, &mut ob).unwrap();
        // The connection drops; a new one starts from a fresh state.
        let mut d = Delivery::new();
        let mut again = Recorder::default();
        d.connected();
        assert_eq!(d.pump(&ob, &mut again, 2).unwrap(), 2);
        assert_eq!(seqs(&again), [1, 3]);
        send_all(&mut d, 1);
        d.acked(1, &mut ob).unwrap();
        d.pump(&ob, &mut again, 2).unwrap();
        assert_eq!(seqs(&again), [1, 3, 5]);
    }

    #[test]
    fn duplicate_and_unknown_pubacks_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = outbox_with(&dir, 2);
        let mut d = Delivery::new();
        let mut sink = Recorder::default();
        d.connected();
        d.pump(&ob, &mut sink, 5).unwrap();
        send_all(&mut d, 1);
        assert_eq!(d.acked(1, &mut ob).unwrap(), Some(Tag::Row(1)));
        assert_eq!(d.acked(1, &mut ob).unwrap(), None, "a second PUBACK");
        assert_eq!(d.acked(99, &mut ob).unwrap(), None, "an id never sent");
        assert_eq!(ob.len().unwrap(), 1);
        assert_eq!(d.outstanding(), 1);
        // A message that is not a row is tracked but deletes nothing.
        assert!(d.send_other(&mut sink, "t/status".into(), true, b"{}".to_vec()));
        assert_eq!(d.sent(3), Some(Tag::Other));
        assert_eq!(d.acked(3, &mut ob).unwrap(), Some(Tag::Other));
        assert_eq!(ob.len().unwrap(), 1);
        assert!(sink.sent.last().unwrap().1, "the status is retained");
    }

    #[test]
    fn a_refused_publish_is_handed_over_again_on_the_next_pump() {
        let dir = tempfile::tempdir().unwrap();
        let ob = outbox_with(&dir, 3);
        let mut d = Delivery::new();
        let mut sink = Recorder {
            refuse: true,
            ..Recorder::default()
        };
        d.connected();
        assert_eq!(d.pump(&ob, &mut sink, 5).unwrap(), 0);
        assert_eq!(d.sent_upto(), 0);
        sink.refuse = false;
        assert_eq!(d.pump(&ob, &mut sink, 5).unwrap(), 3);
        assert_eq!(seqs(&sink), [1, 2, 3]);
    }
}
