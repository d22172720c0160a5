//! The tarpc peer's service: one echo method. Its transport is
//! `tarpc::serde_transport::unix` (length-delimited frames) with bincode, the
//! faster of the two codecs tarpc offers (`serde-transport-bincode`,
//! `serde-transport-json`); the body is `Bytes`, which serde writes as one
//! byte string rather than a sequence of numbers.

use bytes::Bytes;

#[tarpc::service]
pub trait Bench {
    /// Answers with the body it was sent.
    async fn echo(body: Bytes) -> Bytes;
}
