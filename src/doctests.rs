//! The guide's Rust examples (`docs/*.md`), compiled and run by
//! `cargo test --doc` as README.md's are (`ReadmeDoctests` in `lib.rs`): one
//! item per chapter that has Rust code blocks.

/// `docs/using.md`: a whole program wrapping your own client.
#[doc = include_str!("../docs/using.md")]
pub struct Using;

/// `docs/serving.md`: a worker serving the master's listener with axum.
#[doc = include_str!("../docs/serving.md")]
pub struct Serving;

/// `docs/state.md`: what survives a change of Leader, and the graceful hand-off.
#[doc = include_str!("../docs/state.md")]
pub struct State;
