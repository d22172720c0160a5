//! The Rust follower (`tandem-follower`) under test: reads driver-protocol
//! commands (JSON lines) on stdin, prints replies and events on stdout, as
//! `conformance/README.md` specifies. Logs go to stderr (`RUST_LOG`).
//!
//! ```text
//! cargo build -p tandem-conformance
//! target/debug/tandem-conformance -- target/debug/tandem-conformance-rust-follower
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tandem_follower::{Config, Connection, Error, LinkState, UnixConnector};
use tandem_protocol::{Api, UpstreamState};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The channel every case uses; its values are JSON values as MessagePack.
#[derive(Debug)]
struct Channel;

impl Api for Channel {
    const NAME: &'static str = "config";
    type Key = String;
    type Event = Value;
    type Request = Value;
    type Response = Value;
}

/// Where replies and events go: one writer task prints them in order.
type Out = mpsc::UnboundedSender<Value>;

/// Running invokes and subscriptions, by command id: cancelled or unsubscribed by aborting.
type Tasks = Arc<Mutex<HashMap<u64, AbortHandle>>>;

fn error_json(error: &Error) -> Value {
    let (kind, remote) = match error {
        Error::DeadlineExceeded(_) => ("DeadlineExceeded", None),
        Error::LeaderLost => ("LeaderLost", None),
        Error::Remote(e) => ("Remote", Some(e)),
        Error::Rejected(e) => ("Rejected", Some(e)),
        Error::Closed => ("Closed", None),
        _ => ("Other", None),
    };
    match remote {
        Some(e) => json!({ "type": kind, "kind": e.kind.as_str(), "code": e.code.as_str(), "message": e.message }),
        None => json!({ "type": kind, "kind": null, "code": null, "message": error.to_string() }),
    }
}

fn reply(out: &Out, id: u64, result: Result<Value, Value>) {
    let line = match result {
        Ok(Value::Object(mut fields)) => {
            fields.insert("id".into(), json!(id));
            fields.insert("ok".into(), json!(true));
            Value::Object(fields)
        }
        Ok(_) => json!({ "id": id, "ok": true }),
        Err(error) => json!({ "id": id, "ok": false, "error": error }),
    };
    let _ = out.send(line);
}

fn other(message: &str) -> Value {
    json!({ "type": "Other", "kind": null, "code": null, "message": message })
}

struct Driver {
    out: Out,
    tasks: Tasks,
    connection: Option<Connection>,
}

