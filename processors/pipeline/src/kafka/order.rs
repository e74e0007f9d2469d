//! Per-key order: a record waits for the previous in-flight record with the same key (and
//! partition) to finish before it starts, so outputs and rows follow partition order per key,
//! while records of different keys run concurrently.

use std::collections::HashMap;

use futures::future::Shared;
use futures::FutureExt;
use tokio::sync::oneshot;

/// A key within its partition.
pub(crate) type KeyId = (i32, Vec<u8>);

/// What a record waits for before it starts: the previous record of its key finishing.
pub(crate) type Predecessor = Shared<oneshot::Receiver<()>>;

/// The queue of in-flight records per key.
#[derive(Default)]
pub(crate) struct KeyOrder {
    /// Per key: the sequence number of the last admitted record and a receiver that resolves
    /// when it finished.
    tails: HashMap<KeyId, (u64, Predecessor)>,
    next: u64,
}

/// A record's place in its key's queue.
pub(crate) struct Ticket {
    /// Its sequence number (for [`KeyOrder::leave`]).
    pub seq: u64,
    /// The previous record of the key, if one is still in flight: wait for it first.
    pub after: Option<Predecessor>,
    /// Dropped (or sent) when this record finished: releases the next record of the key.
    pub done: oneshot::Sender<()>,
}

impl KeyOrder {
    /// Admit a record of key `id`.
    pub fn enter(&mut self, id: KeyId) -> Ticket {
        let (done, rx) = oneshot::channel();
        let seq = self.next;
        self.next += 1;
        let after = self.tails.insert(id, (seq, rx.shared())).map(|(_, r)| r);
        Ticket { seq, after, done }
    }

    /// A record finished: forget its key unless a later record of the key is queued behind it.
    pub fn leave(&mut self, id: &KeyId, seq: u64) {
        if self.tails.get(id).is_some_and(|(s, _)| *s == seq) {
            self.tails.remove(id);
        }
    }

    /// Keys with a record in flight.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tails.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32, k: &str) -> KeyId {
        (p, k.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_record_waits_only_for_the_previous_record_of_its_key() {
        let mut order = KeyOrder::default();
        let a1 = order.enter(key(0, "a"));
        let b1 = order.enter(key(0, "b"));
        let a2 = order.enter(key(0, "a"));
        let a_other_partition = order.enter(key(1, "a"));
        assert!(a1.after.is_none() && b1.after.is_none() && a_other_partition.after.is_none());
        let wait = a2.after.clone().expect("a2 waits for a1");
        assert!(wait.clone().now_or_never().is_none(), "a1 still in flight");
        drop(a1.done);
        assert!(wait.now_or_never().is_some(), "a1 finished: a2 may start");
    }

    #[test]
    fn keys_are_forgotten_only_when_their_last_record_leaves() {
        let mut order = KeyOrder::default();
        let a1 = order.enter(key(0, "a"));
        let a2 = order.enter(key(0, "a"));
        assert_eq!(order.len(), 1);
        order.leave(&key(0, "a"), a1.seq);
        assert_eq!(order.len(), 1, "a2 still queued behind");
        order.leave(&key(0, "a"), a2.seq);
        assert_eq!(order.len(), 0);
        // A late leave of an old sequence number does not drop a newer tail.
        let a3 = order.enter(key(0, "a"));
        order.leave(&key(0, "a"), a1.seq);
        assert_eq!(order.len(), 1);
        order.leave(&key(0, "a"), a3.seq);
        assert_eq!(order.len(), 0);
    }
}
