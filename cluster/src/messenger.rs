//! The messenger: messages between the master, the agent and the workers,
//! relayed by the master.
//!
//! Every process has one [`Messenger`]. A message is a topic and opaque payload
//! bytes (MessagePack through [`encode`] / [`Envelope::decode`] for typed use).
//! Each send is acknowledged by the master: `Ok` means the message was queued
//! for the target process; a dead, restarting or overloaded target is a typed
//! error ([`Error::NotRunning`], [`Error::QueueFull`], ...), never a silent drop.
//! The master stamps each message with its true [`Origin`]. Fan-outs
//! ([`Target::Workers`], [`Target::All`]) skip the sender itself.
//!
//! Receiving is by topic: [`Messenger::subscribe`] returns a [`TopicStream`]
//! stream. Subscribe before calling `ready()`: messages that arrive for a topic
//! nobody subscribed to are dropped (a request gets [`Error::NoHandler`]).

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_protocol::internal::PendingTable;
use tandem_protocol::{ErrorCode, RemoteError, payload};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::identity::{Origin, Target};
use crate::ipc::{FromChild, Op, Outcome};
use crate::link::{FrameLink, LinkTable};
use crate::status::StatusTable;
use crate::{Error, ProcessRole, WorkerId};

/// The code of the `RemoteError` a requester gets when the target had no
/// handler for the topic, or dropped the request without replying.
pub(crate) const NO_HANDLER: ErrorCode = ErrorCode::named("no_handler");

/// Outstanding operations (sends waiting for the master's acknowledgement,
/// requests waiting for their reply) per child; more wait for a permit. This
/// bounds the master's answers to a child, so its control queue cannot overflow.
pub(crate) const MAX_OUTSTANDING_OPS: usize = 256;

/// The largest topic plus payload a message may carry: the IPC frame limit
/// less room for the envelope.
pub(crate) const MAX_MESSAGE_LEN: usize = tandem_protocol::DEFAULT_MAX_FRAME_LENGTH - 64 * 1024;

fn check_size(topic: &str, payload: &Bytes) -> Result<(), Error> {
    let len = topic.len() + payload.len();
    if len > MAX_MESSAGE_LEN {
        return Err(Error::PayloadTooLarge { len, max: MAX_MESSAGE_LEN });
    }
    Ok(())
}

/// Encodes a value as a MessagePack payload.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, Error> {
    payload::encode(value).map_err(Error::Encode)
}

/// Decodes a MessagePack payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    payload::decode(bytes).map_err(Error::Decode)
}

/// A received message.
#[derive(Clone)]
pub struct Envelope {
    /// The topic it was sent on.
    pub topic: String,
    /// Who sent it (stamped by the master).
    pub from: Origin,
    /// The payload bytes.
    pub payload: Bytes,
    reply: Option<Arc<ReplySlot>>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("topic", &self.topic)
            .field("from", &self.from)
            .field("payload_len", &self.payload.len())
            .field("is_request", &self.is_request())
            .finish()
    }
}

impl Envelope {
    /// Decodes the payload as MessagePack.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        decode(&self.payload)
    }

    /// Whether the sender awaits a reply.
    pub fn is_request(&self) -> bool {
        self.reply.is_some()
    }

    /// Answers a request (a no-op for a plain message or a request already answered).
    pub async fn reply(&self, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.answer(Ok(payload.into())).await
    }

    /// Answers a request with a value encoded as MessagePack.
    pub async fn reply_value<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.answer(Ok(encode(value)?)).await
    }

    /// Answers a request with an error.
    pub async fn reply_err(&self, error: RemoteError) -> Result<(), Error> {
        self.answer(Err(error)).await
    }

    async fn answer(&self, result: Result<Bytes, RemoteError>) -> Result<(), Error> {
        if let Ok(payload) = &result {
            check_size(&self.topic, payload)?;
        }
        match &self.reply {
            Some(slot) if !slot.done.swap(true, Ordering::AcqRel) => {
                slot.endpoint.send_reply(slot.request, result).await
            }
            _ => Ok(()),
        }
    }
}

