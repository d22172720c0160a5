//! A floor client process: one echo connection, pipelined up to N frames in
//! flight; and, once asked, one fan-out connection whose events it counts.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::floor_wire::{ECHO, FANOUT, has_frame, parse_event, put_frame, read_frame};
use super::loops::Events;
use crate::clock::{Window, mono_ns};
use crate::control::{Cmd, Commands, Report, Reporter};
use crate::tally::Calls;

pub async fn run(socket: PathBuf, mut commands: Commands, reporter: Reporter) -> Result<()> {
    let (mut read, mut write) = open(&socket, ECHO).await?;
    reporter.send(&Report::Ready);
    let mut events = Events::new();
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Invoke { concurrency, payload, window } => {
                let bound = Duration::from_secs_f64(window.seconds()) + Duration::from_secs(60);
                let calls = tokio::time::timeout(bound, invoke(&mut read, &mut write, concurrency, payload, window))
                    .await
                    .context("echo phase overran")??;
                reporter.send(&calls.report());
            }
            Cmd::Subscribe { .. } => {
                let (mut read, write) = open(&socket, FANOUT).await?;
                let mut body = Vec::new();
                read_frame(&mut read, &mut body).await?; // registered
                events.spawn(|events| async move {
                    let _write = write;
                    while let Ok(true) = read_frame(&mut read, &mut body).await {
                        if let Some((key, idx, sent_ns)) = parse_event(&body) {
                            events.record(key, idx, sent_ns);
                        }
                    }
                });
                reporter.send(&Report::Subscribed);
            }
            Cmd::Receive { window } => reporter.send(&events.receive(window).await),
            Cmd::Quit => break,
            other => bail!("a floor client cannot {other:?}"),
        }
    }
    Ok(())
}

type Reader = BufReader<OwnedReadHalf>;
type Writer = BufWriter<OwnedWriteHalf>;

async fn open(socket: &PathBuf, kind: u8) -> Result<(Reader, Writer)> {
    let stream = UnixStream::connect(socket).await.context("connect to the floor server")?;
    let (read, write) = stream.into_split();
    let mut write = BufWriter::with_capacity(64 * 1024, write);
    let mut hello = BytesMut::new();
    put_frame(&mut hello, &[kind]);
    write.write_all(&hello).await?;
    write.flush().await?;
    Ok((BufReader::with_capacity(64 * 1024, read), write))
}

/// Keeps `concurrency` frames in flight until the window closes: tops up the
/// pipeline, flushes, then reads one reply and every other whole reply buffered.
async fn invoke(
    read: &mut Reader,
    write: &mut Writer,
    concurrency: usize,
    payload: usize,
    window: Window,
) -> Result<Calls> {
    let body = vec![0x5A; payload];
    // When each frame in flight was sent (a batch goes out in one flush: one clock read).
    let mut sent: VecDeque<u64> = VecDeque::with_capacity(concurrency);
    let mut calls = Calls::new();
    let mut reply = Vec::new();
    loop {
        let now = mono_ns();
        if now < window.end_ns {
            while sent.len() < concurrency {
                write.write_u32(body.len() as u32).await?;
                write.write_all(&body).await?;
                sent.push_back(now);
            }
            write.flush().await?;
        }
        if sent.is_empty() {
            break;
        }
        loop {
            if !read_frame(read, &mut reply).await? {
                bail!("the floor server closed the connection");
            }
            let started = sent.pop_front().expect("every reply answers a frame in flight");
            let done = mono_ns();
            if reply.len() == body.len() {
                calls.record(&window, done, done.saturating_sub(started));
            } else {
                calls.errors += 1;
            }
            if sent.is_empty() || !has_frame(read.buffer()) {
                break;
            }
        }
    }
    Ok(calls)
}
