//! Calls through a slab of waker slots ([`CallPath::Slots`](crate::CallPath::Slots)):
//! no command queue, no oneshot, no in-flight map.
//!
//! ```text
//! caller ──lock: a slot, the call in `outgoing`, wake the driver──> driver ──Invoke──> leader
//!   ^                                                                │ <──Response──
//!   └──── lock: the slot's answer, the caller's waker woken ─────────┘
//! ```
//!
//! A call takes a slot (its index and generation are the request id, so an
//! answer finds its caller by indexing, not hashing), appends itself to the
//! table's `outgoing` list and wakes the driver once per batch; the driver
//! turns the whole list into frames in one lock. The answer is stored in the
//! slot and the caller's waker woken; the caller takes it and frees the slot.
//! A call future dropped before its answer frees its slot and, if the call was
//! sent, queues a `Cancel`. The driver keeps every slot's deadline with its one
//! timer (the earliest is kept here), answers every waiting slot when the link
//! is lost or the connection closes, and sets the [`Mode`] new calls meet.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{ChannelName, Frame, Invoke, RequestId};
use tokio::time::Instant;

use crate::Error;

/// Set in every slot call's request id; never in the ids of the connection's
/// counter (which starts at 1 and would need centuries to reach it).
const SLOT_BIT: u64 = 1 << 63;
const GENERATIONS: u32 = 0x7fff_ffff;

/// Whether a request id names a slot (a call made on this path).
pub(crate) fn is_slot_id(id: RequestId) -> bool {
    id & SLOT_BIT != 0
}

fn slot_id(index: u32, generation: u32) -> RequestId {
    SLOT_BIT | (u64::from(generation) << 32) | u64::from(index)
}

fn split(id: RequestId) -> (usize, u32) {
    ((id & 0xffff_ffff) as usize, ((id >> 32) as u32) & GENERATIONS)
}

/// What new calls meet.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// No leader reached yet: calls wait in `outgoing` (until their deadline).
    Hold,
    /// Connected: the driver sends them.
    Open,
    /// Every call fails at once with this error (the leader was lost, the
    /// leader refused this follower, or the connection is closed).
    Fail(Error),
}

#[derive(Debug)]
enum State {
    Free,
    Waiting { waker: Option<Waker>, deadline: Instant, budget: Duration, sent: bool },
    Done(Result<Bytes, Error>),
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    state: State,
}

/// A call on its way to the driver, or a cancel of one already sent.
#[derive(Debug)]
enum Outgoing {
    Invoke { id: RequestId, channel: &'static str, payload: Bytes },
    Cancel(RequestId),
}

#[derive(Debug)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Slots not free: calls waiting, or answered and not yet taken.
    live: usize,
    outgoing: Vec<Outgoing>,
    /// The calls in `outgoing`; past `capacity`, callers wait for room.
    queued: usize,
    capacity: usize,
    /// At or before the earliest deadline of a waiting slot (answered calls
    /// leave theirs behind until the next expiry pass).
    earliest: Option<Instant>,
    mode: Mode,
    driver: Option<Waker>,
    /// Callers waiting for room in `outgoing`.
    room: Vec<Waker>,
}

/// Why a call was not started.
#[derive(Debug)]
pub(crate) enum Refused {
    /// `outgoing` is full: the caller's waker is kept and woken when the
    /// driver takes the list; the payload comes back.
    Full(Bytes),
    Failed(Error),
}

/// The slab and the calls on their way to the driver, shared by the
/// connection's handles and its driver.
#[derive(Debug)]
pub(crate) struct Slots {
    table: Mutex<Table>,
}

