//! A bounded queue between pipeline stages. A live producer (a camera) never waits: when the
//! queue is full the oldest item is dropped and counted. An offline producer (files, the
//! synthetic microscope without pacing) waits for room instead, so nothing is dropped.
//! Memory stays bounded either way.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The queue was closed and has nothing left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
    dropped: u64,
}

pub struct Queue<T> {
    cap: usize,
    inner: Mutex<Inner<T>>,
    not_empty: Condvar,
    not_full: Condvar,
}

impl<T> Queue<T> {
    pub fn new(cap: usize) -> Self {
        Queue {
            cap: cap.max(1),
            inner: Mutex::new(Inner {
                items: VecDeque::with_capacity(cap.max(1)),
                closed: false,
                dropped: 0,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item, dropping the oldest when full. Returns the dropped item, if any.
    /// After `close` the item is handed back.
    pub fn push_drop_oldest(&self, item: T) -> Result<Option<T>, T> {
        let mut g = self.lock();
        if g.closed {
            return Err(item);
        }
        let dropped = if g.items.len() >= self.cap {
            g.dropped += 1;
            g.items.pop_front()
        } else {
            None
        };
        g.items.push_back(item);
        drop(g);
        self.not_empty.notify_one();
        Ok(dropped)
    }

    /// Adds an item, waiting for room. After `close` the item is handed back.
    pub fn push_wait(&self, item: T) -> Result<(), T> {
        let mut g = self.lock();
        while g.items.len() >= self.cap && !g.closed {
            g = self.not_full.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.closed {
            return Err(item);
        }
        g.items.push_back(item);
        drop(g);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Takes the oldest item, waiting up to `timeout`. `Ok(None)` on timeout; `Err(Closed)`
    /// when the queue is closed and empty.
    pub fn pop_timeout(&self, timeout: Duration) -> Result<Option<T>, Closed> {
        let mut g = self.lock();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(item) = g.items.pop_front() {
                drop(g);
                self.not_full.notify_one();
                return Ok(Some(item));
            }
            if g.closed {
                return Err(Closed);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            g = self
                .not_empty
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// No more items will come; waiting consumers drain what is left, then see the end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Items dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts() {
        let q = Queue::new(2);
        assert_eq!(q.push_drop_oldest(1).unwrap(), None);
        assert_eq!(q.push_drop_oldest(2).unwrap(), None);
        assert_eq!(q.push_drop_oldest(3).unwrap(), Some(1));
        assert_eq!(q.len(), 2);
        assert_eq!(q.dropped(), 1);
        assert_eq!(q.pop_timeout(Duration::ZERO).unwrap(), Some(2));
        assert_eq!(q.pop_timeout(Duration::ZERO).unwrap(), Some(3));
        assert_eq!(q.pop_timeout(Duration::from_millis(1)).unwrap(), None);
        q.close();
        assert_eq!(q.pop_timeout(Duration::ZERO), Err(Closed));
        assert_eq!(q.push_drop_oldest(4), Err(4));
    }

    #[test]
    fn push_wait_blocks_until_room_and_loses_nothing() {
        let q = Arc::new(Queue::new(1));
        let p = {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    q.push_wait(i).unwrap();
                }
                q.close();
            })
        };
        let mut got = Vec::new();
        while let Ok(item) = q.pop_timeout(Duration::from_secs(5)) {
            if let Some(i) = item {
                assert!(q.len() <= 1);
                got.push(i);
            }
        }
        p.join().unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(q.dropped(), 0);
    }

    #[test]
    fn close_releases_a_waiting_producer() {
        let q = Arc::new(Queue::new(1));
        q.push_wait(0).unwrap();
        let p = {
            let q = q.clone();
            std::thread::spawn(move || q.push_wait(1))
        };
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert_eq!(p.join().unwrap(), Err(1));
    }
}
