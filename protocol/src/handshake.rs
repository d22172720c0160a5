//! Protocol versions and the checks the leader applies to a `Hello`.

use crate::ErrorCode;
use crate::{Hello, Reject, RemoteError};

/// The protocol version this build speaks.
///
/// Version 2 adds deliver-to-one (`SubscribeOne`, `Delivery`, `Settle`);
/// version 3 adds the mirror of a hot standby (`Mirror`, `Mirrored`);
/// everything else is version 1's, byte for byte. A leader speaks an older
/// version to a follower that offers it (and never sends it a frame of a
/// newer version); a follower rejected by an older leader offers
/// `Reject.version` next.
pub const PROTOCOL_VERSION: u16 = 3;

/// The first protocol version with deliver-to-one subscriptions.
pub const DELIVER_ONE_VERSION: u16 = 2;

/// The first protocol version with mirrors (a hot standby's state).
pub const MIRROR_VERSION: u16 = 3;

/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Picks the version to speak with a peer that offered `offered`, or the
/// `Reject` to send it (naming both versions).
pub fn negotiate(offered: u16) -> Result<u16, Reject> {
    if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&offered) {
        Ok(offered)
    } else {
        Err(Reject {
            version: PROTOCOL_VERSION,
            error: RemoteError::rejected(format!(
                "unsupported protocol version {offered}: this leader speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
            ))
            .with_code(ErrorCode::VERSION),
        })
    }
}

/// Checks a `Hello`'s version and, when `expected_token` is set, its token.
pub fn check_hello(hello: &Hello, expected_token: Option<&str>) -> Result<u16, Reject> {
    let version = negotiate(hello.version)?;
    if let Some(expected) = expected_token
        && !constant_time_eq(hello.token.as_deref().unwrap_or("").as_bytes(), expected.as_bytes())
    {
        return Err(Reject {
            version: PROTOCOL_VERSION,
            error: RemoteError::rejected("missing or wrong token").with_code(ErrorCode::TOKEN),
        });
    }
    Ok(version)
}

/// Compares two secrets without leaking, through timing, where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