/// The right to answer one request; answers "no handler" when dropped unanswered,
/// so the requester fails at once instead of waiting for its deadline.
struct ReplySlot {
    endpoint: Arc<Endpoint>,
    request: u64,
    topic: String,
    done: AtomicBool,
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) {
            let error = RemoteError::bad_request(format!(
                "no handler answered topic {:?} (no subscriber, its queue was full, or it dropped the request)",
                self.topic
            ))
            .with_code(NO_HANDLER);
            self.endpoint.try_send_reply(self.request, Err(error));
        }
    }
}

/// The master's messenger transport: calls into the master's loop.
#[derive(Debug)]
pub(crate) enum LocalCall {
    /// An operation; the answer comes back on `reply`.
    Op { op: Op, reply: oneshot::Sender<Outcome> },
    /// A reply to a request delivered to the master.
    Reply { request: u64, result: Result<Bytes, RemoteError> },
}

/// What the child's IPC reader hands back to a waiting operation.
#[derive(Debug)]
pub(crate) enum Answer {
    Outcome(Outcome),
    Link(FrameLink),
}

/// The child's side of the IPC channel, shared by its messenger and its reader.
#[derive(Debug)]
pub(crate) struct ChildShared {
    /// Frames to the master (bounded; senders wait when it is full).
    pub writer: mpsc::Sender<FromChild>,
    /// The callers waiting for an answer, by operation id; closed once the master is gone.
    pending: Mutex<PendingTable<oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    permits: Semaphore,
    /// The links of this process.
    pub links: LinkTable,
}

impl ChildShared {
    pub(crate) fn new(writer: mpsc::Sender<FromChild>, links: LinkTable) -> Self {
        ChildShared {
            writer,
            pending: Mutex::new(PendingTable::new()),
            next_id: AtomicU64::new(1),
            permits: Semaphore::new(MAX_OUTSTANDING_OPS),
            links,
        }
    }

    /// Completes the operation with this id (the reader calls this).
    pub(crate) fn complete(&self, id: u64, answer: Answer) {
        let waiter = self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
        if let Some(waiter) = waiter {
            // The caller may have given up (deadline); then the answer is dropped.
            let _ = waiter.send(answer);
        }
    }

    /// Fails every outstanding operation, and every later one (the master is gone).
    pub(crate) fn fail_all(&self) {
        drop(self.pending.lock().unwrap_or_else(PoisonError::into_inner).close());
    }

    async fn call(&self, op: Op) -> Result<Answer, Error> {
        let _permit = self.permits.acquire().await.map_err(|_| Error::MasterGone)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Err: closed (the master is gone), or an id in use (never: one counter).
        let inserted = self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(id, tx);
        inserted.map_err(|_| Error::MasterGone)?;
        let _guard = PendingGuard { shared: self, id };
        self.writer.send(FromChild::Op { id, op }).await.map_err(|_| Error::MasterGone)?;
        rx.await.map_err(|_| Error::MasterGone)
    }
}

/// Removes a pending operation whose caller went away.
struct PendingGuard<'a> {
    shared: &'a ChildShared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(self.id);
    }
}

#[derive(Debug)]
pub(crate) enum Transport {
    Child(Arc<ChildShared>),
    Master(mpsc::Sender<LocalCall>),
}

/// One process's messaging endpoint: who it is, its subscriptions, its transport.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub me: Origin,
    pub inbox: Inbox,
    pub transport: Transport,
}

impl Endpoint {
    async fn call(&self, op: Op) -> Result<Answer, Error> {
        match &self.transport {
            Transport::Child(shared) => shared.call(op).await,
            Transport::Master(tx) => {
                let (reply, rx) = oneshot::channel();
                tx.send(LocalCall::Op { op, reply }).await.map_err(|_| Error::ShuttingDown)?;
                rx.await.map(Answer::Outcome).map_err(|_| Error::ShuttingDown)
            }
        }
    }

    async fn outcome(&self, op: Op) -> Result<Outcome, Error> {
        match self.call(op).await? {
            Answer::Outcome(Outcome::Refused(refusal)) => Err(refusal.into()),
            Answer::Outcome(outcome) => Ok(outcome),
            Answer::Link(_) => Err(unexpected("a link")),
        }
    }

    async fn send_reply(&self, request: u64, result: Result<Bytes, RemoteError>) -> Result<(), Error> {
        match &self.transport {
            Transport::Child(shared) => {
                shared.writer.send(FromChild::Reply { request, result }).await.map_err(|_| Error::MasterGone)
            }
            Transport::Master(tx) => {
                tx.send(LocalCall::Reply { request, result }).await.map_err(|_| Error::ShuttingDown)
            }
        }
    }

