//! The tonic peer's server: a gRPC `Echo` and a server-streaming `Subscribe`
//! ([`tonic_wire`](super::tonic_wire)) on a Unix socket, tonic's server with
//! its default settings. The publisher sends each event to every open stream,
//! lossless (a slow stream makes the publisher wait, as the floor's does).

use std::path::PathBuf;

use anyhow::{Result, bail};
use bytes::Bytes;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Status;

use super::tonic_wire::{BenchService, Event};
use crate::clock::{Window, mono_ns, sleep_until_ns};
use crate::control::{Cmd, Commands, Report, Reporter};

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let listener = UnixListener::bind(&socket)?;
    let service = BenchService::default();
    let subscribers = service.subscribers.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(UnixListenerStream::new(listener)),
    );
    reporter.send(&Report::Ready);
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Publish { keys, interval_us, payload, window } => {
                let subscribers = subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let events = tokio::spawn(publish(subscribers, keys, interval_us, payload, window)).await?;
                reporter.send(&Report::Published { events });
            }
            Cmd::Quit => break,
            other => bail!("the tonic server cannot {other:?}"),
        }
    }
    server.abort();
    Ok(())
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
    let keys = keys.max(1);
    let mut idx = vec![0u64; keys];
    let mut published = 0u64;
    sleep_until_ns(window.start_ns).await;
    for i in 0u64.. {
        let (now, burst) = if interval_us == 0 {
            (mono_ns(), 0..keys)
        } else {
            let at = window.start_ns + i * interval_us * 1000;
            if at >= window.end_ns {
                break;
            }
            sleep_until_ns(at).await;
            let key = i as usize % keys;
            (mono_ns(), key..key + 1)
        };
        if now >= window.end_ns {
            break;
        }
        for key in burst {
            let event = Event { key: key as u32, idx: idx[key], sent_ns: now, pad: pad.clone() };
            idx[key] += 1;
            published += 1;
            for subscriber in &subscribers {
                // A stream whose client has gone is skipped.
                let _ = subscriber.send(Ok(event.clone())).await;
            }
        }
        if interval_us == 0 {
            tokio::task::yield_now().await;
        }
    }
    published
}
