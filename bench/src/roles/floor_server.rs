//! The floor's server: plain tokio on a Unix socket. Echo connections send back
//! every frame (flushing when no whole frame is left in the read buffer, so
//! pipelined requests are answered in batches); fan-out connections receive
//! one shared stream of events, lossless (a slow client makes the publisher wait).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::floor_wire::{ECHO, FANOUT, has_frame, put_event, put_frame, read_frame};
use super::loops::{Schedule, serve_publishes};
use crate::clock::Window;
use crate::control::{Commands, Report, Reporter};

type Subscribers = Arc<Mutex<Vec<mpsc::Sender<Bytes>>>>;

pub async fn run(socket: PathBuf, commands: Commands, reporter: Reporter) -> Result<()> {
    let listener = UnixListener::bind(&socket)?;
    let subscribers = Subscribers::default();
    tokio::spawn(accept(listener, subscribers.clone()));
    reporter.send(&Report::Ready);
    serve_publishes("the floor server", &subscribers, publish, commands, &reporter).await
}

async fn accept(listener: UnixListener, subscribers: Subscribers) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(stream, subscribers.clone()));
    }
}

async fn connection(stream: UnixStream, subscribers: Subscribers) -> std::io::Result<()> {
    let (read, write) = stream.into_split();
    let mut read = BufReader::with_capacity(64 * 1024, read);
    let mut hello = Vec::new();
    if !read_frame(&mut read, &mut hello).await? {
        return Ok(());
    }
    match hello.as_slice() {
        [ECHO] => echo(read, write).await,
        [FANOUT] => fanout(read, write, subscribers).await,
        _ => Ok(()),
    }
}

async fn echo(mut read: BufReader<OwnedReadHalf>, write: OwnedWriteHalf) -> std::io::Result<()> {
    let mut write = BufWriter::with_capacity(64 * 1024, write);
    let mut body = Vec::new();
    while read_frame(&mut read, &mut body).await? {
        write.write_u32(body.len() as u32).await?;
        write.write_all(&body).await?;
        if !has_frame(read.buffer()) {
            write.flush().await?;
        }
    }
    write.flush().await
}

async fn fanout(
    mut read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    subscribers: Subscribers,
) -> std::io::Result<()> {
    // Bounded: when this client's queue is full the publisher waits for it,
    // so the floor never drops an event.
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
    let mut ack = BytesMut::new();
    put_frame(&mut ack, &[]);
    write.write_all(&ack).await?;
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => write.write_all(&batch).await?,
                None => return Ok(()),
            },
            read = read.read(&mut scratch) => if read? == 0 {
                return Ok(());
            },
        }
    }
}

/// Publishes during `window`: bursts of one event per key, encoded once and
/// shared by every connection, flat out (yielding between bursts); or one
/// event every `interval_us`, round the keys.
async fn publish(
    subscribers: Vec<mpsc::Sender<Bytes>>,
    keys: usize,
    interval_us: u64,
    payload: usize,
    window: Window,
) -> u64 {
    let pad = vec![0xA5; payload];
    let mut schedule = Schedule::start(keys, interval_us, window).await;
    let mut idx = vec![0u64; schedule.keys()];
    let mut published = 0u64;
    while let Some((now, burst)) = schedule.next().await {
        let mut batch = BytesMut::with_capacity(burst.len() * (24 + pad.len()));
        for key in burst {
            put_event(&mut batch, key as u32, idx[key], now, &pad);
            idx[key] += 1;
            published += 1;
        }
        let batch = batch.freeze();
        for subscriber in &subscribers {
            let _ = subscriber.send(batch.clone()).await;
        }
    }
    published
}
