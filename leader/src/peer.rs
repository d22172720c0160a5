//! Who is on the other end of a link: [`PeerInfo`], as the transport established it.

/// Who is on the other end of a link, as established by the transport.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's process id, when the transport knows it.
    pub pid: Option<i32>,
    /// The peer's user id, when the transport knows it.
    pub uid: Option<u32>,
    /// How the peer is connected: `unix`, `tcp`, `local` or `messenger`.
    pub transport: &'static str,
    /// Whether the transport already authenticated the peer (in-process links,
    /// links relayed by the cluster master); a trusted peer skips the token check.
    pub trusted: bool,
}

impl PeerInfo {
    /// A peer relayed by a trusted party (the cluster master), with the pid it vouches for.
    pub fn relayed(transport: &'static str, pid: Option<i32>) -> Self {
        PeerInfo { pid, uid: None, transport, trusted: true }
    }
}
