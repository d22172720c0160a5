//! The calls a session serves: `Invoke` and `Publish` (inline when the upstream
//! answers at once, else a task), and the answer each gets.

use super::*;

impl Session {
    /// Answers a call inline (see [`answer`] for what is sent).
    pub(super) fn respond(&mut self, id: RequestId, oneway: bool, result: Result<Bytes, RemoteError>) {
        if let Some(frame) = answer(self.shared.config.max_frame_length, id, oneway, result) {
            self.push(frame);
        }
    }

    pub(super) fn invoke(&mut self, invoke: Invoke) -> Result<(), SessionEnd> {
        let Invoke { id, channel, deadline_ms, oneway, payload } = invoke;
        let arrived = self.burst_at;
        let channel = match self.channel(&channel) {
            Ok(channel) => channel.clone(),
            Err(error) => {
                self.respond(id, oneway, Err(error));
                return Ok(());
            }
        };
        let deadline = arrived + Duration::from_millis(u64::from(deadline_ms));
        let ctx = CallContext::until(deadline);
        let context = ctx.clone();
        let mut call: BoxFuture<Result<Bytes, RemoteError>> = match channel.upstream.get() {
            Some(upstream) => upstream.invoke(payload, ctx),
            None => Box::pin(async move {
                let upstream = channel.ready_upstream(deadline).await?;
                upstream.invoke(payload, ctx).await
            }),
        };
        // Fast path: an upstream that answers without waiting (a cache, a local
        // computation) is answered inline, with no task, timer or table entry.
        // Polling with a no-op waker is sound: a pending future re-registers the
        // real waker when the task below polls it again.
        if let Poll::Ready(result) = call.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            self.answered_inline += 1;
            self.respond(id, oneway, result);
            return Ok(());
        }
        // It waits: its cancellation token is needed now (by the table, and by
        // the upstream through `ctx`, which shares it).
        let token = context.cancelled().clone();
        drop(context);
        {
            let mut in_flight = lock_in_flight(&self.in_flight);
            if in_flight.len() >= self.shared.config.max_in_flight {
                drop(in_flight);
                let limit = self.shared.config.max_in_flight;
                self.respond(id, oneway, Err(RemoteError::rejected(format!("more than {limit} calls in flight"))));
                return Ok(());
            }
            if in_flight.contains_key(&id) {
                return Err(SessionEnd::ProtocolViolation(Violation::DuplicateRequest(id)));
            }
            in_flight.insert(id, token.clone());
        }
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let (outbox, in_flight, shared) = (self.outbox.clone(), self.in_flight.clone(), self.shared.clone());
        let session = self.cancel.clone();
        self.shared.tracker.spawn(
            async move {
                let result = tokio::select! {
                    result = tokio::time::timeout_at(deadline, call) => result.unwrap_or_else(|_| {
                        // The caller stops waiting now: so does work the upstream handed off.
                        token.cancel();
                        Err(RemoteError::deadline_exceeded(format!("call took longer than its {deadline_ms} ms deadline")))
                    }),
                    // Cancelled by the follower or its disconnect: nobody waits for an answer.
                    _ = token.cancelled() => return,
                    _ = session.cancelled() => return,
                };
                if lock_in_flight(&in_flight).remove(&id).is_some() {
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    shared.call_latency.record(arrived.elapsed());
                    if let Some(frame) = answer(shared.config.max_frame_length, id, oneway, result) {
                        outbox.push(frame);
                    }
                }
            }
            .in_current_span(),
        );
        Ok(())
    }

    pub(super) fn publish(&mut self, publish: Publish) {
        let Publish { id, channel, payload } = publish;
        let channel = match self.channel(&channel) {
            Ok(channel) => channel.clone(),
            Err(error) => {
                self.outbox.push(Frame::Ack(Ack { id, result: Err(error) }));
                return;
            }
        };
        // Publishes are bounded too: globally, at 4x the per-follower call limit.
        let in_flight = self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        if in_flight >= self.shared.config.max_in_flight.saturating_mul(4) {
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            let error = RemoteError::rejected("too many calls and publishes in flight");
            self.outbox.push(Frame::Ack(Ack { id, result: Err(error) }));
            return;
        }
        let (outbox, cancel, shared) = (self.outbox.clone(), self.cancel.clone(), self.shared.clone());
        let limit = self.shared.config.upstream_timeout;
        self.shared.tracker.spawn(
            async move {
                let deadline = Instant::now() + limit;
                let token = cancel.child_token();
                let ctx = CallContext::with_token(deadline, token.clone());
                let publish = async {
                    let upstream = channel.ready_upstream(deadline).await?;
                    upstream.publish(payload, ctx).await
                };
                tokio::select! {
                    result = tokio::time::timeout_at(deadline, publish) => {
                        let result = result.unwrap_or_else(|_| {
                            token.cancel();
                            Err(RemoteError::deadline_exceeded(format!("publish took longer than {} ms", limit.as_millis())))
                        });
                        outbox.push(Frame::Ack(Ack { id, result }));
                    }
                    _ = cancel.cancelled() => {}
                }
                shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            .in_current_span(),
        );
    }
}

/// The one way a call is answered, inline or from its task: the `Response`
/// (the answer, or a typed error when it would not fit in one frame); for a
/// one-way call nothing, and a failure is logged instead.
fn answer(max_frame: usize, id: RequestId, oneway: bool, result: Result<Bytes, RemoteError>) -> Option<Frame> {
    let result = result.and_then(|bytes| fit_response(max_frame, bytes));
    if !oneway {
        return Some(Frame::Response(Response { id, result }));
    }
    if let Err(error) = result {
        tracing::warn!(request.id = id, %error, "one-way call failed");
    }
    None
}

/// The answer itself, or a typed error if it would not fit in one frame.
fn fit_response(max: usize, bytes: Bytes) -> Result<Bytes, RemoteError> {
    if crate::fits_in_frame(max, &[&bytes]) {
        Ok(bytes)
    } else {
        Err(RemoteError::internal(format!("response of {} bytes exceeds the {max}-byte frame limit", bytes.len()))
            .with_code(ErrorCode::TOO_LARGE))
    }
}
