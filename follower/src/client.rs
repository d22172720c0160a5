//! The typed handle of one channel: the same in every process, leader or follower.

use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tandem_protocol::ErrorCode;

use tokio::time::Instant;

use bytes::Bytes;
use tandem_protocol::payload::{decode, encode};
use tandem_protocol::{Api, RemoteError, RequestId, UpstreamState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::Command;
use crate::config::CallPath;
use crate::slots::SlotCall;
use crate::state::{State, Status};
use crate::{Connection, Error, Subscription};

/// The handle every process uses to call, subscribe and publish on one channel.
///
/// In the leader's own process it talks to the leader through memory; in a
/// follower, through the leader's socket (or the cluster relay). Either way the
/// semantics are the same: deadlines, cancellation on drop, shared
/// subscriptions with a cached last value. Cheap to clone.
pub struct Client<A: Api> {
    connection: Connection,
    _api: PhantomData<fn() -> A>,
}

impl<A: Api> Clone for Client<A> {
    fn clone(&self) -> Self {
        Client { connection: self.connection.clone(), _api: PhantomData }
    }
}

impl<A: Api> std::fmt::Debug for Client<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("channel", &A::NAME).field("state", &self.state()).finish()
    }
}

/// Refuses a payload that cannot fit in one frame, before it is queued.
fn check_size(payload: &Bytes) -> Result<(), Error> {
    const OVERHEAD: usize = 256;
    let max = tandem_protocol::DEFAULT_MAX_FRAME_LENGTH - OVERHEAD;
    if payload.len() > max {
        return Err(Error::Remote(
            RemoteError::bad_request(format!("request of {} bytes exceeds the {max}-byte limit", payload.len()))
                .with_code(ErrorCode::TOO_LARGE),
        ));
    }
    Ok(())
}

/// Sends `Cancel` for a call whose future is dropped before its answer.
struct CancelOnDrop<'a> {
    id: RequestId,
    drops: &'a mpsc::UnboundedSender<Command>,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.drops.send(Command::Cancel(self.id));
        }
    }
}

impl<A: Api> Client<A> {
    pub(crate) fn new(connection: Connection) -> Self {
        Client { connection, _api: PhantomData }
    }

    /// The connection this client uses.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Calls the upstream with the default deadline.
    pub async fn invoke(&self, request: A::Request) -> Result<A::Response, Error> {
        self.invoke_with_deadline(request, self.connection.inner.config.default_deadline).await
    }

    /// Calls the upstream. The call ends within `deadline` with its answer or a
    /// typed error; dropping the future cancels it at the leader too.
    pub async fn invoke_with_deadline(&self, request: A::Request, deadline: Duration) -> Result<A::Response, Error> {
        let payload = encode(&request)?;
        let bytes = match self.connection.inner.config.calls {
            CallPath::Slots => self.slot_call(payload, deadline).await?,
            CallPath::Queue => self.call(payload, deadline, false).await?,
        };
        Ok(decode(&bytes)?)
    }

    /// Calls the upstream without waiting for (or getting) an answer. Returns
    /// once the call is handed to the connection.
    pub async fn invoke_oneway(&self, request: A::Request) -> Result<(), Error> {
        let payload = encode(&request)?;
        let deadline = self.connection.inner.config.default_deadline;
        self.call(payload, deadline, true).await.map(|_| ())
    }

    /// A call on the slots path ([`CallPath::Slots`]).
    async fn slot_call(&self, payload: Bytes, deadline: Duration) -> Result<Bytes, Error> {
        check_size(&payload)?;
        let until = Instant::now() + deadline;
        SlotCall::new(&self.connection.inner.slots, A::NAME, payload, until, deadline).await
    }

