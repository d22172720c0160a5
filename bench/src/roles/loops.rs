//! The loops the floor's, tonic's and tarpc's roles share: the clients'
//! call loop (`concurrency` tasks, one shared tally), their fan-out event
//! counting, and the servers' publishing schedule.

use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;

use crate::clock::{Window, mono_ns, sleep_until_ns};
use crate::control::{Cmd, Commands, Report, Reporter};
use crate::tally::{Calls, DRAIN, EventTally};

/// A client that echoes a body: the length of the answer, `None` on an error.
pub trait Echo: Clone + Send + 'static {
    fn call(&mut self, body: Bytes) -> impl Future<Output = Option<usize>> + Send;
}

/// `concurrency` tasks, each on its own clone of `client`, call in a loop
/// until the window closes, counting into one shared tally (the tandem
/// follower's loop).
pub async fn calls_in_tasks<C: Echo>(client: &C, concurrency: usize, payload: usize, window: Window) -> Result<Calls> {
    let body = Bytes::from(vec![0x5A; payload]);
    let total = Arc::new(Mutex::new(Calls::new()));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, body, total) = (client.clone(), body.clone(), total.clone());
            tokio::spawn(async move {
                let mut started = mono_ns();
                while started < window.end_ns {
                    let result = client.call(body.clone()).await;
                    let done = mono_ns();
                    let mut total = total.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Some(len) if len == body.len() => total.record(&window, done, done - started),
                        _ => total.errors += 1,
                    }
                    drop(total);
                    started = mono_ns();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    let total = Arc::into_inner(total).expect("every task has ended");
    Ok(total.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// A client's fan-out events: counted by a receiving task, reported per window.
pub struct Events {
    tally: Arc<Mutex<EventTally>>,
    receiver: Option<tokio::task::JoinHandle<()>>,
}

impl Events {
    pub fn new() -> Self {
        Events { tally: Arc::new(Mutex::new(EventTally::new())), receiver: None }
    }

    /// Runs `receive` as the receiving task; it records each event it gets
    /// (key, idx, sent_ns) through the recorder it is given.
    pub fn spawn<F, Fut>(&mut self, receive: F)
    where
        F: FnOnce(Recorder) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.receiver = Some(tokio::spawn(receive(Recorder(self.tally.clone()))));
    }

    /// Counts the events of `window` (and its drain) and returns the report.
    pub async fn receive(&self, window: Window) -> Report {
        lock(&self.tally).start(window);
        sleep_until_ns(window.end_ns + DRAIN.as_nanos() as u64).await;
        lock(&self.tally).finish(0)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if let Some(receiver) = self.receiver.take() {
            receiver.abort();
        }
    }
}

/// Records events into a client's [`Events`].
pub struct Recorder(Arc<Mutex<EventTally>>);

impl Recorder {
    pub fn record(&self, key: u32, idx: u64, sent_ns: u64) {
        lock(&self.0).record(key, idx, sent_ns, mono_ns());
    }
}

fn lock(events: &Mutex<EventTally>) -> std::sync::MutexGuard<'_, EventTally> {
    events.lock().unwrap_or_else(|p| p.into_inner())
}

/// A server's publishing schedule during a window: bursts of one event per
/// key, flat out (yielding between bursts), or one event every
/// `interval_us`, round the keys.
pub struct Schedule {
    keys: usize,
    interval_us: u64,
    window: Window,
    i: u64,
}

impl Schedule {
    /// Waits for the window to open.
    pub async fn start(keys: usize, interval_us: u64, window: Window) -> Schedule {
        sleep_until_ns(window.start_ns).await;
        Schedule { keys: keys.max(1), interval_us, window, i: 0 }
    }

    pub fn keys(&self) -> usize {
        self.keys
    }

    /// The next burst: its time and its keys; `None` once the window closed.
    pub async fn next(&mut self) -> Option<(u64, Range<usize>)> {
        let i = self.i;
        self.i += 1;
        let (now, burst) = if self.interval_us == 0 {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            (mono_ns(), 0..self.keys)
        } else {
            let at = self.window.start_ns + i * self.interval_us * 1000;
            if at >= self.window.end_ns {
                return None;
            }
            sleep_until_ns(at).await;
            let key = i as usize % self.keys;
            (mono_ns(), key..key + 1)
        };
        (now < self.window.end_ns).then_some((now, burst))
    }
}

/// A fan-out server's commands until `Quit`: each `Publish` runs `publish`
/// (in a task of its own) on the subscribers connected by then, and reports
/// how many events it published. `what` names the server in errors.
pub async fn serve_publishes<T, F, Fut>(
    what: &str,
    subscribers: &Mutex<Vec<T>>,
    publish: F,
    mut commands: Commands,
    reporter: &Reporter,
) -> Result<()>
where
    T: Clone,
    F: Fn(Vec<T>, usize, u64, usize, Window) -> Fut,
    Fut: Future<Output = u64> + Send + 'static,
{
    while let Some(cmd) = commands.next().await? {
        match cmd {
            Cmd::Publish { keys, interval_us, payload, window } => {
                let subscribers = subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let events = tokio::spawn(publish(subscribers, keys, interval_us, payload, window)).await?;
                reporter.send(&Report::Published { events });
            }
            Cmd::Quit => break,
            other => anyhow::bail!("{what} cannot {other:?}"),
        }
    }
    Ok(())
}
