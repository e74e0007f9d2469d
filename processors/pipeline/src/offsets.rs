//! Per-partition offset watermarks for at-least-once delivery.
//!
//! Records of one partition finish out of order (batches, retries). An offset may be stored for
//! commit only when every earlier record of its partition is fully handled, so the tracker keeps
//! the set of offsets still in flight per partition and reports the *next offset to consume*
//! (Kafka's commit semantics: last handled + 1) whenever that contiguous watermark advances.

use std::collections::{BTreeSet, HashMap};

/// Topic and partition.
pub type Partition = (String, i32);

#[derive(Debug, Default)]
struct State {
    /// Offsets read and not yet handled.
    pending: BTreeSet<i64>,
    /// Highest offset ever begun.
    highest: Option<i64>,
    /// Last value reported as committable (next offset to consume).
    stored: Option<i64>,
}

/// Tracks in-flight offsets per partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Partition, State>,
}

impl OffsetTracker {
    /// A record was read and is now in flight.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        let st = self.parts.entry((topic.to_string(), partition)).or_default();
        // The first record read marks the position already committed: nothing to store yet.
        st.stored.get_or_insert(offset);
        st.pending.insert(offset);
        st.highest = Some(st.highest.map_or(offset, |h| h.max(offset)));
    }

    /// A record is fully handled. Returns the new committable offset (next to consume) when
    /// the partition's watermark advanced; `None` when an earlier record is still in flight,
    /// or the partition is no longer tracked (revoked).
    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let st = self.parts.get_mut(&(topic.to_string(), partition))?;
        if !st.pending.remove(&offset) {
            return None;
        }
        let next = match st.pending.first() {
            Some(&lowest) => lowest,
            None => st.highest? + 1,
        };
        if st.stored.is_none_or(|s| next > s) {
            st.stored = Some(next);
            Some(next)
        } else {
            None
        }
    }

    /// Forget a partition (revoked in a rebalance): later completions for it are ignored.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        self.parts.remove(&(topic.to_string(), partition));
    }

    /// Records in flight, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|s| s.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_completion_advances_by_one() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 10);
        t.begin("t", 0, 11);
        assert_eq!(t.complete("t", 0, 10), Some(11));
        assert_eq!(t.complete("t", 0, 11), Some(12));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn out_of_order_completion_waits_for_the_gap() {
        let mut t = OffsetTracker::default();
        for o in 0..5 {
            t.begin("t", 1, o);
        }
        assert_eq!(t.complete("t", 1, 3), None);
        assert_eq!(t.complete("t", 1, 1), None);
        assert_eq!(t.complete("t", 1, 0), Some(2), "0 and 1 done, 2 still pending");
        assert_eq!(t.complete("t", 1, 4), None);
        assert_eq!(t.complete("t", 1, 2), Some(5));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 0);
        t.begin("t", 1, 0);
        assert_eq!(t.complete("t", 1, 0), Some(1));
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.complete("t", 0, 0), Some(1));
    }

    #[test]
    fn revoked_partition_ignores_late_completions() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 7);
        t.revoke("t", 0);
        assert_eq!(t.complete("t", 0, 7), None);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn duplicate_completion_is_harmless() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 0);
        t.begin("t", 0, 1);
        assert_eq!(t.complete("t", 0, 0), Some(1));
        assert_eq!(t.complete("t", 0, 0), None);
        assert_eq!(t.complete("t", 0, 1), Some(2));
    }

    #[test]
    fn gaps_in_offsets_from_compaction_or_transactions_are_fine() {
        let mut t = OffsetTracker::default();
        t.begin("t", 0, 100);
        t.begin("t", 0, 105);
        assert_eq!(t.complete("t", 0, 105), None);
        assert_eq!(t.complete("t", 0, 100), Some(106));
    }
}
