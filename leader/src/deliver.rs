//! Deliver-to-one: which subscriber of a key gets each event, and getting it
//! back when that subscriber does not settle it. No I/O and no clock of its
//! own (every operation takes `now`), so it is tested with plain values.
//!
//! ```text
//! event ──offer──> queue (bounded) ──pump──> next member in turn with room in its window
//!                    ^                          │ Delivery{tag, redelivered}
//!                    │                          v
//!                    └── requeued at the front, held (tag → member, deadline)
//!                        marked redelivered <── ack timeout, release, member leaves
//!                                               ack ──> forgotten
//! ```
//!
//! Distribution is round-robin among the members that have room in their
//! window (unsettled deliveries below the window they asked for), starting
//! after the member served last. A member that settles slowly fills its window
//! and is skipped until it settles, so the load follows the consumers' speed.
//! Delivery is at-least-once: an event is forgotten only when its holder acks
//! it; anything else puts it back at the front of the queue, marked
//! redelivered, so it may be processed twice but is never lost while the key
//! has subscribers and the queue has room.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::session_id::SessionId;
use tandem_protocol::RequestId;

/// A deliver-to-one subscriber: its session and its `SubscribeOne` id.
pub(crate) type Member = (SessionId, RequestId);

/// An event waiting for a subscriber, or held by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    pub(crate) redelivered: bool,
    /// Who held it last (and did not ack it): it goes to another member when one has room.
    pub(crate) avoid: Option<Member>,
}

/// One delivery to send: `item` to `member`, named `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Send {
    pub(crate) member: Member,
    pub(crate) tag: u64,
    pub(crate) item: Item,
}

/// An event the queue had no room for: dropped (the hub logs and counts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deliver-to-one queue full ({limit} undelivered events): event seq {seq} dropped")]
pub(crate) struct QueueFull {
    pub(crate) seq: u64,
    pub(crate) limit: usize,
}

#[derive(Debug)]
struct Subscriber {
    member: Member,
    window: usize,
    ack_timeout: Duration,
    held: usize,
}

#[derive(Debug)]
struct Held {
    member: Member,
    deadline: Instant,
    item: Item,
}

/// One key's deliver-to-one state.
#[derive(Debug)]
pub(crate) struct Dispatch {
    members: Vec<Subscriber>,
    /// Where the next turn starts in `members`.
    cursor: usize,
    queue: VecDeque<Item>,
    max_queue: usize,
    held: HashMap<u64, Held>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_tag: u64,
}

