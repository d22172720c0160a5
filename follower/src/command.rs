//! What a handle asks of the driver: the [`Command`]s sent over the driver's
//! queue, and what a new subscription handle is made of.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use tandem_protocol::{Position, RequestId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::Error;
use crate::feed::{Feed, RawUpdate, Reader};

/// What a new subscription handle is made of.
#[derive(Debug)]
pub(crate) struct SubscriptionParts {
    /// The value at the moment the subscription was made; `reader` gets what comes after.
    pub(crate) first: Option<RawUpdate>,
    pub(crate) reader: Reader,
}

pub(crate) type SubscribeReply = oneshot::Sender<Result<SubscriptionParts, Error>>;

/// A request from a handle to the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Invoke {
        id: RequestId,
        channel: &'static str,
        /// When the driver answers the call with [`Error::DeadlineExceeded`]
        /// (carrying `budget`, the time the caller gave it), wherever it is.
        deadline: Instant,
        budget: Duration,
        oneway: bool,
        payload: Bytes,
        reply: Option<oneshot::Sender<Result<Bytes, Error>>>,
    },
    Publish {
        channel: &'static str,
        payload: Bytes,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Subscribe {
        channel: &'static str,
        key: Bytes,
        reply: SubscribeReply,
    },
    /// A subscription handle was dropped (`feed`: the topic it belonged to).
    Unsubscribe {
        channel: &'static str,
        key: Bytes,
        feed: Feed,
    },
    /// A deliver-to-one subscription.
    SubscribeOne {
        channel: &'static str,
        key: Bytes,
        options: crate::DeliverOptions,
        reply: SubscribeOneReply,
    },
    /// A deliver-to-one handle was dropped.
    UnsubscribeOne {
        local: u64,
    },
    /// A delivery was acked (`ack`) or released, on link `link`.
    Settle {
        link: u64,
        sub: RequestId,
        tag: u64,
        ack: bool,
    },
    /// An invoke future was dropped before its answer.
    Cancel(RequestId),
    Close(oneshot::Sender<()>),
    /// Hand this process's leadership to another process (see `Connection::step_down`).
    StepDown(oneshot::Sender<Result<(), Error>>),
    /// A client of this channel was made: the connection carries it from now on.
    Open(&'static str),
    /// Mirror the leader (see `Connection::mirror`).
    Mirror(crate::mirror::MirrorReply),
}

impl Command {
    /// The channel a call, publish or subscribe uses.
    pub(crate) fn channel(&self) -> Option<&'static str> {
        match self {
            Command::Invoke { channel, .. }
            | Command::Publish { channel, .. }
            | Command::Subscribe { channel, .. }
            | Command::SubscribeOne { channel, .. }
            | Command::Open(channel) => Some(channel),
            _ => None,
        }
    }
}

/// One delivery as the driver hands it to a subscription's stream.
#[derive(Debug)]
pub(crate) struct RawDelivery {
    /// The link it came on (an ack is only worth sending on that link).
    pub(crate) link: u64,
    pub(crate) sub: RequestId,
    pub(crate) tag: u64,
    pub(crate) position: Position,
    pub(crate) payload: Bytes,
    pub(crate) redelivered: bool,
}

/// What the driver gives a new deliver-to-one subscription.
#[derive(Debug)]
pub(crate) struct DeliveriesParts {
    pub(crate) local: u64,
    pub(crate) rx: mpsc::Receiver<RawDelivery>,
    /// The driver's current link: deliveries of an earlier one are skipped
    /// (that leader already gave them to another subscriber).
    pub(crate) link: Arc<AtomicU64>,
}

pub(crate) type SubscribeOneReply = oneshot::Sender<Result<DeliveriesParts, Error>>;