    /// From `Drop`: cannot wait; when the queue is full the requester times out instead.
    fn try_send_reply(&self, request: u64, result: Result<Bytes, RemoteError>) {
        let sent = match &self.transport {
            Transport::Child(shared) => shared.writer.try_send(FromChild::Reply { request, result }).is_ok(),
            Transport::Master(tx) => tx.try_send(LocalCall::Reply { request, result }).is_ok(),
        };
        if !sent {
            tracing::debug!(request, "could not send the automatic no-handler reply");
        }
    }

    /// Hands a delivered message to the topic's subscribers.
    pub(crate) fn deliver(self: &Arc<Self>, topic: String, from: Origin, payload: Bytes, request: Option<u64>) {
        let reply = request.map(|request| {
            Arc::new(ReplySlot {
                endpoint: Arc::clone(self),
                request,
                topic: topic.clone(),
                done: AtomicBool::new(false),
            })
        });
        // When nobody takes it, dropping `reply` answers the requester.
        self.inbox.dispatch(Envelope { topic, from, payload, reply });
    }
}

fn unexpected(what: &str) -> Error {
    Error::Remote(RemoteError::internal(format!("the master answered with {what}, which this call does not expect")))
}

/// One topic's subscribers, each with its id.
type Subscribers = Vec<(u64, mpsc::Sender<Envelope>)>;

