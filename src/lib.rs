//! tandem: many processes on one host share one upstream connection.
pub use tandem_protocol as protocol;