impl Driver {
    fn command(&mut self, command: Value) {
        let id = command["id"].as_u64().unwrap_or(0);
        let op = command["op"].as_str().unwrap_or_default().to_string();
        if op == "connect" {
            return self.connect(id, &command);
        }
        let Some(connection) = self.connection.clone() else {
            return reply(&self.out, id, Err(other("not connected: send connect first")));
        };
        let channel = command["channel"].as_str().unwrap_or(Channel::NAME);
        if ["invoke", "publish", "subscribe", "status"].contains(&op.as_str()) && channel != Channel::NAME {
            return reply(&self.out, id, Err(other("this driver serves the channel \"config\" only")));
        }
        let client = connection.client::<Channel>();
        let out = self.out.clone();
        match op.as_str() {
            "invoke" => {
                let request = command["request"].clone();
                let deadline = Duration::from_millis(command["deadline_ms"].as_u64().unwrap_or(5000));
                let oneway = command["oneway"].as_bool().unwrap_or(false);
                let tasks = self.tasks.clone();
                let mut slot = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
                let task = tokio::spawn(async move {
                    let result = if oneway {
                        client.invoke_oneway(request).await.map(|()| Value::Null)
                    } else {
                        client.invoke_with_deadline(request, deadline).await
                    };
                    // A call cancelled meanwhile was answered by the cancel.
                    if tasks.lock().unwrap_or_else(|e| e.into_inner()).remove(&id).is_some() {
                        reply(
                            &out,
                            id,
                            result.map(|response| json!({ "response": response })).map_err(|e| error_json(&e)),
                        );
                    }
                });
                slot.insert(id, task.abort_handle());
            }
            "cancel" => {
                let target = command["target"].as_u64().unwrap_or(0);
                if let Some(task) = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).remove(&target) {
                    // Dropping the invoke future sends Cancel to the leader.
                    task.abort();
                    reply(
                        &out,
                        target,
                        Err(json!({ "type": "Cancelled", "kind": null, "code": null, "message": "cancelled" })),
                    );
                }
                reply(&out, id, Ok(Value::Null));
            }
            "publish" => {
                let request = command["request"].clone();
                tokio::spawn(async move {
                    reply(&out, id, client.publish(request).await.map(|()| Value::Null).map_err(|e| error_json(&e)));
                });
            }
            "subscribe" => {
                let key = command["key"].as_str().unwrap_or_default().to_string();
                let mut slot = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
                let task = tokio::spawn(async move {
                    let mut subscription = match client.subscribe(key).await {
                        Ok(subscription) => subscription,
                        Err(error) => return reply(&out, id, Err(error_json(&error))),
                    };
                    reply(&out, id, Ok(Value::Null));
                    while let Some(update) = subscription.next().await {
                        let _ = out.send(json!({
                            "event": "value", "sub": id, "value": update.value,
                            "epoch": update.epoch, "seq": update.seq, "cached": update.is_cached(),
                        }));
                    }
                    let error = subscription.ended().and_then(|e| e.remote().cloned());
                    let error = error.map(|e| json!({ "type": "Remote", "kind": e.kind.as_str(), "code": e.code.as_str(), "message": e.message }));
                    let _ = out.send(json!({ "event": "end", "sub": id, "error": error }));
                });
                slot.insert(id, task.abort_handle());
            }
            "unsubscribe" => {
                let target = command["target"].as_u64().unwrap_or(0);
                // Dropping the subscription sends Unsubscribe.
                if let Some(task) = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).remove(&target) {
                    task.abort();
                }
                reply(&out, id, Ok(Value::Null));
            }
            "status" => {
                let status = connection.status().borrow().clone();
                let (link, epoch) = match status.link {
                    LinkState::Connecting => ("connecting", None),
                    LinkState::Connected { epoch, .. } => ("connected", Some(epoch)),
                    LinkState::LeaderLost => ("lost", None),
                    LinkState::Rejected(_) => ("rejected", None),
                    LinkState::Closed => ("closed", None),
                    _ => ("failed", None),
                };
                let (state, error) = match status.channels.get(channel) {
                    Some(UpstreamState::Starting) => (json!("Starting"), Value::Null),
                    Some(UpstreamState::Ready) => (json!("Ready"), Value::Null),
                    Some(UpstreamState::Down(e)) => (
                        json!("Down"),
                        json!({ "type": "Remote", "kind": e.kind.as_str(), "code": e.code.as_str(), "message": e.message }),
                    ),
                    _ => (Value::Null, Value::Null),
                };
                reply(&out, id, Ok(json!({ "link": link, "epoch": epoch, "state": state, "error": error })));
            }
            "close" => {
                tokio::spawn(async move {
                    connection.close().await;
                    reply(&out, id, Ok(Value::Null));
                });
            }
            _ => reply(&out, id, Err(other(&format!("unknown op {op:?}")))),
        }
    }

    fn connect(&mut self, id: u64, command: &Value) {
        let Some(socket) = std::env::var_os("TANDEM_LEADER_SOCKET") else {
            return reply(&self.out, id, Err(other("TANDEM_LEADER_SOCKET is not set")));
        };
        let mut config = Config::default();
        config.token = std::env::var("TANDEM_TOKEN").ok().filter(|t| !t.is_empty());
        if let Some(ms) = command["peer_timeout_ms"].as_u64() {
            config.peer_timeout = Duration::from_millis(ms);
        }
        let connection =
            Connection::builder().config(config).channel::<Channel>().connect(UnixConnector::new(socket)).spawn();
        let client = connection.client::<Channel>();
        self.connection = Some(connection);
        let out = self.out.clone();
        tokio::spawn(async move {
            reply(&out, id, client.ready().await.map(|()| Value::Null).map_err(|e| error_json(&e)));
        });
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let (out, mut lines) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = lines.recv().await {
            let text = format!("{line}\n");
            if stdout.write_all(text.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                return;
            }
        }
    });
    let mut driver = Driver { out, tasks: Tasks::default(), connection: None };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = stdin.next_line().await {
        match serde_json::from_str::<Value>(&line) {
            Ok(command) => driver.command(command),
            Err(e) => tracing::warn!(error = %e, line, "not a JSON command"),
        }
    }
    if let Some(connection) = driver.connection.take() {
        connection.close().await;
    }
}