/// Subscriptions by topic.
#[derive(Debug)]
pub(crate) struct Inbox {
    subs: Mutex<HashMap<String, Subscribers>>,
    next: AtomicU64,
    capacity: usize,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Inbox { subs: Mutex::new(HashMap::new()), next: AtomicU64::new(1), capacity: capacity.max(1) }
    }

    fn add(&self, topic: &str) -> (u64, mpsc::Receiver<Envelope>) {
        let (tx, rx) = mpsc::channel(self.capacity);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.subs.lock().unwrap_or_else(PoisonError::into_inner).entry(topic.to_owned()).or_default().push((id, tx));
        (id, rx)
    }

    fn remove(&self, topic: &str, id: u64) {
        let mut subs = self.subs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = subs.get_mut(topic) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                subs.remove(topic);
            }
        }
    }

    /// Never waits: a subscriber whose queue is full misses the message (logged).
    fn dispatch(&self, msg: Envelope) {
        let subs = self.subs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(list) = subs.get(&msg.topic) else {
            tracing::debug!(topic = %msg.topic, from = %msg.from, "message for a topic nobody subscribed to; dropped");
            return;
        };
        for (_, tx) in list {
            match tx.try_send(msg.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(topic = %msg.topic, from = %msg.from, "subscription queue full; message dropped")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Ends every subscription stream.
    pub(crate) fn close(&self) {
        self.subs.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// The messages of one topic, as a `Stream`. Dropping it unsubscribes.
#[derive(Debug)]
pub struct TopicStream {
    topic: String,
    id: u64,
    rx: mpsc::Receiver<Envelope>,
    endpoint: Arc<Endpoint>,
}

impl TopicStream {
    /// The next message; `None` once the process is shutting down.
    pub async fn recv(&mut self) -> Option<Envelope> {
        self.rx.recv().await
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Stream for TopicStream {
    type Item = Envelope;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Envelope>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for TopicStream {
    fn drop(&mut self) {
        self.endpoint.inbox.remove(&self.topic, self.id);
    }
}

/// Sends and receives messages; cheap to clone.
#[derive(Debug, Clone)]
pub struct Messenger {
    endpoint: Arc<Endpoint>,
}

impl Messenger {
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        Messenger { endpoint }
    }

    /// This process, as receivers see it.
    pub fn me(&self) -> &Origin {
        &self.endpoint.me
    }

    /// Receives the messages of `topic` from now on.
    pub fn subscribe(&self, topic: impl Into<String>) -> TopicStream {
        let topic = topic.into();
        let (id, rx) = self.endpoint.inbox.add(&topic);
        TopicStream { topic, id, rx, endpoint: Arc::clone(&self.endpoint) }
    }

    /// Queues a message for `to`; returns how many processes it was queued for.
    pub async fn send(&self, to: Target, topic: impl Into<String>, payload: impl Into<Bytes>) -> Result<usize, Error> {
        let (topic, payload) = (topic.into(), payload.into());
        check_size(&topic, &payload)?;
        let op = Op::Send { to, topic, payload };
        match self.endpoint.outcome(op).await? {
            Outcome::Sent { count, .. } => Ok(count as usize),
            _ => Err(unexpected("something other than an acknowledgement")),
        }
    }

    /// Sends to the agent. Fails with [`Error::NotRunning`] while it restarts.
    pub async fn send_to_agent(&self, topic: impl Into<String>, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.send(Target::Agent, topic, payload).await.map(drop)
    }

    /// Sends to one worker. Fails with [`Error::NotRunning`] when it is dead or restarting.
    pub async fn send_to_worker(
        &self,
        id: WorkerId,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), Error> {
        self.send(Target::Worker(id), topic, payload).await.map(drop)
    }

    /// Sends to every ready worker but the sender; returns how many.
    pub async fn send_to_workers(&self, topic: impl Into<String>, payload: impl Into<Bytes>) -> Result<usize, Error> {
        self.send(Target::Workers, topic, payload).await
    }

    /// Sends to one ready worker picked at random; returns its id.
    pub async fn send_to_random_worker(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<WorkerId, Error> {
        let (topic, payload) = (topic.into(), payload.into());
        check_size(&topic, &payload)?;
        let op = Op::Send { to: Target::RandomWorker, topic, payload };
        match self.endpoint.outcome(op).await? {
            Outcome::Sent { worker: Some(id), .. } => Ok(id),
            _ => Err(unexpected("no worker id")),
        }
    }

    /// Sends to every process (master, agent, workers) but the sender; returns how many.
    pub async fn broadcast(&self, topic: impl Into<String>, payload: impl Into<Bytes>) -> Result<usize, Error> {
        self.send(Target::All, topic, payload).await
    }

    /// Sends to the master.
    pub async fn send_to_master(&self, topic: impl Into<String>, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.send(Target::Master, topic, payload).await.map(drop)
    }

    /// Sends a request to one process and waits for its reply, at most `deadline`.
    pub async fn request(
        &self,
        to: Target,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        deadline: Duration,
    ) -> Result<Bytes, Error> {
        if !to.is_single() {
            return Err(Error::InvalidTarget { target: to.to_string() });
        }
        let (topic, payload) = (topic.into(), payload.into());
        check_size(&topic, &payload)?;
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let op = Op::Request { to, topic: topic.clone(), payload, deadline_ms };
        let outcome = match tokio::time::timeout(deadline, self.endpoint.outcome(op)).await {
            Err(_) => return Err(Error::DeadlineExceeded { target: to.to_string(), deadline }),
            Ok(outcome) => outcome?,
        };
        match outcome {
            Outcome::Reply(Ok(bytes)) => Ok(bytes),
            Outcome::Reply(Err(e)) if e.code == NO_HANDLER => Err(Error::NoHandler { target: to.to_string(), topic }),
            Outcome::Reply(Err(e)) => Err(Error::Remote(e)),
            _ => Err(unexpected("something other than a reply")),
        }
    }

    /// The cluster's status table (pid, role, state, restarts, uptime, RSS).
    pub async fn status(&self) -> Result<StatusTable, Error> {
        match self.endpoint.outcome(Op::Status).await? {
            Outcome::Status(table) => Ok(table),
            _ => Err(unexpected("something other than a status table")),
        }
    }

    /// Opens a link to the agent, relayed by the master (workers only): the
    /// Follower's fallback transport. Fails with [`Error::AgentUnavailable`]
    /// while the agent is not ready. Internal, as its [`FrameLink`] is (see
    /// [`crate::internal`]): `tandem::cluster_glue` opens it.
    #[doc(hidden)]
    pub async fn open_link(&self) -> Result<FrameLink, Error> {
        let Transport::Child(_) = &self.endpoint.transport else {
            return Err(Error::NotAWorker { what: "opening a link" });
        };
        if self.endpoint.me.role() != ProcessRole::Worker {
            return Err(Error::NotAWorker { what: "opening a link" });
        }
        match self.endpoint.call(Op::OpenLink).await? {
            Answer::Link(link) => Ok(link),
            Answer::Outcome(Outcome::Refused(refusal)) => Err(refusal.into()),
            Answer::Outcome(_) => Err(unexpected("something other than a link")),
        }
    }
}