    async fn call(&self, payload: Bytes, deadline: Duration, oneway: bool) -> Result<Bytes, Error> {
        let inner = &self.connection.inner;
        check_size(&payload)?;
        if oneway && self.state() == State::LeaderLost {
            return Err(Error::LeaderLost);
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + deadline;
        let (reply, answer) = if oneway {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let command =
            Command::Invoke { id, channel: A::NAME, deadline: until, budget: deadline, oneway, payload, reply };
        // Once the driver has the call it keeps the deadline (one timer for all
        // its calls, none per call) and cancels the call at the leader; until
        // then, the wait for room in the queue is bounded here.
        let mut guard = CancelOnDrop { id, drops: &inner.drops, armed: false };
        match inner.commands.try_send(command) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(command)) => {
                match tokio::time::timeout_at(until, inner.commands.send(command)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(Error::Closed),
                    Err(_) => return Err(Error::DeadlineExceeded(deadline)),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::Closed),
        }
        let Some(answer) = answer else { return Ok(Bytes::new()) };
        // Dropped from here on, the call is cancelled at the leader.
        guard.armed = true;
        let result = answer.await.map_err(|_| Error::Closed)?;
        guard.armed = false;
        result
    }

    /// Subscribes to a key: the first subscriber on the host makes the one
    /// upstream subscription; later ones get the cached value at once.
    /// Waits for the leader's answer within the default deadline.
    pub async fn subscribe(&self, key: A::Key) -> Result<Subscription<A>, Error> {
        let inner = &self.connection.inner;
        let key = encode(&key)?;
        let deadline = inner.config.default_deadline;
        let (reply, answer) = oneshot::channel();
        let command = Command::Subscribe { channel: A::NAME, key: key.clone(), reply };
        let work = async {
            inner.commands.send(command).await.map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        };
        let parts = tokio::time::timeout(deadline, work).await.unwrap_or(Err(Error::DeadlineExceeded(deadline)))?;
        Ok(Subscription::new(A::NAME, key, parts, self.connection.clone()))
    }

    /// Subscribes to a key in deliver-to-one mode, with the leader's defaults:
    /// each event of the key goes to ONE deliver-to-one subscriber of it
    /// among all the processes of the host (round-robin among those with room
    /// in their window), and is redelivered to another, marked
    /// [`redelivered`](crate::Delivery::redelivered), unless it is
    /// [acked](crate::Delivery::ack) in time: at-least-once. No cached value is
    /// replayed: a subscriber gets only the events that arrive (or are
    /// redelivered) while it is subscribed. Waits for the leader's answer
    /// within the default deadline. See `docs/deliver-to-one.md`.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// # use tandem_follower::Client;
    /// # struct Jobs;
    /// # impl tandem_protocol::Api for Jobs {
    /// #     const NAME: &'static str = "jobs";
    /// #     type Key = String; type Event = String; type Request = String; type Response = String;
    /// # }
    /// # fn process(_: &str) {}
    /// # async fn run(jobs: Client<Jobs>) -> Result<(), tandem_follower::Error> {
    /// let mut work = jobs.subscribe_one("resize".to_string()).await?;
    /// while let Some(job) = work.next().await {
    ///     if job.redelivered() {
    ///         // Another subscriber may have processed it already: be idempotent.
    ///     }
    ///     process(job.value());
    ///     job.ack(); // dropped unacked, it goes to another subscriber
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_one(&self, key: A::Key) -> Result<crate::Deliveries<A>, Error> {
        self.subscribe_one_with(key, crate::DeliverOptions::default()).await
    }

    /// [`subscribe_one`](Client::subscribe_one) with a window and an ack timeout of its own.
    pub async fn subscribe_one_with(
        &self,
        key: A::Key,
        options: crate::DeliverOptions,
    ) -> Result<crate::Deliveries<A>, Error> {
        let inner = &self.connection.inner;
        let key = encode(&key)?;
        let deadline = inner.config.default_deadline;
        let (reply, answer) = oneshot::channel();
        let command = Command::SubscribeOne { channel: A::NAME, key, options, reply };
        let work = async {
            inner.commands.send(command).await.map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        };
        let parts = tokio::time::timeout(deadline, work).await.unwrap_or(Err(Error::DeadlineExceeded(deadline)))?;
        Ok(crate::Deliveries::new(parts, self.connection.clone()))
    }

    /// Publishes through the upstream and waits for its acknowledgement
    /// (within the default deadline).
    pub async fn publish(&self, request: A::Request) -> Result<(), Error> {
        let inner = &self.connection.inner;
        let payload = encode(&request)?;
        check_size(&payload)?;
        let deadline = inner.config.default_deadline;
        let (reply, answer) = oneshot::channel();
        let work = async {
            inner
                .commands
                .send(Command::Publish { channel: A::NAME, payload, reply })
                .await
                .map_err(|_| Error::Closed)?;
            answer.await.map_err(|_| Error::Closed)?
        };
        tokio::time::timeout(deadline, work).await.unwrap_or(Err(Error::DeadlineExceeded(deadline)))
    }

    /// Whether this process is the leader.
    pub fn is_leader(&self) -> bool {
        self.connection.is_leader()
    }

    /// The channel's state now.
    pub fn state(&self) -> State {
        self.connection.inner.status.borrow().state_of(A::NAME)
    }

    /// The connection's state, observable (use [`Status::state_of`] with `A::NAME`).
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.connection.status()
    }

    /// Waits until the channel is ready (a leader is connected and its upstream
    /// is up), for at most `Config::max_wait`. Fails at once with the upstream's
    /// error if it failed to start, with [`Error::Rejected`] if the leader
    /// refused this follower, and with [`Error::Startup`] if no leader can be
    /// reached with these settings.
    pub async fn ready(&self) -> Result<(), Error> {
        let max_wait = self.connection.inner.config.max_wait;
        let mut status = self.connection.status();
        let wait = status.wait_for(|status| {
            matches!(status.channels.get(A::NAME), Some(UpstreamState::Ready | UpstreamState::Down(_)))
                || matches!(status.state_of(A::NAME), State::Closed | State::Rejected(_) | State::Failed(_))
        });
        let status = match tokio::time::timeout(max_wait, wait).await {
            Err(_) => return Err(Error::NotReady(max_wait)),
            Ok(Err(_)) => return Err(Error::Closed),
            Ok(Ok(status)) => status.clone(),
        };
        match status.state_of(A::NAME) {
            State::Ready => Ok(()),
            State::UpstreamDown(error) => Err(Error::Remote(error)),
            State::Closed => Err(Error::Closed),
            State::Rejected(error) => Err(Error::Rejected(error)),
            State::Failed(failure) => Err(Error::Startup(failure)),
            _ => Err(Error::LeaderLost),
        }
    }

    /// Closes the connection (all channels' clients that share it).
    pub async fn close(&self) {
        self.connection.close().await
    }
}
