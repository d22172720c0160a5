//! The requests sent and not yet answered, keyed by request id.
//!
//! Each entry stands for someone waiting for an answer (a caller, a
//! subscription, a child process): it leaves the table exactly once, by its
//! reply ([`PendingTable::remove`]), its deadline ([`PendingTable::take_expired`])
//! or because the connection it was sent on is gone ([`PendingTable::drain`],
//! [`PendingTable::close`]). A refused insert hands the value back, so its
//! waiter is answered too.

use std::cmp::Reverse;
use std::collections::hash_map::{self, Entry};
use std::collections::{BinaryHeap, HashMap};

use tokio::time::Instant;

use crate::RequestId;

/// Stale deadlines (of entries already gone) tolerated beyond twice the
/// entries before they are swept out.
const DEADLINE_SLACK: usize = 64;

/// Why [`PendingTable::insert`] refused an entry; the value comes back with it.
#[derive(Debug, thiserror::Error)]
pub enum InsertError<V> {
    /// Another request with the same id is pending (it is kept).
    #[error("request {0} is already pending")]
    Duplicate(RequestId, V),
    /// The table was closed: its connection is gone.
    #[error("the connection of request {0} is gone")]
    Closed(RequestId, V),
}

impl<V> InsertError<V> {
    /// The refused value, to answer its waiter with.
    pub fn into_value(self) -> V {
        match self {
            InsertError::Duplicate(_, value) | InsertError::Closed(_, value) => value,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, InsertError::Closed(..))
    }
}

/// A value that may have a deadline, for [`PendingTable::insert_expiring`].
pub trait Expires {
    /// When the request expires (`None`: never); must not change while it is
    /// in the table.
    fn deadline(&self) -> Option<Instant>;
}

/// Outstanding requests by id. Once [`closed`](PendingTable::close) it stays
/// empty: every insert is refused.
///
/// Entries inserted with [`insert_expiring`](PendingTable::insert_expiring)
/// expire: [`take_expired`](PendingTable::take_expired) takes those whose
/// deadline passed, earliest first. Their deadlines are kept in a heap from
/// which removed entries are dropped lazily, so `remove` stays a map removal;
/// the heap never holds more than twice the entries plus 64 after an insert.
#[derive(Debug)]
pub struct PendingTable<V> {
    entries: HashMap<RequestId, V>,
    /// (deadline, id) of expiring entries, earliest on top; may name entries
    /// already removed (or an id since reused, with another deadline).
    deadlines: BinaryHeap<Reverse<(Instant, RequestId)>>,
    closed: bool,
}

impl<V> Default for PendingTable<V> {
    fn default() -> Self {
        PendingTable { entries: HashMap::new(), deadlines: BinaryHeap::new(), closed: false }
    }
}

impl<V> PendingTable<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds request `id`, unless one with that id is pending or the table is closed.
    pub fn insert(&mut self, id: RequestId, value: V) -> Result<(), InsertError<V>> {
        if self.closed {
            return Err(InsertError::Closed(id, value));
        }
        match self.entries.entry(id) {
            Entry::Occupied(_) => Err(InsertError::Duplicate(id, value)),
            Entry::Vacant(slot) => {
                slot.insert(value);
                Ok(())
            }
        }
    }

    /// Takes request `id` out (its reply came, or its waiter gave up).
    pub fn remove(&mut self, id: RequestId) -> Option<V> {
        self.entries.remove(&id)
    }

    pub fn get(&self, id: RequestId) -> Option<&V> {
        self.entries.get(&id)
    }

    pub fn get_mut(&mut self, id: RequestId) -> Option<&mut V> {
        self.entries.get_mut(&id)
    }

    pub fn contains(&self, id: RequestId) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether [`close`](PendingTable::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (RequestId, &V)> {
        self.entries.iter().map(|(id, value)| (*id, value))
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(RequestId, &mut V) -> bool) {
        self.entries.retain(|id, value| keep(*id, value));
    }

    /// Takes out the entries for which `take` is true, as the iterator reaches
    /// them (those it does not reach stay).
    pub fn take_if<F>(&mut self, mut take: F) -> impl Iterator<Item = (RequestId, V)>
    where
        F: FnMut(RequestId, &mut V) -> bool,
    {
        self.entries.extract_if(move |id, value| take(*id, value))
    }

    /// Takes out every entry (to answer its waiter); the table stays open, for
    /// the next connection.
    pub fn drain(&mut self) -> hash_map::Drain<'_, RequestId, V> {
        self.deadlines.clear();
        self.entries.drain()
    }

    /// Closes the table (later inserts are refused) and takes out every entry,
    /// to answer its waiter; nothing if it was closed already.
    pub fn close(&mut self) -> hash_map::IntoIter<RequestId, V> {
        self.closed = true;
        self.deadlines = BinaryHeap::new();
        std::mem::take(&mut self.entries).into_iter()
    }
}

