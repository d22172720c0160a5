//! The hub's side towards the upstream: one task per key drives its upstream
//! subscription (subscribe, retry with backoff, unsubscribe), and a pump per
//! subscribed key polls its stream into the hub.

use super::*;

impl Hub {
    /// Reads a key's last-known-good value off the hub's path and serves it,
    /// unless a live value (or a new lookup) came first.
    pub(super) async fn lookup(self: Arc<Self>, key: Bytes, token: u64) {
        let Some(cache) = self.cache.clone() else { return };
        let (channel, file_key) = (self.channel.clone(), key.clone());
        let Ok(Some(payload)) = tokio::task::spawn_blocking(move || cache.load(&channel, &file_key)).await else {
            return;
        };
        if !crate::fits_in_frame(self.max_frame_length, &[self.channel.as_bytes(), &key, &payload]) {
            tracing::warn!(channel = %self.channel, bytes = payload.len(), "cached value too large for a frame; ignored");
            return;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(topic) = state.topics.get_mut(&key) else { return };
        if topic.lookup != token || topic.last.is_some() {
            return;
        }
        topic.lookup = 0;
        state.next_seq += 1;
        let seq = state.next_seq;
        let event = Event {
            channel: self.channel.clone().into(),
            key: key.clone(),
            epoch: self.epoch,
            seq,
            payload,
            cached: true,
        };
        let Ok(event) = SharedFrame::encode(Frame::Event(event), self.max_frame_length) else { return };
        tracing::debug!(channel = %self.channel, seq, "serving a last-known-good value");
        for outbox in topic.subscribers.values() {
            outbox.push_event(&self.channel, &key, &event);
        }
        topic.last = Some((seq, event));
    }

    /// Retries the upstream subscribe of a key whose acknowledged subscribers wait, after `delay`.
    /// (Boxed: it and `drive` spawn each other.)
    pub(super) fn retry_later(self: Arc<Self>, key: Bytes, delay: Duration) -> BoxFuture<()> {
        Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.cancel.cancelled() => return,
            }
            {
                let mut state = self.lock();
                let Some(topic) = state.topics.get_mut(&key) else { return };
                if topic.op_running || topic.upstream_subscribed || topic.idle() {
                    return;
                }
                topic.op_running = true;
            }
            self.drive(key).await
        })
    }

    /// Drives one key's upstream subscription until it matches its subscribers.
    pub(super) async fn drive(self: Arc<Self>, key: Bytes) {
        let Some(upstream) = self.upstream.get().cloned() else {
            let mut state = self.lock();
            if let Some(topic) = state.topics.get_mut(&key) {
                topic.op_running = false;
            }
            return;
        };
        enum Step {
            Subscribe(u64, Option<tokio::time::Instant>, Option<u64>),
            Unsubscribe,
        }
        loop {
            let step = {
                let mut state = self.lock();
                let state = &mut *state;
                let Some(topic) = state.topics.get_mut(&key) else { return };
                if !topic.idle() && !topic.upstream_subscribed {
                    state.next_generation += 1;
                    topic.generation = state.next_generation;
                    Step::Subscribe(topic.generation, topic.resubscribe_at.take(), topic.resume.take())
                } else if topic.idle() && topic.upstream_subscribed {
                    topic.generation = 0;
                    self.forget_value(topic, &key);
                    Step::Unsubscribe
                } else {
                    // Stable: answer whoever waited, then stop (or forget the key).
                    for waiter in std::mem::take(&mut topic.waiters) {
                        if let Some(outbox) = topic.outbox_of(&waiter) {
                            Self::ack(outbox, waiter.request, Ok(()));
                            if !waiter.one {
                                self.send_cached(topic, outbox, &key, waiter.last_seen);
                            }
                        }
                    }
                    topic.op_running = false;
                    if topic.idle() {
                        self.forget_value(topic, &key);
                        state.topics.remove(&key);
                    }
                    return;
                }
            };
            match step {
                Step::Subscribe(generation, not_before, resume) => {
                    if let Some(at) = not_before {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            _ = self.cancel.cancelled() => return,
                        }
                    }
                    let direct = {
                        let (hub, topic) = (Arc::downgrade(&self), key.clone());
                        let deliver = Box::new(move |payload, revision| {
                            hub.upgrade().is_some_and(|hub| {
                                hub.deliver(&topic, generation, payload, revision) || hub.is_live(&topic, generation)
                            })
                        });
                        let (hub, topic) = (Arc::downgrade(&self), key.clone());
                        let room: Room = Arc::new(move || hub.upgrade().and_then(|hub| hub.room(&topic)));
                        DirectSink { deliver, room }
                    };
                    let result = tokio::time::timeout(self.op_timeout, upstream.subscribe(key.clone(), resume, direct))
                        .await
                        .unwrap_or_else(|_| {
                            Err(RemoteError::unavailable(format!(
                                "upstream subscribe took longer than {} ms",
                                self.op_timeout.as_millis()
                            )))
                        });
                    let mut state = self.lock();
                    let Some(topic) = state.topics.get_mut(&key) else { return };
                    match result {
                        Ok(events) => {
                            topic.upstream_subscribed = true;
                            // Spawned without the hub's lock: a runtime shutting down drops
                            // the future in `spawn`, and dropping a stream may take its lock.
                            drop(state);
                            let done = self.tracker.spawn(self.clone().pump(key.clone(), generation, events));
                            let mut state = self.lock();
                            match state.topics.get_mut(&key) {
                                Some(topic) if topic.generation == generation => topic.pump = Some(Pump { done }),
                                // Ended already (it said so) or superseded.
                                _ => done.abort(),
                            }
                        }
                        Err(error) => {
                            // Those waiting for this answer get the error.
                            for waiter in std::mem::take(&mut topic.waiters) {
                                if let Some(outbox) = self.drop_waiter(topic, &waiter) {
                                    Self::ack(&outbox, waiter.request, Err(error.clone()));
                                }
                            }
                            topic.generation = 0;
                            if topic.idle() {
                                tracing::warn!(channel = %self.channel, key = %display_key(&key), %error, "upstream subscribe failed");
                                self.forget_value(topic, &key);
                            } else if !error.is_retryable() {
                                // Acknowledged as pending, now refused for good: every
                                // subscriber is told, at once, and the key is forgotten.
                                tracing::warn!(channel = %self.channel, key = %display_key(&key), %error,
                                    subscribers = topic.subscribers.len(),
                                    "the upstream refused a pending subscription; ending it for its subscribers");
                                for outbox in topic.subscribers.values() {
                                    outbox.forget_key(&self.channel, &key);
                                }
                                let ones = topic.one.iter().flat_map(|one| one.outboxes.values().map(|(o, _)| o));
                                for outbox in topic.subscribers.values().chain(ones) {
                                    let channel = self.channel.clone().into();
                                    outbox.push(Frame::Ended(Ended {
                                        channel,
                                        key: key.clone(),
                                        error: error.clone(),
                                    }));
                                }
                                self.forget_value(topic, &key);
                                state.topics.remove(&key);
                                return;
                            } else {
                                // Subscribers acknowledged as pending stay: an
                                // acknowledged subscription is never left dead.
                                topic.op_running = false;
                                let delay = self.backoff(topic, &key, &error, "upstream subscribe failed");
                                drop(state);
                                self.tracker.spawn(self.clone().retry_later(key, delay));
                                return;
                            }
                        }
                    }
                }
                Step::Unsubscribe => {
                    let pump = {
                        let mut state = self.lock();
                        state.topics.get_mut(&key).and_then(|topic| topic.pump.take())
                    };
                    if let Some(pump) = pump {
                        // The pump drops the stream (the upstream's unsubscribe) and ends.
                        pump.done.abort();
                        match pump.done.await {
                            Err(error) if error.is_panic() => {
                                tracing::warn!(channel = %self.channel, %error, "a subscription's pump task failed")
                            }
                            // Ended or aborted: either way its stream is dropped now.
                            _ => {}
                        }
                    }
                    let mut state = self.lock();
                    let Some(topic) = state.topics.get_mut(&key) else { return };
                    topic.upstream_subscribed = false;
                }
            }
        }
    }

    /// The next pause before subscribing `key` again for its acknowledged
    /// subscribers (doubling); WARN the first time, with why.
    pub(super) fn backoff(&self, topic: &mut Topic, key: &Bytes, error: &RemoteError, what: &str) -> Duration {
        let first = topic.retry.is_none();
        let delay = topic.retry.get_or_insert_with(|| Backoff::new(self.retry_initial, self.retry_max)).next_delay();
        if first {
            tracing::warn!(channel = %self.channel, key = %display_key(key), %error, retry_ms = delay.as_millis() as u64, "{what}; retrying for the pending subscribers");
        } else {
            tracing::debug!(channel = %self.channel, key = %display_key(key), %error, retry_ms = delay.as_millis() as u64, "{what} again");
        }
        delay
    }

    /// Polls one key's stream into the hub until it is stopped (the stream is
    /// dropped here: the unsubscribe) or ends (the upstream lost it).
    pub(super) async fn pump(self: Arc<Self>, key: Bytes, generation: u64, mut events: ByteEvents) {
        // An adapter's stream that panics is treated as one that ended (and logged).
        let mut delivered = false;
        let why = 'pump: loop {
            let next = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                next = AssertUnwindSafe(events.next()).catch_unwind() => next,
            };
            let mut next = Some(next);
            // What else is ready goes out in the same wakeup.
            while let Some(polled) = next.take() {
                match polled {
                    Ok(Some((payload, revision))) => {
                        if self.deliver(&key, generation, payload, revision) {
                            if !delivered {
                                delivered = true;
                                self.delivered(&key, generation);
                            }
                        } else if !self.is_live(&key, generation) {
                            return;
                        }
                    }
                    Ok(None) => break 'pump "the upstream ended the key's stream",
                    Err(panic) => {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(channel = %self.channel, key = %display_key(&key), panic = %why, "the upstream's stream for a key panicked; subscribing the key again");
                        break 'pump "the upstream's stream panicked";
                    }
                }
                next = AssertUnwindSafe(events.next()).catch_unwind().now_or_never();
            }
        };
        drop(events);
        let mut state = self.lock();
        let Some(topic) = state.topics.get_mut(&key) else { return };
        if topic.generation != generation || generation == 0 {
            return;
        }
        topic.generation = 0;
        topic.upstream_subscribed = false;
        topic.pump = None;
        if topic.idle() {
            return;
        }
        let error = RemoteError::unavailable(why);
        let delay = self.backoff(topic, &key, &error, "the upstream ended a subscription");
        topic.resubscribe_at = Some(tokio::time::Instant::now() + delay);
        // With a drive running, it sees the key unsubscribed and subscribes it again, not before then.
        if !topic.op_running {
            drop(state);
            self.tracker.spawn(self.clone().retry_later(key, delay));
        }
    }
}
