//! A Leader whose upstream lives in its own memory: the `config` channel
//! (`ConfigApi`, the one `standalone` serves) answered from a map, with no
//! registry behind it. It is the tandem side of the Node/Python follower
//! benchmark against Node's cluster-client (`clients/node/bench/bench.js
//! --upstream memory`), whose upstream is an in-memory `getConfig` in the
//! cluster-client leader's process: the same terms on both sides.
//!
//! ```text
//! cargo run --release --example bench_leader -- \
//!     --socket /tmp/tandem-bench/bench.sock --token T --set app.bench='{"key":"app.bench"}'
//! ```
//!
//! What a call does: a follower's `Invoke` on `config` with `{"Get": key}`
//! is decoded by the Leader, handed to [`MemoryUpstream::invoke`], which
//! clones the key's value out of a `HashMap` behind a mutex, and the
//! `ConfigResponse::Value` goes back in a `Response` frame. `Put` and
//! `Delete` change the map and feed subscribers of the key, so the channel
//! behaves like the registry's for a follower (only in memory).
//!
//! Output: one line `listening <socket>` once followers may connect. It runs
//! until SIGTERM or Ctrl-C. Mistakes end it at once with exit code 1 and one
//! error line: a `--set` without `=`, a socket path that cannot be bound
//! (over the Unix path limit, a directory other users may enter).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use clap::Parser;
use tandem::apis::ConfigValue;
use tandem::registry_upstream::{ConfigApi, ConfigRequest};
use tandem::{CallContext, EventSender, Events, Leader, RemoteError, Upstream};

#[derive(Parser, Debug)]
#[command(about = "A tandem Leader with an in-memory `config` upstream, for benchmarks")]
struct Args {
    /// The Unix socket followers connect to (its directory is created 0700).
    #[arg(long)]
    socket: PathBuf,
    /// The token the leader requires from followers.
    #[arg(long)]
    token: Option<String>,
    /// A key's initial value, as KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    values: Vec<String>,
    /// Run on tokio's current-thread runtime (one thread, as a Node leader
    /// has) instead of the multi-thread one `standalone` uses.
    #[arg(long)]
    current_thread: bool,
}

/// The key's current value and the subscribers' sink, if any follower subscribed.
#[derive(Default)]
struct Entry {
    value: Option<ConfigValue>,
    sink: Option<EventSender<ConfigValue>>,
}

/// The in-memory upstream: a map from key to value, revisions counted from 1.
#[derive(Clone, Default)]
struct MemoryUpstream {
    entries: Arc<Mutex<(u64, HashMap<String, Entry>)>>,
}

impl MemoryUpstream {
    /// Sets or deletes `key` and tells its subscribers; returns the revision.
    fn write(&self, key: String, value: Option<String>) -> u64 {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (revision, map) = &mut *guard;
        *revision += 1;
        let entry = map.entry(key).or_default();
        let value = ConfigValue { value, revision: *revision };
        if let Some(sink) = &entry.sink {
            sink.send(value.clone());
        }
        entry.value = Some(value);
        *revision
    }
}

impl Upstream<ConfigApi> for MemoryUpstream {
    async fn invoke(
        &self,
        request: ConfigRequest,
        _ctx: CallContext,
    ) -> Result<tandem::registry_upstream::ConfigResponse, RemoteError> {
        use tandem::registry_upstream::ConfigResponse;
        match request {
            ConfigRequest::Get(key) => {
                let guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                let value = guard.1.get(&key).and_then(|e| e.value.clone()).filter(|v| v.value.is_some());
                Ok(ConfigResponse::Value(value))
            }
            ConfigRequest::Put(key, value) => Ok(ConfigResponse::Revision(self.write(key, Some(value)))),
            ConfigRequest::Delete(key) => {
                let existed = {
                    let guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                    guard.1.get(&key).is_some_and(|e| e.value.as_ref().is_some_and(|v| v.value.is_some()))
                };
                let revision = self.write(key, None);
                Ok(ConfigResponse::Deleted(existed.then_some(revision)))
            }
            other => Err(RemoteError::bad_request(format!("the in-memory upstream cannot {other:?}"))),
        }
    }

    async fn subscribe(&self, key: String) -> Result<Events<ConfigValue>, RemoteError> {
        let (sink, events) = Events::channel();
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entry = guard.1.entry(key).or_default();
        if let Some(value) = &entry.value {
            sink.send(value.clone());
        }
        entry.sink = Some(sink);
        Ok(events)
    }
}

fn main() -> anyhow::Result<()> {
    tandem::logging::init_with_default("warn");
    let args = Args::parse();
    let upstream = MemoryUpstream::default();
    for set in &args.values {
        let Some((key, value)) = set.split_once('=') else {
            bail!("--set {set:?}: expected KEY=VALUE");
        };
        upstream.write(key.to_owned(), Some(value.to_owned()));
    }
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Runtime::new()?
    };
    runtime.block_on(async move {
        let leader = Leader::builder().token(args.token.clone()).channel::<ConfigApi, _>(upstream).start();
        let bound = leader.bind_unix(&args.socket).with_context(|| format!("--socket {}", args.socket.display()))?;
        println!("listening {}", bound.display());
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
        Ok(())
    })
}
