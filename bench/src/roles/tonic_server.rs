//! The tonic peer's server: a gRPC `Echo` and a server-streaming `Subscribe`
//! ([`tonic_wire`](super::tonic_wire)) on a Unix socket, tonic's server with
//! its default settings. The publisher sends each event to every open stream,
//! lossless (a slow stream makes the publisher wait, as the floor's does).

use std::path::PathBuf;

use anyhow::Result;
use bytes::Bytes;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

use super::loops::{Schedule, serve_publishes};
use super::tonic_wire::{BenchService, Event};
use crate::clock::Window;
use crate::control::{Commands, Report, Reporter};

pub async fn run(socket: PathBuf, commands: Commands, reporter: Reporter) -> Result<()> {
    let listener = UnixListener::bind(&socket)?;
    let service = BenchService::default();
    let subscribers = service.subscribers.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(UnixListenerStream::new(listener)),
    );
    reporter.send(&Report::Ready);
    let result = serve_publishes("the tonic server", &subscribers, publish, commands, &reporter).await;
    server.abort();
    result
}

/// Publishes during `window`, as the floor's server does: bursts of one event
/// per key, flat out (yielding between bursts), or one event every
/// `interval_us`, round the keys. Each event is one stream message.
async fn publish(
    subscribers: Vec<mpsc::Sender<Result<Event, Status>>>,
    keys: usize,
    interval_us: u64,
    payload: usize,
    window: Window,
) -> u64 {
    let pad = Bytes::from(vec![0xA5; payload]);
    let mut schedule = Schedule::start(keys, interval_us, window).await;
    let mut idx = vec![0u64; schedule.keys()];
    let mut published = 0u64;
    while let Some((now, burst)) = schedule.next().await {
        for key in burst {
            let event = Event { key: key as u32, idx: idx[key], sent_ns: now, pad: pad.clone() };
            idx[key] += 1;
            published += 1;
            for subscriber in &subscribers {
                // A stream whose client has gone is skipped.
                let _ = subscriber.send(Ok(event.clone())).await;
            }
        }
    }
    published
}
