//! [`ChannelName`]: a channel's name as the frames carry it.
//!
//! Every call, event, subscription and publish names its channel, and a busy
//! connection carries millions of them. A `String` there costs an allocation
//! per frame on each side; a `ChannelName` is a `&'static str` (a follower's
//! channels are [`Api::NAME`](crate::Api::NAME)s) or a shared `Arc<str>`
//! (what a decoder reads: each [`FrameCodec`](crate::FrameCodec) keeps the
//! few names its connection uses and hands out clones), so cloning one is
//! at most a reference count.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A channel's name: a string, cheap to clone.
///
/// It compares, hashes, orders and prints as the string it holds, derefs to
/// `str`, and is a MessagePack string on the wire, byte for byte what a
/// `String` is.
///
/// ```
/// use tandem_protocol::ChannelName;
///
/// let name = ChannelName::from_static("config");
/// assert_eq!(name, "config");
/// assert_eq!(name, ChannelName::from(String::from("config")));
/// assert!(name.starts_with("con"));
/// ```
#[derive(Clone)]
pub struct ChannelName(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl ChannelName {
    /// A name that needs no allocation, ever.
    pub const fn from_static(name: &'static str) -> Self {
        ChannelName(Repr::Static(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(name) => name,
            Repr::Shared(name) => name,
        }
    }
}

impl Deref for ChannelName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for ChannelName {
    /// Copies `name` (once: clones share it). For a literal, [`ChannelName::from_static`] copies nothing.
    fn from(name: &str) -> Self {
        ChannelName(Repr::Shared(Arc::from(name)))
    }
}

impl From<String> for ChannelName {
    fn from(name: String) -> Self {
        ChannelName(Repr::Shared(Arc::from(name)))
    }
}

impl From<&String> for ChannelName {
    fn from(name: &String) -> Self {
        ChannelName::from(name.as_str())
    }
}

impl From<Arc<str>> for ChannelName {
    fn from(name: Arc<str>) -> Self {
        ChannelName(Repr::Shared(name))
    }
}

impl From<ChannelName> for String {
    fn from(name: ChannelName) -> Self {
        name.as_str().to_owned()
    }
}

impl PartialEq for ChannelName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ChannelName {}

impl PartialEq<str> for ChannelName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ChannelName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for ChannelName {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialOrd for ChannelName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ChannelName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for ChannelName {
    /// As the `str` it holds, so a map keyed by names can be looked up by `&str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ChannelName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ChannelName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;

        impl Visitor<'_> for NameVisitor {
            type Value = ChannelName;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a channel name (a string)")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<ChannelName, E> {
                Ok(ChannelName::from(name))
            }

            /// As `String` reads them: MessagePack `bin` holding UTF-8 is a name too.
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<ChannelName, E> {
                match std::str::from_utf8(bytes) {
                    Ok(name) => Ok(ChannelName::from(name)),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Bytes(bytes), &self)),
                }
            }
        }

        deserializer.deserialize_str(NameVisitor)
    }
}

/// How many names a decoder keeps: a connection uses a few channels, and a
/// peer sending many different names only costs an allocation per frame, as
/// without the list. A connection holds at most `KEPT` × [`KEPT_LEN`] bytes of names.
pub(crate) const KEPT: usize = 8;

/// The longest name a decoder keeps: channel names are short, and a peer
/// sending long ones must not make a connection hold [`KEPT`] of them.
pub(crate) const KEPT_LEN: usize = 128;

/// Names a decoder has read: the same name read again is a clone. Once
/// [`KEPT`] are kept, a new one replaces the one kept longest.
#[derive(Debug, Default)]
pub(crate) struct Names {
    kept: Vec<ChannelName>,
    /// Where the next new name goes once `kept` is full.
    next: usize,
}

impl Names {
    /// The name read as `bytes`, shared with the last time it was read if it
    /// is kept (kept names are UTF-8 already: only a new one is checked);
    /// `None` if the bytes are not UTF-8.
    pub(crate) fn get(&mut self, bytes: &[u8]) -> Option<ChannelName> {
        if let Some(kept) = self.kept.iter().find(|kept| kept.as_bytes() == bytes) {
            return Some(kept.clone());
        }
        let new = ChannelName::from(std::str::from_utf8(bytes).ok()?);
        if bytes.len() > KEPT_LEN {
            return Some(new);
        }
        if self.kept.len() < KEPT {
            self.kept.push(new.clone());
        } else {
            self.kept[self.next] = new.clone();
            self.next = (self.next + 1) % KEPT;
        }
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn names_compare_hash_and_print_as_their_string_whatever_holds_them() {
        let literal = ChannelName::from_static("config");
        let shared = ChannelName::from(String::from("config"));
        assert_eq!(literal, shared);
        assert_eq!(literal, "config");
        assert_eq!(format!("{literal} {shared:?}"), "config \"config\"");
        let mut map = HashMap::new();
        map.insert(shared, 1);
        assert_eq!(map.get("config"), Some(&1));
        assert_eq!(map.get(&literal), Some(&1));
        let (a, b) = (ChannelName::from("a"), ChannelName::from_static("b"));
        assert!(a < b);
    }

    #[test]
    fn on_the_wire_a_name_is_the_string_it_holds() {
        let name = ChannelName::from_static("registry");
        let bytes = rmp_serde::to_vec(&name).unwrap();
        assert_eq!(bytes, rmp_serde::to_vec("registry").unwrap());
        let back: ChannelName = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, name);
        let refused = rmp_serde::from_slice::<ChannelName>(&rmp_serde::to_vec(&7u8).unwrap()).unwrap_err();
        assert!(refused.to_string().contains("channel name"), "{refused}");
        // Read as leniently as a `String` is: `bin` holding UTF-8, and only that.
        let bin = [0xc4, 3, b'a', b'b', b'c'];
        assert_eq!(rmp_serde::from_slice::<String>(&bin).unwrap(), "abc");
        assert_eq!(rmp_serde::from_slice::<ChannelName>(&bin).unwrap(), "abc");
        let not_utf8 = [0xc4, 2, 0xff, 0xfe];
        assert!(rmp_serde::from_slice::<String>(&not_utf8).is_err());
        assert!(rmp_serde::from_slice::<ChannelName>(&not_utf8).is_err());
    }

    #[test]
    fn a_name_read_again_is_shared_and_the_list_stays_bounded() {
        let mut names = Names::default();
        let first = names.get(b"config").unwrap();
        let again = names.get(b"config").unwrap();
        assert!(std::ptr::eq(first.as_str(), again.as_str()), "read again: the same allocation");
        for i in 0..100 {
            assert_eq!(names.get(format!("n{i}").as_bytes()).unwrap(), format!("n{i}"));
            assert!(names.kept.len() <= KEPT);
        }
        // Pushed out by the others: a new allocation, the same name.
        let read_again = names.get(b"config").unwrap();
        assert_eq!(read_again, first);
        assert!(!std::ptr::eq(read_again.as_str(), first.as_str()));
        let kept = names.get(b"n99").unwrap();
        assert!(std::ptr::eq(kept.as_str(), names.get(b"n99").unwrap().as_str()));
        // Too long to keep: read, not kept.
        let long = "l".repeat(KEPT_LEN + 1);
        let kept_before: Vec<ChannelName> = names.kept.clone();
        assert_eq!(names.get(long.as_bytes()).unwrap(), long);
        assert_eq!(names.kept, kept_before);
        // Not UTF-8: no name, and nothing kept.
        let before = names.kept.len();
        assert!(names.get(b"\xff\xfe").is_none());
        assert_eq!(names.kept.len(), before);
    }
}