impl<V: Expires> PendingTable<V> {
    /// [`insert`](PendingTable::insert)s request `id`, to be taken by
    /// [`take_expired`](PendingTable::take_expired) once its deadline passes
    /// (a value without one is only inserted).
    pub fn insert_expiring(&mut self, id: RequestId, value: V) -> Result<(), InsertError<V>> {
        let deadline = value.deadline();
        self.insert(id, value)?;
        if let Some(deadline) = deadline {
            if self.deadlines.len() >= 2 * self.entries.len() + DEADLINE_SLACK {
                self.sweep();
            }
            self.deadlines.push(Reverse((deadline, id)));
        }
        Ok(())
    }

    /// Leaves one heap item per expiring entry (an id removed and inserted
    /// again with the same deadline has one item per insert, all live).
    fn sweep(&mut self) {
        let mut items = std::mem::take(&mut self.deadlines).into_vec();
        items.retain(|Reverse((deadline, id))| is_live(&self.entries, *id, *deadline));
        items.sort_unstable();
        items.dedup();
        self.deadlines = BinaryHeap::from(items);
    }

    /// The earliest deadline of the expiring entries.
    pub fn earliest_deadline(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.deadlines.peek().map(|Reverse((deadline, _))| *deadline)
    }

    /// Takes out the expiring entries whose deadline is at or before `now`,
    /// earliest first, as the iterator reaches them (those it does not reach stay).
    pub fn take_expired(&mut self, now: Instant) -> impl Iterator<Item = (RequestId, V)> {
        std::iter::from_fn(move || {
            self.drop_stale();
            match self.deadlines.peek() {
                Some(Reverse((deadline, id))) if *deadline <= now => {
                    let id = *id;
                    self.deadlines.pop();
                    self.entries.remove(&id).map(|value| (id, value))
                }
                _ => None,
            }
        })
    }

    /// Pops the deadlines of entries that are gone.
    fn drop_stale(&mut self) {
        while let Some(Reverse((deadline, id))) = self.deadlines.peek() {
            if is_live(&self.entries, *id, *deadline) {
                return;
            }
            self.deadlines.pop();
        }
    }
}

