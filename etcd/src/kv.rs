//! Keys, values and revisions, as this crate hands them out.

/// One key's value at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (UTF-8; invalid bytes are replaced).
    pub key: String,
    /// The value's bytes.
    pub value: Vec<u8>,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The revision that created the key.
    pub create_revision: i64,
    /// How many times the key changed since it was created (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to, 0 if none.
    pub lease: i64,
}

impl KeyValue {
    pub(crate) fn from_etcd(kv: &etcd_client::KeyValue) -> Self {
        KeyValue {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }

    /// The value as text (invalid UTF-8 is replaced).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

/// Every key of a range at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The store's revision when it was read: a watch from `revision + 1` sees
    /// every later change.
    pub revision: i64,
    /// The keys that exist, sorted by key.
    pub kvs: Vec<KeyValue>,
}

/// Which keys a read or a watch covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keys {
    key: String,
    prefix: bool,
}

impl Keys {
    /// This one key.
    pub fn exact(key: impl Into<String>) -> Self {
        Keys { key: key.into(), prefix: false }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Keys { key: prefix.into(), prefix: true }
    }

    /// The key, or the prefix.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether this is a prefix.
    pub fn is_prefix(&self) -> bool {
        self.prefix
    }

    pub(crate) fn get_options(&self) -> Option<etcd_client::GetOptions> {
        self.prefix.then(|| etcd_client::GetOptions::new().with_prefix())
    }

    pub(crate) fn watch_options(&self) -> etcd_client::WatchOptions {
        let options = etcd_client::WatchOptions::new();
        if self.prefix { options.with_prefix() } else { options }
    }
}

impl std::fmt::Display for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix { write!(f, "{}*", self.key) } else { f.write_str(&self.key) }
    }
}
