//! The core's subscriptions: the topics kept across links (subscribe, release),
//! the leader's answers and events for them, and resubscribing on a new link.

use super::*;

impl Core {
    pub(crate) fn subscribe(&mut self, channel: &'static str, key: Bytes, reply: SubscribeReply) {
        let ready = self.channel_ready(channel);
        let capacity = self.config.subscription_buffer.max(1);
        let topic = self.topics.entry((channel, key.clone())).or_insert_with(|| Topic {
            last: None,
            feed: Feed::new(capacity),
            locals: 0,
            remote: Remote::Unsent,
            waiters: Vec::new(),
            resynced: false,
        });
        topic.locals += 1;
        if topic.remote == Remote::Active {
            if reply.send(Ok(topic.parts())).is_err() {
                topic.locals -= 1;
            }
            return;
        }
        topic.waiters.push(reply);
        if topic.remote == Remote::Unsent && ready {
            let last_seen = topic.last.as_ref().map(|u| u.position);
            self.send_subscribe(channel, key, last_seen);
        }
    }

    pub(crate) fn send_subscribe(&mut self, channel: &'static str, key: Bytes, last_seen: Option<Position>) {
        let id = self.next_id();
        if let Some(topic) = self.topics.get_mut(&(channel, key.clone())) {
            topic.remote = Remote::Pending(id);
            topic.resynced = last_seen.is_some();
        }
        self.in_flight.insert(id, Pending::Subscribe { channel, key: key.clone() });
        self.out.push(Frame::Subscribe(Subscribe { id, channel: ChannelName::from_static(channel), key, last_seen }));
    }

    /// One subscription handle let go of a topic (not of one the leader ended:
    /// those handles hold no share of a topic made again for the same key).
    pub(crate) fn release(&mut self, channel: &'static str, key: Bytes, feed: &Feed) {
        let topic_key = (channel, key);
        let Some(topic) = self.topics.get_mut(&topic_key).filter(|topic| topic.feed.same(feed)) else { return };
        topic.locals = topic.locals.saturating_sub(1);
        if topic.locals > 0 {
            return;
        }
        let remote = topic.remote;
        self.topics.remove(&topic_key);
        if remote != Remote::Unsent && matches!(self.status.borrow().link, LinkState::Connected { .. }) {
            let id = self.next_id();
            self.in_flight.insert(id, Pending::Unsubscribe);
            self.out.push(Frame::Unsubscribe(Unsubscribe {
                id,
                channel: ChannelName::from_static(channel),
                key: topic_key.1,
            }));
        }
    }

    pub(crate) fn on_subscribed(
        &mut self,
        id: RequestId,
        channel: &'static str,
        key: Bytes,
        result: Result<(), RemoteError>,
    ) {
        let topic_key = (channel, key);
        let Some(topic) = self.topics.get_mut(&topic_key) else { return };
        if topic.remote != Remote::Pending(id) {
            return;
        }
        match result {
            Ok(()) => {
                topic.remote = Remote::Active;
                topic.answer_waiters(Ok(()));
            }
            Err(error) => {
                tracing::warn!(channel, %error, "subscribe refused by the leader");
                topic.remote = Remote::Unsent;
                topic.answer_waiters(Err(Error::Remote(error)));
                if topic.locals > 0 && self.retry_at.is_none() {
                    // Live subscriptions must not stall: ask again shortly.
                    self.retry_at = Some(Instant::now() + RESUBSCRIBE_RETRY);
                }
            }
        }
        if topic.locals == 0 {
            let remote = topic.remote;
            self.topics.remove(&topic_key);
            if remote == Remote::Active {
                let id = self.next_id();
                self.in_flight.insert(id, Pending::Unsubscribe);
                self.out.push(Frame::Unsubscribe(Unsubscribe {
                    id,
                    channel: ChannelName::from_static(channel),
                    key: topic_key.1,
                }));
            }
        }
    }

    /// The leader ended a subscription: its streams end (after what they
    /// hold), with the reason, and the topic is forgotten (a new `subscribe`
    /// starts afresh). Only an active one: an `Ended` sent before this
    /// follower let go of the key and asked again is for the old subscription.
    pub(crate) fn on_ended(&mut self, ended: Ended) {
        let Some(channel) = self.static_channel(&ended.channel) else { return };
        let topic_key = (channel, ended.key);
        if !self.topics.get(&topic_key).is_some_and(|topic| topic.remote == Remote::Active) {
            return;
        }
        let Some(mut topic) = self.topics.remove(&topic_key) else { return };
        tracing::warn!(channel, error = %ended.error, "the leader ended a subscription");
        topic.feed.end(ended.error.clone());
        topic.answer_waiters(Err(Error::Remote(ended.error)));
        // Dropping the topic closes its feed: every stream of it ends once drained.
    }

    pub(crate) fn on_event(&mut self, event: Event) {
        let Some(channel) = self.static_channel(&event.channel) else { return };
        let position = event.position();
        let Some(topic) = self.topics.get_mut(&(channel, event.key)) else { return };
        // Exactly-once, in order: anything at or below what was delivered is a replay.
        if topic.last.as_ref().is_some_and(|last| last.position >= position) {
            return;
        }
        let resynced = std::mem::take(&mut topic.resynced);
        let update = RawUpdate { position, payload: event.payload, cached: event.cached };
        // (A live value never hides behind a cached copy of itself: it is delivered.)
        if resynced
            && topic.last.as_ref().is_some_and(|last| last.payload == update.payload && (update.cached || !last.cached))
        {
            // The same value, re-announced by a new leader: move the position on, deliver nothing.
            topic.last = Some(update.clone());
            topic.feed.set(update);
            return;
        }
        topic.last = Some(update.clone());
        topic.feed.publish(update);
    }

    pub(crate) fn resubscribe_all(&mut self) {
        for channel in self.channels.clone() {
            if self.channel_ready(channel) {
                self.resubscribe(channel);
            }
        }
    }

    pub(crate) fn resubscribe(&mut self, channel: &'static str) {
        let unsent: Vec<(Bytes, Option<Position>)> = self
            .topics
            .iter()
            .filter(|((c, _), topic)| *c == channel && topic.remote == Remote::Unsent)
            .map(|((_, key), topic)| (key.clone(), topic.last.as_ref().map(|u| u.position)))
            .collect();
        for (key, last_seen) in unsent {
            self.send_subscribe(channel, key, last_seen);
        }
        self.with_ones(|ones, step| ones.resubscribe(step, channel));
    }
}
