//! The hub's deliver-to-one side: subscribers joining and leaving a key's
//! dispatch, acks and releases, each event offered to one subscriber, and the
//! per-key task that redelivers what was not acked in time.

use super::*;

impl Hub {
    /// Adds a deliver-to-one subscriber (`sub`: its `SubscribeOne` id) of a
    /// key: acknowledged like [`Hub::subscribe`], never sent a cached value;
    /// events queued for the key go to it at once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscribe_one(
        self: &Arc<Self>,
        session: SessionId,
        outbox: &Arc<Outbox>,
        sub: RequestId,
        key: Bytes,
        window: u32,
        ack_timeout_ms: u32,
    ) {
        if let Some(error) = self.failed.get() {
            Self::ack(outbox, sub, Err(error.clone()));
            return;
        }
        let limits = self.deliver;
        let window = match window {
            0 => limits.default_window,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
        .clamp(1, limits.max_window.max(1));
        let ack_timeout = match ack_timeout_ms {
            0 => limits.ack_timeout,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        let topic = state.topics.entry(key.clone()).or_default();
        let one = topic.one.get_or_insert_with(|| {
            let timer = Arc::new(Notify::new());
            self.tracker.spawn(self.clone().expiry(key.clone(), timer.clone()));
            Box::new(OneTopic {
                dispatch: Dispatch::new(limits.max_queue),
                outboxes: HashMap::new(),
                timer,
                room: Arc::new(Notify::new()),
                dropped: self.undelivered_dropped.clone(),
                armed: None,
            })
        });
        one.outboxes.entry(session).or_insert_with(|| (outbox.clone(), 0)).1 += 1;
        let sends = one.dispatch.join((session, sub), window, ack_timeout, now);
        let attached = self.upstream.get().is_some();
        if (topic.upstream_subscribed && !topic.op_running) || (!attached && self.accept_pending) {
            Self::ack(outbox, sub, Ok(()));
        } else {
            topic.waiters.push(Waiter { session, request: sub, last_seen: None, one: true });
            if attached && !topic.op_running {
                topic.op_running = true;
                self.tracker.spawn(self.clone().drive(key));
            }
        }
        if let Some(one) = topic.one.as_deref_mut() {
            self.send_all(one, sends);
        }
    }

    /// Removes a deliver-to-one subscriber: what it held goes to the others,
    /// marked redelivered (or waits in the key's queue).
    pub(crate) fn unsubscribe_one(self: &Arc<Self>, session: SessionId, sub: RequestId, key: &Bytes) {
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(key) else { return };
        topic.waiters.retain(|w| !(w.one && w.session == session && w.request == sub));
        if let Some(one) = topic.one.as_deref_mut() {
            let sends = one.dispatch.leave((session, sub), tokio::time::Instant::now());
            Self::forget_member(one, session);
            self.send_all(one, sends);
        }
        self.release_if_idle(state, key);
    }

    /// A deliver-to-one subscriber acked or released deliveries.
    pub(crate) fn settle(&self, session: SessionId, sub: RequestId, key: &Bytes, acked: &[u64], released: &[u64]) {
        let mut state = self.lock();
        let Some(one) = state.topics.get_mut(key).and_then(|topic| topic.one.as_deref_mut()) else { return };
        let sends = one.dispatch.settle((session, sub), acked, released, tokio::time::Instant::now());
        self.send_all(one, sends);
        if !one.dispatch.full() {
            one.room.notify_waiters();
        }
    }

    /// One member of `session` left: the session's outbox is kept while it has others.
    pub(super) fn forget_member(one: &mut OneTopic, session: SessionId) {
        if let Some((_, members)) = one.outboxes.get_mut(&session) {
            *members -= 1;
            if *members == 0 {
                one.outboxes.remove(&session);
            }
        }
    }

    /// A waiter whose subscription failed leaves; its session's outbox, for the answer.
    pub(super) fn drop_waiter(&self, topic: &mut Topic, waiter: &Waiter) -> Option<Arc<Outbox>> {
        if !waiter.one {
            return topic.subscribers.remove(&waiter.session);
        }
        let one = topic.one.as_deref_mut()?;
        let outbox = one.outboxes.get(&waiter.session).map(|(outbox, _)| outbox.clone());
        let sends = one.dispatch.leave((waiter.session, waiter.request), tokio::time::Instant::now());
        Self::forget_member(one, waiter.session);
        self.send_all(one, sends);
        outbox
    }

    /// A new event of a key with a deliver-to-one side: to one subscriber, or
    /// queued, or (the queue full) dropped, logged and counted.
    pub(super) fn offer_one(&self, one: &mut OneTopic, key: &Bytes, seq: u64, payload: Bytes) {
        match one.dispatch.offer(seq, payload, tokio::time::Instant::now()) {
            Ok(sends) => self.send_all(one, sends),
            Err(full) => {
                let dropped = self.undelivered_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged once per power of two, so a flood does not flood the log.
                if dropped.is_power_of_two() {
                    tracing::warn!(channel = %self.channel, key = %display_key(key), error = %full, dropped_total = dropped,
                        "deliver-to-one event dropped: its queue is full");
                }
            }
        }
    }

    /// Sends deliveries to their members' sessions, and wakes the key's
    /// deadline task if the earliest deadline moved earlier.
    pub(super) fn send_all(&self, one: &mut OneTopic, sends: Vec<Send>) {
        if sends.is_empty() {
            return;
        }
        for Send { member: (session, sub), tag, item } in sends {
            if let Some((outbox, _)) = one.outboxes.get(&session) {
                // A closed outbox: its session is ending, and its leave puts the event back.
                outbox.push(Frame::Delivery(Delivery {
                    sub,
                    tag,
                    epoch: self.epoch,
                    seq: item.seq,
                    payload: item.payload,
                    redelivered: item.redelivered,
                }));
            }
        }
        let next = one.dispatch.next_deadline();
        if next.is_some() && one.armed.is_none_or(|armed| next < Some(armed)) {
            one.armed = next;
            one.timer.notify_one();
        }
    }

    /// Redelivers a key's deliveries whose ack deadline passed, until the key's
    /// deliver-to-one side is gone.
    pub(super) async fn expiry(self: Arc<Self>, key: Bytes, timer: Arc<Notify>) {
        let far = Duration::from_secs(86_400 * 365);
        loop {
            let at = {
                let mut state = self.lock();
                let Some(one) = state.topics.get_mut(&key).and_then(|t| t.one.as_deref_mut()) else { return };
                if !Arc::ptr_eq(&one.timer, &timer) {
                    return;
                }
                one.armed = one.dispatch.next_deadline();
                one.armed.unwrap_or_else(|| tokio::time::Instant::now() + far)
            };
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = timer.notified() => {}
                () = self.cancel.cancelled() => return,
            }
            let mut state = self.lock();
            let Some(one) = state.topics.get_mut(&key).and_then(|t| t.one.as_deref_mut()) else { return };
            if !Arc::ptr_eq(&one.timer, &timer) {
                return;
            }
            let now = tokio::time::Instant::now();
            if one.dispatch.next_deadline().is_some_and(|due| due <= now) {
                let sends = one.dispatch.expire(now);
                tracing::debug!(channel = %self.channel, key = %display_key(&key), redelivered = sends.len(), "deliver-to-one ack deadline passed");
                self.send_all(one, sends);
                if !one.dispatch.full() {
                    one.room.notify_waiters();
                }
            }
        }
    }
}
