//! How the server tells its connections apart.

/// A connection's id, unique for the server's lifetime (its accept number).
pub(crate) type ConnId = u64;