impl Dispatch {
    /// A dispatch keeping at most `max_queue` undelivered events.
    pub(crate) fn new(max_queue: usize) -> Self {
        Dispatch {
            members: Vec::new(),
            cursor: 0,
            queue: VecDeque::new(),
            max_queue: max_queue.max(1),
            held: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_tag: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub(crate) fn members(&self) -> usize {
        self.members.len()
    }

    /// Events handed out and not settled yet.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// Undelivered events queued now.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether the queue is at its limit (the next offer that finds nobody with room is dropped).
    pub(crate) fn full(&self) -> bool {
        self.queue.len() >= self.max_queue
    }

    /// The earliest ack deadline of a held delivery.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// A new subscriber; queued events go to it (and the others) at once.
    pub(crate) fn join(&mut self, member: Member, window: usize, ack_timeout: Duration, now: Instant) -> Vec<Send> {
        if !self.members.iter().any(|m| m.member == member) {
            self.members.push(Subscriber { member, window: window.max(1), ack_timeout, held: 0 });
        }
        self.pump(now)
    }

    /// A subscriber left (unsubscribed or disconnected): what it held goes to the others, marked redelivered.
    pub(crate) fn leave(&mut self, member: Member, now: Instant) -> Vec<Send> {
        let Some(at) = self.members.iter().position(|m| m.member == member) else { return Vec::new() };
        self.members.remove(at);
        if self.cursor > at {
            self.cursor -= 1;
        }
        let tags: Vec<u64> = self.held.iter().filter(|(_, h)| h.member == member).map(|(tag, _)| *tag).collect();
        let mut back: Vec<(u64, Item)> = tags.into_iter().filter_map(|tag| Some((tag, self.unhold(tag)?))).collect();
        // Back in the order they were first handed out (tags grow).
        back.sort_by_key(|(tag, _)| *tag);
        self.requeue(back.into_iter().map(|(_, item)| item));
        self.pump(now)
    }

    /// A new event: to the next subscriber with room, else queued; past the
    /// queue's limit, dropped with [`QueueFull`].
    pub(crate) fn offer(&mut self, seq: u64, payload: Bytes, now: Instant) -> Result<Vec<Send>, QueueFull> {
        if self.queue.len() >= self.max_queue {
            return Err(QueueFull { seq, limit: self.max_queue });
        }
        self.queue.push_back(Item { seq, payload, redelivered: false, avoid: None });
        Ok(self.pump(now))
    }

    /// `member` settled deliveries: `acked` are forgotten, `released` redelivered.
    /// Tags it does not hold (settled already, or timed out and given to
    /// another) are ignored.
    pub(crate) fn settle(&mut self, member: Member, acked: &[u64], released: &[u64], now: Instant) -> Vec<Send> {
        for tag in acked {
            if self.held.get(tag).is_some_and(|h| h.member == member) {
                self.unhold(*tag);
            }
        }
        let mut back = Vec::new();
        for tag in released {
            if self.held.get(tag).is_some_and(|h| h.member == member)
                && let Some(item) = self.unhold(*tag)
            {
                back.push(item);
            }
        }
        self.requeue(back.into_iter());
        self.pump(now)
    }

    /// Deliveries past their ack deadline go to someone else, marked redelivered.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Send> {
        let mut back = Vec::new();
        while let Some(&(at, tag)) = self.deadlines.first() {
            if at > now {
                break;
            }
            if let Some(item) = self.unhold(tag) {
                back.push(item);
            }
        }
        self.requeue(back.into_iter());
        self.pump(now)
    }

    fn unhold(&mut self, tag: u64) -> Option<Item> {
        let held = self.held.remove(&tag)?;
        self.deadlines.remove(&(held.deadline, tag));
        if let Some(m) = self.members.iter_mut().find(|m| m.member == held.member) {
            m.held = m.held.saturating_sub(1);
        }
        Some(Item { avoid: Some(held.member), ..held.item })
    }

    /// Puts events back at the front, in the given order, marked redelivered.
    /// (They may push the queue past its limit: an event once accepted is
    /// never dropped.)
    fn requeue(&mut self, items: impl DoubleEndedIterator<Item = Item>) {
        for mut item in items.rev() {
            item.redelivered = true;
            self.queue.push_front(item);
        }
    }

    /// Hands queued events out, in turn, to subscribers with room.
    fn pump(&mut self, now: Instant) -> Vec<Send> {
        let mut sends = Vec::new();
        let n = self.members.len();
        while let Some(front) = self.queue.front()
            && n > 0
        {
            let has_room = |i: &usize| self.members[*i].held < self.members[*i].window;
            let mut turn = (0..n).map(|i| (self.cursor + i) % n);
            // The next in turn with room, another than the last holder if one has room.
            let Some(at) = turn
                .clone()
                .filter(has_room)
                .find(|&i| Some(self.members[i].member) != front.avoid)
                .or_else(|| turn.find(has_room))
            else {
                break;
            };
            self.cursor = (at + 1) % n;
            let Some(item) = self.queue.pop_front() else { break };
            let m = &mut self.members[at];
            m.held += 1;
            self.next_tag += 1;
            let tag = self.next_tag;
            let deadline = now + m.ack_timeout;
            self.deadlines.insert((deadline, tag));
            self.held.insert(tag, Held { member: m.member, deadline, item: item.clone() });
            sends.push(Send { member: m.member, tag, item });
        }
        sends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Member = (1, 10);
    const B: Member = (2, 20);
    const C: Member = (3, 30);
    const SECOND: Duration = Duration::from_secs(1);

    fn seqs(sends: &[Send]) -> Vec<(Member, u64, bool)> {
        sends.iter().map(|s| (s.member, s.item.seq, s.item.redelivered)).collect()
    }

    fn offer(d: &mut Dispatch, seq: u64, now: Instant) -> Vec<Send> {
        d.offer(seq, Bytes::new(), now).expect("room in the queue")
    }

    #[test]
    fn events_go_round_robin_each_to_one_member() {
        let now = Instant::now();
        let mut d = Dispatch::new(16);
        d.join(A, 8, SECOND, now);
        d.join(B, 8, SECOND, now);
        d.join(C, 8, SECOND, now);
        let got: Vec<_> = (1..=6).flat_map(|seq| seqs(&offer(&mut d, seq, now))).collect();
        assert_eq!(got, vec![(A, 1, false), (B, 2, false), (C, 3, false), (A, 4, false), (B, 5, false), (C, 6, false)]);
    }

    #[test]
    fn a_full_window_is_skipped_and_acks_make_room() {
        let now = Instant::now();
        let mut d = Dispatch::new(16);
        d.join(A, 1, SECOND, now);
        d.join(B, 3, SECOND, now);
        let first = offer(&mut d, 1, now);
        assert_eq!(seqs(&first), vec![(A, 1, false)]);
        // A holds its one: B gets the next ones, until B is full too.
        assert_eq!(seqs(&offer(&mut d, 2, now)), vec![(B, 2, false)]);
        assert_eq!(seqs(&offer(&mut d, 3, now)), vec![(B, 3, false)]);
        assert_eq!(seqs(&offer(&mut d, 4, now)), vec![(B, 4, false)]);
        assert!(offer(&mut d, 5, now).is_empty());
        assert_eq!(d.queued(), 1);
        // A acks: the queued event goes to A.
        assert_eq!(seqs(&d.settle(A, &[first[0].tag], &[], now)), vec![(A, 5, false)]);
    }

    #[test]
    fn nobody_subscribed_queues_up_to_the_limit_then_drops_typed() {
        let now = Instant::now();
        let mut d = Dispatch::new(2);
        assert!(offer(&mut d, 1, now).is_empty());
        assert!(offer(&mut d, 2, now).is_empty());
        assert!(d.full());
        assert_eq!(d.offer(3, Bytes::new(), now), Err(QueueFull { seq: 3, limit: 2 }));
        // The first subscriber gets the queued ones, in order, not redelivered.
        assert_eq!(seqs(&d.join(A, 8, SECOND, now)), vec![(A, 1, false), (A, 2, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn unacked_past_the_deadline_goes_to_another_marked_redelivered() {
        let mut d = Dispatch::new(16);
        let now = Instant::now();
        d.join(A, 8, SECOND, now);
        d.join(B, 8, 3 * SECOND, now);
        let to_a = offer(&mut d, 1, now);
        let to_b = offer(&mut d, 2, now);
        assert_eq!(d.next_deadline(), Some(now + SECOND));
        tokio::time::advance(SECOND - Duration::from_millis(1)).await;
        assert!(d.expire(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        // A's delivery timed out: the next in turn (B) gets it, marked.
        let again = d.expire(Instant::now());
        assert_eq!(seqs(&again), vec![(B, 1, true)]);
        assert_ne!(again[0].tag, to_a[0].tag, "a redelivery has a new tag");
        // A's late ack of the old tag changes nothing; B's ack of the new one settles it.
        assert!(d.settle(A, &[to_a[0].tag], &[], Instant::now()).is_empty());
        d.settle(B, &[again[0].tag, to_b[0].tag], &[], Instant::now());
        assert_eq!(d.next_deadline(), None);
        tokio::time::advance(10 * SECOND).await;
        assert!(d.expire(Instant::now()).is_empty());
    }

    #[test]
    fn a_member_leaving_gives_what_it_held_to_the_others() {
        let now = Instant::now();
        let mut d = Dispatch::new(16);
        d.join(A, 8, SECOND, now);
        d.join(B, 8, SECOND, now);
        for seq in 1..=4 {
            offer(&mut d, seq, now);
        }
        // A held 1 and 3; B acked nothing either, but stays.
        assert_eq!(seqs(&d.leave(A, now)), vec![(B, 1, true), (B, 3, true)]);
        assert_eq!(d.members(), 1);
        // The last one leaving: its events wait in the queue for the next
        // subscriber (in the order B was given them; no order is promised).
        assert!(d.leave(B, now).is_empty());
        assert_eq!(d.queued(), 4);
        let got = seqs(&d.join(C, 8, SECOND, now));
        assert_eq!(got, vec![(C, 2, true), (C, 4, true), (C, 1, true), (C, 3, true)]);
    }

    #[test]
    fn released_events_are_redelivered_and_foreign_tags_ignored() {
        let now = Instant::now();
        let mut d = Dispatch::new(16);
        d.join(A, 8, SECOND, now);
        d.join(B, 8, SECOND, now);
        let to_a = offer(&mut d, 1, now);
        // B cannot release what A holds.
        assert!(d.settle(B, &[], &[to_a[0].tag], now).is_empty());
        assert_eq!(seqs(&d.settle(A, &[], &[to_a[0].tag], now)), vec![(B, 1, true)]);
    }

    #[test]
    fn every_event_is_held_or_queued_until_acked() {
        // A small model check: random joins, leaves, offers, acks and
        // timeouts; an event disappears only by being acked.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let start = Instant::now();
        let mut d = Dispatch::new(64);
        let mut outstanding: HashMap<u64, (Member, u64)> = HashMap::new();
        let (mut offered, mut acked, mut dropped) = (0u64, std::collections::HashSet::new(), 0u64);
        let members = [A, B, C];
        for step in 0..5_000u64 {
            let now = start + Duration::from_millis(step);
            let sends = match next() % 6 {
                0 => d.join(members[(next() % 3) as usize], 1 + (next() % 4) as usize, SECOND, now),
                1 => d.leave(members[(next() % 3) as usize], now),
                2 => {
                    let tags: Vec<u64> = outstanding.keys().copied().take(2).collect();
                    let mut sends = Vec::new();
                    for tag in tags {
                        let (member, seq) = outstanding[&tag];
                        let before = d.held.len();
                        sends.extend(d.settle(member, &[tag], &[], now));
                        if d.held.len() < before + sends.len() {
                            acked.insert(seq);
                        }
                    }
                    sends
                }
                3 => d.expire(now + Duration::from_millis(next() % 2000)),
                _ => {
                    offered += 1;
                    d.offer(offered, Bytes::new(), now).unwrap_or_else(|_| {
                        dropped += 1;
                        Vec::new()
                    })
                }
            };
            for send in sends {
                outstanding.insert(send.tag, (send.member, send.item.seq));
            }
            outstanding.retain(|tag, _| d.held.contains_key(tag));
        }
        let mut alive: std::collections::HashSet<u64> = d.queue.iter().map(|i| i.seq).collect();
        alive.extend(d.held.values().map(|h| h.item.seq));
        alive.extend(acked.iter().copied());
        assert_eq!(alive.len() as u64 + dropped, offered, "every event is queued, held, acked or counted as dropped");
    }
}