impl Slots {
    /// `capacity`: the most calls waiting for the driver before callers wait.
    pub(crate) fn new(capacity: usize) -> Self {
        let table = Table {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            outgoing: Vec::new(),
            queued: 0,
            capacity: capacity.max(1),
            earliest: None,
            mode: Mode::Hold,
            driver: None,
            room: Vec::new(),
        };
        Slots { table: Mutex::new(table) }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing here panics while holding the lock; a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- the caller's side ----

    /// Takes a slot for a call and queues it for the driver; the slot keeps
    /// the caller's waker. Returns the call's request id.
    pub(crate) fn start(
        &self,
        channel: &'static str,
        payload: Bytes,
        deadline: Instant,
        budget: Duration,
        cx: &mut Context<'_>,
    ) -> Result<RequestId, Refused> {
        let mut table = self.lock();
        if let Mode::Fail(error) = &table.mode {
            return Err(Refused::Failed(error.clone()));
        }
        if table.queued >= table.capacity {
            table.room.push(cx.waker().clone());
            return Err(Refused::Full(payload));
        }
        let state = State::Waiting { waker: Some(cx.waker().clone()), deadline, budget, sent: false };
        let index = match table.free.pop() {
            Some(index) => {
                table.slots[index as usize].state = state;
                index
            }
            None => {
                let Ok(index) = u32::try_from(table.slots.len()) else {
                    return Err(Refused::Failed(Error::Remote(tandem_protocol::RemoteError::internal(
                        "more than 2^32 calls in flight",
                    ))));
                };
                table.slots.push(Slot { generation: 0, state });
                index
            }
        };
        let id = slot_id(index, table.slots[index as usize].generation);
        table.live += 1;
        table.queued += 1;
        table.earliest = Some(table.earliest.map_or(deadline, |due| due.min(deadline)));
        table.outgoing.push(Outgoing::Invoke { id, channel, payload });
        let driver = table.driver.take();
        drop(table);
        if let Some(driver) = driver {
            driver.wake();
        }
        Ok(id)
    }

    /// The call's answer once there, freeing its slot; until then keeps `cx`'s waker.
    pub(crate) fn poll_answer(&self, id: RequestId, cx: &mut Context<'_>) -> Poll<Result<Bytes, Error>> {
        let (index, generation) = split(id);
        let mut table = self.lock();
        let Some(slot) = table.slots.get_mut(index).filter(|slot| slot.generation == generation) else {
            return Poll::Ready(Err(Error::Closed));
        };
        match &mut slot.state {
            State::Waiting { waker, .. } => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            State::Done(_) => {
                let State::Done(result) = std::mem::replace(&mut slot.state, State::Free) else {
                    unreachable!("matched Done above")
                };
                table.release(index);
                Poll::Ready(result)
            }
            State::Free => Poll::Ready(Err(Error::Closed)),
        }
    }

    /// The call future was dropped before it took its answer: frees the slot
    /// and, when the call was sent, queues its `Cancel` for the leader.
    pub(crate) fn abandon(&self, id: RequestId) {
        let (index, generation) = split(id);
        let mut table = self.lock();
        let Some(slot) = table.slots.get_mut(index).filter(|slot| slot.generation == generation) else { return };
        let sent = match std::mem::replace(&mut slot.state, State::Free) {
            State::Free => return,
            State::Waiting { sent, .. } => sent,
            State::Done(_) => false,
        };
        table.release(index);
        if sent && matches!(table.mode, Mode::Open) {
            table.outgoing.push(Outgoing::Cancel(id));
            let driver = table.driver.take();
            drop(table);
            if let Some(driver) = driver {
                driver.wake();
            }
        } else if !sent {
            // Not sent yet: its entry leaves the batch (and its room to another caller).
            let queued = |entry: &Outgoing| matches!(entry, Outgoing::Invoke { id: queued, .. } if *queued == id);
            if let Some(at) = table.outgoing.iter().position(queued) {
                table.outgoing.remove(at);
                table.queued -= 1;
                for waker in table.room.drain(..) {
                    waker.wake();
                }
            }
        }
    }

    // ---- the driver's side ----

    /// Ready when calls (or cancels) wait in `outgoing`; otherwise keeps the driver's waker.
    pub(crate) fn poll_outgoing(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut table = self.lock();
        if !table.outgoing.is_empty() {
            return Poll::Ready(());
        }
        if !table.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            table.driver = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Connected: new calls are sent, and so are those that waited.
    pub(crate) fn open(&self) {
        self.lock().mode = Mode::Open;
    }

    /// No leader and none reached yet: new calls wait for one (until their deadline).
    pub(crate) fn hold(&self) {
        self.lock().mode = Mode::Hold;
    }

    /// Turns the waiting calls into frames on `out` (their `deadline_ms`
    /// counted from `now`); calls already past their deadline are answered
    /// with [`Error::DeadlineExceeded`] instead. `open` runs before each
    /// call's frame is pushed, so that a channel not yet open on the link is
    /// opened (its `Open` frame on `out`) ahead of its first call.
    pub(crate) fn take(&self, now: Instant, out: &mut Vec<Frame>, mut open: impl FnMut(&'static str, &mut Vec<Frame>)) {
        let mut table = self.lock();
        if table.outgoing.is_empty() || !matches!(table.mode, Mode::Open) {
            return;
        }
        let Table { slots, outgoing, queued, room, .. } = &mut *table;
        *queued = 0;
        for entry in outgoing.drain(..) {
            let (id, channel, payload) = match entry {
                Outgoing::Cancel(id) => {
                    out.push(Frame::Cancel(id));
                    continue;
                }
                Outgoing::Invoke { id, channel, payload } => (id, channel, payload),
            };
            let (index, generation) = split(id);
            let Some(slot) = slots.get_mut(index).filter(|slot| slot.generation == generation) else { continue };
            let State::Waiting { deadline, budget, sent, waker } = &mut slot.state else { continue };
            let Some(left) = deadline.checked_duration_since(now).filter(|left| !left.is_zero()) else {
                let waker = waker.take();
                slot.state = State::Done(Err(Error::DeadlineExceeded(*budget)));
                if let Some(waker) = waker {
                    waker.wake();
                }
                continue;
            };
            *sent = true;
            let deadline_ms = u32::try_from(left.as_millis().max(1)).unwrap_or(u32::MAX);
            open(channel, out);
            out.push(Frame::Invoke(Invoke {
                id,
                channel: ChannelName::from_static(channel),
                deadline_ms,
                oneway: false,
                payload,
            }));
        }
        for waker in room.drain(..) {
            waker.wake();
        }
    }

    /// Answers the call `id` (a late answer, of a call gone, is dropped).
    pub(crate) fn complete(&self, id: RequestId, result: Result<Bytes, Error>) {
        let (index, generation) = split(id);
        let mut table = self.lock();
        let Some(slot) = table.slots.get_mut(index).filter(|slot| slot.generation == generation) else { return };
        let State::Waiting { waker, .. } = &mut slot.state else { return };
        let waker = waker.take();
        slot.state = State::Done(result);
        drop(table);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// At or before the earliest deadline of a waiting call.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        self.lock().earliest
    }

    /// Answers the calls whose deadline is at or before `now` with
    /// [`Error::DeadlineExceeded`]; those sent are cancelled at the leader
    /// (a `Cancel` on `out`) when `connected`.
    pub(crate) fn expire(&self, now: Instant, connected: bool, out: &mut Vec<Frame>) {
        let mut table = self.lock();
        if table.earliest.is_none_or(|due| due > now) {
            return;
        }
        let mut earliest: Option<Instant> = None;
        let Table { slots, outgoing, queued, room, earliest: kept, .. } = &mut *table;
        for (index, slot) in slots.iter_mut().enumerate() {
            let State::Waiting { deadline, budget, sent, waker } = &mut slot.state else { continue };
            if *deadline > now {
                earliest = Some(earliest.map_or(*deadline, |due| due.min(*deadline)));
                continue;
            }
            if *sent && connected {
                out.push(Frame::Cancel(slot_id(index as u32, slot.generation)));
            }
            let waker = waker.take();
            slot.state = State::Done(Err(Error::DeadlineExceeded(*budget)));
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        *kept = earliest;
        // Calls that expired before they were sent leave room for others.
        let before = outgoing.len();
        outgoing.retain(|entry| match entry {
            Outgoing::Invoke { id, .. } => {
                let (index, generation) = split(*id);
                slots
                    .get(index)
                    .is_some_and(|slot| slot.generation == generation && matches!(slot.state, State::Waiting { .. }))
            }
            Outgoing::Cancel(_) => true,
        });
        if outgoing.len() < before {
            *queued = outgoing.iter().filter(|entry| matches!(entry, Outgoing::Invoke { .. })).count();
            for waker in room.drain(..) {
                waker.wake();
            }
        }
    }

    /// Answers every waiting call with `error`, drops what waited for the
    /// driver, and from now on `mode` decides what new calls meet.
    pub(crate) fn fail_all(&self, error: &Error, mode: Mode) {
        let mut table = self.lock();
        table.mode = mode;
        table.outgoing.clear();
        table.queued = 0;
        table.earliest = None;
        for slot in &mut table.slots {
            if let State::Waiting { waker, .. } = &mut slot.state {
                let waker = waker.take();
                slot.state = State::Done(Err(error.clone()));
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
        for waker in table.room.drain(..) {
            waker.wake();
        }
    }

    /// Slots in use (calls waiting, or answered and not yet taken).
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.lock().live
    }

    /// Slots ever made: the slab's size.
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.lock().slots.len()
    }
}

impl Table {
    /// Frees slot `index` (its state already `Free`): its next call gets a new generation.
    fn release(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1) & GENERATIONS;
        self.free.push(index as u32);
        self.live -= 1;
    }
}

/// A call on the slots path: the future [`Client::invoke`](crate::Client::invoke)
/// awaits. Dropped before its answer, it frees its slot and cancels the call
/// at the leader.
pub(crate) struct SlotCall<'a> {
    slots: &'a Slots,
    channel: &'static str,
    /// Until the call is queued for the driver.
    payload: Option<Bytes>,
    deadline: Instant,
    budget: Duration,
    /// Once queued: its slot.
    id: Option<RequestId>,
    /// Only while waiting for room among the calls queued for the driver
    /// (once queued, the driver keeps the deadline).
    room: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<'a> SlotCall<'a> {
    pub(crate) fn new(
        slots: &'a Slots,
        channel: &'static str,
        payload: Bytes,
        deadline: Instant,
        budget: Duration,
    ) -> Self {
        SlotCall { slots, channel, payload: Some(payload), deadline, budget, id: None, room: None }
    }
}

impl Future for SlotCall<'_> {
    type Output = Result<Bytes, Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(id) = this.id {
            let answer = this.slots.poll_answer(id, cx);
            if answer.is_ready() {
                this.id = None;
            }
            return answer;
        }
        let Some(payload) = this.payload.take() else { return Poll::Ready(Err(Error::Closed)) };
        match this.slots.start(this.channel, payload, this.deadline, this.budget, cx) {
            Ok(id) => {
                this.id = Some(id);
                this.room = None;
                Poll::Pending
            }
            Err(Refused::Failed(error)) => Poll::Ready(Err(error)),
            Err(Refused::Full(payload)) => {
                this.payload = Some(payload);
                let deadline = this.deadline;
                let room = this.room.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match room.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(Error::DeadlineExceeded(this.budget))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl Drop for SlotCall<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.slots.abandon(id);
        }
    }
}

#[cfg(test)]
mod tests;