/// Whether heap item (`deadline`, `id`) is still an entry's deadline.
fn is_live<V: Expires>(entries: &HashMap<RequestId, V>, id: RequestId, deadline: Instant) -> bool {
    entries.get(&id).is_some_and(|value| value.deadline() == Some(deadline))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Call {
        name: &'static str,
        deadline: Instant,
    }

    impl Expires for Call {
        fn deadline(&self) -> Option<Instant> {
            Some(self.deadline)
        }
    }

    fn call(name: &'static str, start: Instant, after_ms: u64) -> Call {
        Call { name, deadline: start + Duration::from_millis(after_ms) }
    }

    fn names(taken: impl Iterator<Item = (RequestId, Call)>) -> Vec<(RequestId, &'static str)> {
        taken.map(|(id, call)| (id, call.name)).collect()
    }

    #[test]
    fn an_entry_is_taken_out_once() {
        let mut table = PendingTable::new();
        table.insert(1, "a").unwrap();
        table.insert(2, "b").unwrap();
        assert_eq!((table.len(), table.get(1), table.contains(2)), (2, Some(&"a"), true));
        assert_eq!(table.remove(1), Some("a"));
        assert_eq!(table.remove(1), None);
        assert_eq!(table.iter().collect::<Vec<_>>(), vec![(2, &"b")]);
        *table.get_mut(2).unwrap() = "c";
        assert_eq!(table.remove(2), Some("c"));
        assert!(table.is_empty());
    }

    #[test]
    fn a_duplicate_id_is_refused_with_its_value_and_the_first_is_kept() {
        let mut table = PendingTable::new();
        table.insert(7, "first").unwrap();
        let refused = table.insert(7, "second").unwrap_err();
        assert_eq!(refused.to_string(), "request 7 is already pending");
        assert!(!refused.is_closed());
        assert_eq!(refused.into_value(), "second");
        assert_eq!((table.len(), table.get(7)), (1, Some(&"first")));
    }

    #[test]
    fn close_takes_every_entry_and_refuses_later_inserts() {
        let mut table = PendingTable::new();
        for id in 1..=3 {
            table.insert(id, id * 10).unwrap();
        }
        let mut taken: Vec<_> = table.close().collect();
        taken.sort();
        assert_eq!(taken, vec![(1, 10), (2, 20), (3, 30)]);
        assert!(table.is_closed() && table.is_empty());

        let refused = table.insert(4, 40).unwrap_err();
        assert!(refused.is_closed());
        assert_eq!(refused.to_string(), "the connection of request 4 is gone");
        assert_eq!(refused.into_value(), 40);
        assert_eq!(table.close().count(), 0, "closing again takes nothing");
    }

    #[test]
    fn drain_takes_every_entry_and_the_table_stays_open() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        table.insert_expiring(1, call("a", start, 10)).unwrap();
        table.insert(2, call("b", start, 20)).unwrap();
        let mut taken = names(table.drain());
        taken.sort();
        assert_eq!(taken, vec![(1, "a"), (2, "b")]);
        assert!(!table.is_closed());
        assert_eq!(table.earliest_deadline(), None, "the drained deadlines are gone too");
        table.insert(1, call("again", start, 30)).unwrap();
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn retain_and_take_if_select_by_id_and_value() {
        let mut table = PendingTable::new();
        for id in 1..=6 {
            table.insert(id, id % 3).unwrap();
        }
        let mut taken: Vec<_> = table.take_if(|_, rest| *rest == 0).collect();
        taken.sort();
        assert_eq!(taken, vec![(3, 0), (6, 0)]);
        table.retain(|id, _| id > 2);
        let mut left: Vec<_> = table.iter().map(|(id, rest)| (id, *rest)).collect();
        left.sort();
        assert_eq!(left, vec![(4, 1), (5, 2)]);
    }

    #[test]
    fn expired_entries_are_taken_earliest_first_at_their_deadline() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        table.insert_expiring(1, call("late", start, 300)).unwrap();
        table.insert_expiring(2, call("early", start, 100)).unwrap();
        table.insert_expiring(3, call("middle", start, 200)).unwrap();
        table.insert(4, call("never", start, 0)).unwrap();
        assert_eq!(table.earliest_deadline(), Some(start + Duration::from_millis(100)));

        assert_eq!(names(table.take_expired(start + Duration::from_millis(99))), vec![]);
        assert_eq!(names(table.take_expired(start + Duration::from_millis(200))), vec![(2, "early"), (3, "middle")]);
        assert_eq!(table.earliest_deadline(), Some(start + Duration::from_millis(300)));
        assert_eq!(names(table.take_expired(start + Duration::from_secs(60))), vec![(1, "late")]);
        // Only entries inserted with a deadline expire.
        assert_eq!(table.earliest_deadline(), None);
        assert_eq!(table.remove(4).map(|c| c.name), Some("never"));
    }

    #[test]
    fn removed_entries_and_reused_ids_do_not_expire_by_an_old_deadline() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        table.insert_expiring(1, call("answered", start, 100)).unwrap();
        table.insert_expiring(2, call("reused", start, 100)).unwrap();
        table.insert_expiring(3, call("kept", start, 200)).unwrap();
        table.remove(1);
        table.remove(2);
        table.insert_expiring(2, call("again", start, 300)).unwrap();
        assert_eq!(table.earliest_deadline(), Some(start + Duration::from_millis(200)));
        assert_eq!(names(table.take_expired(start + Duration::from_millis(250))), vec![(3, "kept")]);
        assert_eq!(names(table.take_expired(start + Duration::from_millis(300))), vec![(2, "again")]);
        assert!(table.is_empty());
    }

    #[test]
    fn an_expired_entry_the_iterator_does_not_reach_stays() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        for id in 1..=3 {
            table.insert_expiring(id, call("x", start, id * 10)).unwrap();
        }
        let now = start + Duration::from_secs(1);
        assert_eq!(table.take_expired(now).next().map(|(id, _)| id), Some(1));
        assert_eq!(table.len(), 2);
        assert_eq!(names(table.take_expired(now)), vec![(2, "x"), (3, "x")]);
    }

    #[test]
    fn the_deadlines_of_answered_requests_do_not_pile_up() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        table.insert_expiring(0, call("slow", start, 60_000)).unwrap();
        for id in 1..10_000 {
            table.insert_expiring(id, call("fast", start, 30_000)).unwrap();
            assert!(table.deadlines.len() <= 2 * table.len() + DEADLINE_SLACK, "{}", table.deadlines.len());
            table.remove(id);
        }
        assert_eq!(names(table.take_expired(start + Duration::from_secs(60))), vec![(0, "slow")]);
        assert!(table.deadlines.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert { id: RequestId, after_ms: u64 },
        Remove(RequestId),
        Expire { at_ms: u64 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..16u64, 0..100u64).prop_map(|(id, after_ms)| Op::Insert { id, after_ms }),
            (0..16u64).prop_map(Op::Remove),
            (0..100u64).prop_map(|at_ms| Op::Expire { at_ms }),
        ]
    }

    proptest::proptest! {
        /// Against a map of id -> deadline: the same refusals and removals, and
        /// an expiry takes exactly the entries due, earliest first.
        #[test]
        fn expiry_matches_a_plain_map(ops in proptest::collection::vec(op(), 0..200)) {
            let start = Instant::now();
            let mut table = PendingTable::new();
            let mut model: HashMap<RequestId, Instant> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert { id, after_ms } => {
                        let value = call("x", start, after_ms);
                        let deadline = value.deadline;
                        let inserted = table.insert_expiring(id, value).is_ok();
                        proptest::prop_assert_eq!(inserted, !model.contains_key(&id));
                        model.entry(id).or_insert(deadline);
                        proptest::prop_assert!(table.deadlines.len() <= 2 * table.len() + DEADLINE_SLACK);
                    }
                    Op::Remove(id) => {
                        let removed = table.remove(id).map(|c| c.deadline);
                        proptest::prop_assert_eq!(removed, model.remove(&id));
                    }
                    Op::Expire { at_ms } => {
                        let now = start + Duration::from_millis(at_ms);
                        let taken: Vec<(RequestId, Instant)> =
                            table.take_expired(now).map(|(id, c)| (id, c.deadline)).collect();
                        proptest::prop_assert!(taken.windows(2).all(|w| w[0].1 <= w[1].1), "{:?}", taken);
                        let mut taken: Vec<RequestId> = taken.into_iter().map(|(id, _)| id).collect();
                        let mut due: Vec<RequestId> =
                            model.iter().filter(|(_, d)| **d <= now).map(|(id, _)| *id).collect();
                        model.retain(|_, d| *d > now);
                        taken.sort();
                        due.sort();
                        proptest::prop_assert_eq!(taken, due);
                    }
                }
                proptest::prop_assert_eq!(table.len(), model.len());
                proptest::prop_assert_eq!(table.earliest_deadline(), model.values().min().copied());
            }
        }
    }

    #[test]
    fn an_id_reused_with_the_same_deadline_does_not_pile_up_either() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        for _ in 0..1_000 {
            table.insert_expiring(1, call("same", start, 100)).unwrap();
            assert!(table.deadlines.len() <= 2 * table.len() + DEADLINE_SLACK, "{}", table.deadlines.len());
            table.remove(1);
        }
        table.insert_expiring(1, call("same", start, 100)).unwrap();
        assert_eq!(names(table.take_expired(start + Duration::from_millis(100))), vec![(1, "same")]);
        assert_eq!(table.earliest_deadline(), None);
    }

    #[test]
    fn a_closed_table_refuses_an_expiring_insert_with_its_value() {
        let start = Instant::now();
        let mut table = PendingTable::new();
        table.insert_expiring(1, call("a", start, 10)).unwrap();
        assert_eq!(names(table.close()), vec![(1, "a")]);
        let refused = table.insert_expiring(2, call("b", start, 10)).unwrap_err();
        assert_eq!(refused.into_value().name, "b");
        assert_eq!(table.earliest_deadline(), None);
        assert_eq!(names(table.take_expired(start + Duration::from_secs(1))), vec![]);
    }
}
