//! The typed definition of one channel, shared by every process.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bounds every type that crosses a channel must meet.
pub trait Message: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static> Message for T {}

/// One channel's API: its name and the types that cross it.
///
/// Implement it once, in a crate every process links, on a unit struct:
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// struct ConfigApi;
///
/// #[derive(Serialize, Deserialize, Clone, Debug)]
/// enum ConfigRequest { Get(String), Put(String, String) }
///
/// impl tandem_protocol::Api for ConfigApi {
///     const NAME: &'static str = "config";
///     type Key = String;
///     type Event = Option<String>;
///     type Request = ConfigRequest;
///     type Response = Option<String>;
/// }
/// ```
///
/// Keys are compared as their MessagePack bytes, so `Key` must serialize
/// deterministically (no `HashMap` inside).
pub trait Api: Send + Sync + 'static {
    /// The channel name; unique among the channels of one leader.
    const NAME: &'static str;
    /// What a subscription names.
    type Key: Message;
    /// What a subscription yields.
    type Event: Message;
    /// A call (or a publish).
    type Request: Message;
    /// A call's answer.
    type Response: Message;
}
