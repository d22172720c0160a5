//! The cases: one script each, playing the Leader against one fresh follower process.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tandem_protocol::{
    Ack, ErrorCode, Frame, Hello, Invoke, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Position, Reject, RemoteError,
    Response, Subscribe, UpstreamState,
};
use tokio::time::Instant;

use crate::child::Child;
use crate::link::{Conn, Leader, status};

/// A case the harness can run.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Its name, for `--case`.
    pub name: &'static str,
    /// What it checks, in one line.
    pub about: &'static str,
}

/// Every case, in the order a run takes them.
pub const CASES: &[Case] = &[
    Case {
        name: "hello",
        about: "the first frame is Hello: a version the reference speaks (1 to 3), the token from TANDEM_TOKEN, the channels, the real pid; Goodbye or close on close",
    },
    Case {
        name: "reject_token",
        about: "a Reject with code token surfaces as a typed rejection and the same Hello is not sent again",
    },
    Case {
        name: "reject_version",
        about: "a Reject with code version surfaces as a typed rejection and the same Hello is not sent again",
    },
    Case {
        name: "invoke",
        about: "two calls answered out of order are matched by id; Ok payloads decode, Err is a typed remote error",
    },
    Case {
        name: "invoke_deadline",
        about: "a call the leader does not answer fails with DeadlineExceeded at its deadline and is cancelled (Cancel); a late Response is ignored",
    },
    Case {
        name: "invoke_cancel",
        about: "cancelling a call sends Cancel with its id; a crossing Response is ignored; ids are not reused",
    },
    Case { name: "oneway", about: "a one-way call is an Invoke with oneway true and returns without a Response" },
    Case { name: "publish", about: "publish is a Publish answered by Ack: Ok succeeds, Err is a typed remote error" },
    Case {
        name: "subscribe",
        about: "Subscribe without last_seen; the replay after the Ack is delivered; duplicates and older positions are dropped; cached is reported; Unsubscribe carries the same key bytes",
    },
    Case { name: "subscribe_refused", about: "a Subscribe answered by Ack Err fails with the typed remote error" },
    Case { name: "ended", about: "Ended ends the subscription with the leader's error" },
    Case {
        name: "upstream_status",
        about: "Status frames (Down with its error, Starting, Ready) are surfaced as the channel's state",
    },
    Case { name: "ping", about: "the follower answers the leader's Ping with a Pong of the same nonce" },
    Case { name: "heartbeat", about: "an idle follower pings every Welcome.heartbeat_ms" },
    Case {
        name: "peer_timeout",
        about: "a silent leader is given up after the follower's peer timeout: calls fail with LeaderLost, the follower reconnects",
    },
    Case {
        name: "epochs",
        about: "after a leader change the follower resubscribes with last_seen; it refuses a leader of a lower epoch and never delivers an older or repeated value",
    },
    Case {
        name: "malformed",
        about: "garbage, unknown kinds, trailing bytes, an empty or oversized or truncated frame, a wrong-direction frame: the follower drops the link, survives and reconnects",
    },
];

/// How the harness runs the cases.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The token the leader requires (given to the child as `TANDEM_TOKEN`).
    pub token: String,
    /// The socket path; `None`: a new one in a private temporary directory per case.
    pub socket: Option<PathBuf>,
    /// How long one step (a frame, a reply) may take.
    pub step: Duration,
    /// The limit of a whole case.
    pub case_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            token: "conformance-token".into(),
            socket: None,
            step: Duration::from_secs(5),
            case_timeout: Duration::from_secs(60),
        }
    }
}

/// A leader that does not need pings from idle followers during a case.
const QUIET_HEARTBEAT_MS: u32 = 60_000;
/// How long a follower is watched for something it must not do (a retry).
const QUIET_WINDOW: Duration = Duration::from_millis(1500);
const CHANNEL: &str = "config";

type Outcome = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Runs one case with a fresh follower started from `command`; `Err` says why it failed.
pub async fn run_case(case: &Case, settings: &Settings, command: &[String]) -> Outcome {
    let dir = tempfile::Builder::new().prefix("tandem-conformance-").tempdir().map_err(|e| e.to_string())?;
    let socket = settings.socket.clone().unwrap_or_else(|| dir.path().join("leader.sock"));
    let leader = Leader::bind(&socket)?;
    let token = match case.name {
        "reject_token" => format!("not-{}", settings.token),
        _ => settings.token.clone(),
    };
    let child = Child::spawn(command, &socket, &token)?;
    let mut ctx = Ctx { leader, child, token: settings.token.clone(), step: settings.step };
    let result = match tokio::time::timeout(settings.case_timeout, ctx.run(case.name)).await {
        Ok(result) => result,
        Err(_) => Err(format!("the case took over {} s", settings.case_timeout.as_secs())),
    };
    let result = result.map_err(|why| {
        let tail = ctx.child.stderr_tail();
        if tail.is_empty() { why } else { format!("{why}\n    driver stderr:\n      {}", tail.join("\n      ")) }
    });
    ctx.child.kill().await;
    if settings.socket.is_some() {
        let _ = std::fs::remove_file(&socket);
    }
    result
}

struct Ctx {
    leader: Leader,
    child: Child,
    token: String,
    step: Duration,
}

fn msgpack(value: &Value) -> Bytes {
    Bytes::from(rmp_serde::to_vec(value).expect("a JSON value encodes"))
}

fn remote(error: &Value) -> (String, String, String) {
    let field = |name: &str| error[name].as_str().unwrap_or_default().to_string();
    (field("kind"), field("code"), field("message"))
}

fn error_type(error: &Value) -> &str {
    error["type"].as_str().unwrap_or("?")
}

impl Ctx {
    async fn run(&mut self, name: &str) -> Outcome {
        match name {
            "hello" => self.hello().await,
            "reject_token" => self.rejected(ErrorCode::TOKEN.as_str()).await,
            "reject_version" => self.rejected(ErrorCode::VERSION.as_str()).await,
            "invoke" => self.invoke().await,
            "invoke_deadline" => self.invoke_deadline().await,
            "invoke_cancel" => self.invoke_cancel().await,
            "oneway" => self.oneway().await,
            "publish" => self.publish().await,
            "subscribe" => self.subscribe().await,
            "subscribe_refused" => self.subscribe_refused().await,
            "ended" => self.ended().await,
            "upstream_status" => self.upstream_status().await,
            "ping" => self.ping().await,
            "heartbeat" => self.heartbeat().await,
            "peer_timeout" => self.peer_timeout().await,
            "epochs" => self.epochs().await,
            "malformed" => self.malformed().await,
            other => Err(format!("no case named {other}")),
        }
    }

    /// Accepts a connection, checks its Hello and welcomes it at `epoch`.
    async fn accept(&mut self, epoch: u64, heartbeat_ms: u32) -> Result<(Conn, Hello), String> {
        let mut conn = self.leader.accept(self.step).await?;
        let hello = conn.hello(self.step).await?;
        ensure!(
            (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version),
            "Hello.version is {}, expected {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
            hello.version
        );
        ensure!(
            hello.token.as_deref() == Some(self.token.as_str()),
            "Hello.token is {:?}, expected TANDEM_TOKEN {:?}",
            hello.token,
            self.token
        );
        conn.welcome(&hello, epoch, heartbeat_ms).await?;
        Ok((conn, hello))
    }

    /// Asks the driver to connect (channel `config`) and welcomes it at `epoch`.
    async fn connect(&mut self, epoch: u64, heartbeat_ms: u32, extra: Value) -> Result<(Conn, Hello), String> {
        let mut command = json!({ "op": "connect", "channels": [CHANNEL] });
        if let (Some(command), Some(extra)) = (command.as_object_mut(), extra.as_object()) {
            command.extend(extra.clone());
        }
        let id = self.child.send(command).await?;
        let (conn, hello) = self.accept(epoch, heartbeat_ms).await?;
        self.child.ok(id, self.step).await?;
        Ok((conn, hello))
    }

    async fn connected(&mut self) -> Result<Conn, String> {
        Ok(self.connect(1, QUIET_HEARTBEAT_MS, json!({})).await?.0)
    }

    /// Sends `invoke` and reads its Invoke frame.
    async fn start_invoke(
        &mut self,
        conn: &mut Conn,
        request: &str,
        deadline_ms: u64,
    ) -> Result<(u64, Invoke), String> {
        let id = self
            .child
            .send(json!({ "op": "invoke", "channel": CHANNEL, "request": request, "deadline_ms": deadline_ms }))
            .await?;
        match conn.recv(self.step).await? {
            Frame::Invoke(invoke) => {
                ensure!(invoke.channel.as_str() == CHANNEL, "Invoke.channel is {:?}", invoke.channel.as_str());
                ensure!(!invoke.oneway, "Invoke.oneway is true for a call");
                ensure!(
                    invoke.payload == msgpack(&json!(request)),
                    "Invoke.payload is not the MessagePack of {request:?}: {:02x?}",
                    &invoke.payload[..]
                );
                ensure!(
                    invoke.deadline_ms >= 1 && u64::from(invoke.deadline_ms) <= deadline_ms,
                    "Invoke.deadline_ms is {}, expected 1..={deadline_ms}",
                    invoke.deadline_ms
                );
                Ok((id, invoke))
            }
            other => Err(format!("expected Invoke, got {other:?}")),
        }
    }

    /// A complete call: Invoke, Response Ok, the driver's answer.
    async fn round_trip(&mut self, conn: &mut Conn, not_id: &[u64]) -> Outcome {
        let (command, invoke) = self.start_invoke(conn, "again", 5000).await?;
        ensure!(!not_id.contains(&invoke.id), "request id {} was reused", invoke.id);
        conn.send(Frame::Response(Response { id: invoke.id, result: Ok(msgpack(&json!("fine"))) })).await?;
        let reply = self.child.ok(command, self.step).await?;
        ensure!(reply["response"] == json!("fine"), "the call answered {} instead of \"fine\"", reply["response"]);
        Ok(())
    }

    async fn hello(&mut self) -> Outcome {
        let (mut conn, hello) = self.connect(1, QUIET_HEARTBEAT_MS, json!({})).await?;
        ensure!(hello.channels.iter().any(|c| c == CHANNEL), "Hello.channels {:?} lacks {CHANNEL:?}", hello.channels);
        if let Some(pid) = conn.peer_pid {
            ensure!(
                i64::from(hello.pid) == i64::from(pid),
                "Hello.pid is {}, the connecting process is {pid}",
                hello.pid
            );
        }
        ensure!(!hello.peer_id.is_nil(), "Hello.peer_id is the nil UUID");
        let id = self.child.send(json!({ "op": "status", "channel": CHANNEL })).await?;
        let reply = self.child.ok(id, self.step).await?;
        ensure!(reply["link"] == json!("connected"), "status link is {}, expected \"connected\"", reply["link"]);
        ensure!(reply["epoch"] == json!(1), "status epoch is {}, expected 1", reply["epoch"]);
        ensure!(reply["state"] == json!("Ready"), "status state is {}, expected \"Ready\"", reply["state"]);
        let id = self.child.send(json!({ "op": "close" })).await?;
        conn.expect_closed(self.step).await?;
        self.child.ok(id, self.step).await?;
        Ok(())
    }

    async fn rejected(&mut self, code: &str) -> Outcome {
        let id = self.child.send(json!({ "op": "connect", "channels": [CHANNEL] })).await?;
        let mut conn = self.leader.accept(self.step).await?;
        let hello = conn.hello(self.step).await?;
        let (version, message) = if code == "token" {
            ensure!(
                hello.token.as_deref() == Some(format!("not-{}", self.token).as_str()),
                "Hello.token is {:?}, not TANDEM_TOKEN",
                hello.token
            );
            (1, "missing or wrong token".to_string())
        } else {
            ensure!(
                (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version),
                "Hello.version is {}, expected {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
                hello.version
            );
            // A leader newer than any follower: there is no older version to fall back to.
            let newer = PROTOCOL_VERSION + 1;
            (
                newer,
                format!(
                    "unsupported protocol version {}: this leader speaks versions {newer} to {newer}",
                    hello.version
                ),
            )
        };
        let error = RemoteError::rejected(message).with_code(ErrorCode::named(if code == "token" {
            "token"
        } else {
            "version"
        }));
        conn.send(Frame::Reject(Reject { version, error })).await?;
        conn.shutdown_write().await;
        drop(conn);
        let error = self.child.err(id, self.step).await?;
        ensure!(error_type(&error) == "Rejected", "connect failed with {error}, expected type Rejected");
        let (kind, got, _) = remote(&error);
        ensure!(kind == "Rejected" && got == code, "the rejection is {error}, expected kind Rejected, code {code:?}");
        ensure!(
            !self.leader.connects_within(QUIET_WINDOW).await,
            "the follower connected again after a {code} rejection (the same Hello must not be retried)"
        );
        Ok(())
    }

    async fn invoke(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let (first, a) = self.start_invoke(&mut conn, "get", 3000).await?;
        let (second, b) = self.start_invoke(&mut conn, "put", 3000).await?;
        ensure!(a.id != b.id, "two outstanding calls share the id {}", a.id);
        let refused = RemoteError::upstream("registry refused").with_code(ErrorCode::upstream("503"));
        conn.send(Frame::Response(Response { id: b.id, result: Err(refused) })).await?;
        conn.send(Frame::Response(Response { id: a.id, result: Ok(msgpack(&json!("value"))) })).await?;
        let reply = self.child.ok(first, self.step).await?;
        ensure!(
            reply["response"] == json!("value"),
            "the first call answered {} instead of \"value\"",
            reply["response"]
        );
        let error = self.child.err(second, self.step).await?;
        ensure!(error_type(&error) == "Remote", "the second call failed with {error}, expected type Remote");
        let (kind, code, message) = remote(&error);
        ensure!(
            (kind.as_str(), code.as_str(), message.as_str()) == ("Upstream", "503", "registry refused"),
            "the remote error is {error}, expected Upstream / 503 / registry refused"
        );
        Ok(())
    }

    async fn invoke_deadline(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let started = Instant::now();
        let (command, invoke) = self.start_invoke(&mut conn, "slow", 300).await?;
        let error = self.child.err(command, Duration::from_millis(300) + self.step).await?;
        let took = started.elapsed();
        ensure!(error_type(&error) == "DeadlineExceeded", "the call failed with {error}, expected DeadlineExceeded");
        ensure!(took >= Duration::from_millis(250), "the 300 ms call failed after only {} ms", took.as_millis());
        match conn.recv(self.step).await? {
            Frame::Cancel(id) if id == invoke.id => {}
            other => return Err(format!("expected Cancel({}) after the deadline, got {other:?}", invoke.id)),
        }
        // The answer crossed the Cancel: ignored.
        conn.send(Frame::Response(Response { id: invoke.id, result: Ok(msgpack(&json!("late"))) })).await?;
        self.round_trip(&mut conn, &[invoke.id]).await
    }

    async fn invoke_cancel(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let (command, invoke) = self.start_invoke(&mut conn, "long", 10_000).await?;
        let cancel = self.child.send(json!({ "op": "cancel", "target": command })).await?;
        match conn.recv(self.step).await? {
            Frame::Cancel(id) if id == invoke.id => {}
            other => return Err(format!("expected Cancel({}), got {other:?}", invoke.id)),
        }
        self.child.ok(cancel, self.step).await?;
        let error = self.child.err(command, self.step).await?;
        ensure!(error_type(&error) == "Cancelled", "the cancelled call ended with {error}, expected type Cancelled");
        conn.send(Frame::Response(Response { id: invoke.id, result: Ok(msgpack(&json!("crossed"))) })).await?;
        self.round_trip(&mut conn, &[invoke.id]).await
    }

    async fn oneway(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let id = self
            .child
            .send(json!({ "op": "invoke", "channel": CHANNEL, "request": "fire", "deadline_ms": 3000, "oneway": true }))
            .await?;
        let invoke = match conn.recv(self.step).await? {
            Frame::Invoke(invoke) => invoke,
            other => return Err(format!("expected Invoke, got {other:?}")),
        };
        ensure!(invoke.oneway, "Invoke.oneway is false for a one-way call");
        ensure!(invoke.payload == msgpack(&json!("fire")), "Invoke.payload is {:02x?}", &invoke.payload[..]);
        let reply = self.child.ok(id, self.step).await?;
        ensure!(reply["response"].is_null(), "a one-way call answered {}", reply["response"]);
        self.round_trip(&mut conn, &[invoke.id]).await
    }

    async fn publish(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let mut ids = Vec::new();
        for (request, result) in
            [("p1", Ok(())), ("p2", Err(RemoteError::upstream("no").with_code(ErrorCode::upstream("503"))))]
        {
            let id = self.child.send(json!({ "op": "publish", "channel": CHANNEL, "request": request })).await?;
            let publish = match conn.recv(self.step).await? {
                Frame::Publish(publish) => publish,
                other => return Err(format!("expected Publish, got {other:?}")),
            };
            ensure!(publish.channel.as_str() == CHANNEL, "Publish.channel is {:?}", publish.channel.as_str());
            ensure!(publish.payload == msgpack(&json!(request)), "Publish.payload is {:02x?}", &publish.payload[..]);
            ensure!(!ids.contains(&publish.id), "request id {} reused", publish.id);
            ids.push(publish.id);
            let failed = result.is_err();
            conn.send(Frame::Ack(Ack { id: publish.id, result })).await?;
            if failed {
                let error = self.child.err(id, self.step).await?;
                let (kind, code, _) = remote(&error);
                ensure!(
                    error_type(&error) == "Remote" && kind == "Upstream" && code == "503",
                    "the refused publish failed with {error}, expected Remote Upstream 503"
                );
            } else {
                self.child.ok(id, self.step).await?;
            }
        }
        Ok(())
    }

    /// Sends `subscribe` for `key` and reads its Subscribe frame.
    async fn start_subscribe(&mut self, conn: &mut Conn, key: &str) -> Result<(u64, Subscribe), String> {
        let id = self.child.send(json!({ "op": "subscribe", "channel": CHANNEL, "key": key })).await?;
        match conn.recv(self.step).await? {
            Frame::Subscribe(subscribe) => {
                ensure!(subscribe.channel.as_str() == CHANNEL, "Subscribe.channel is {:?}", subscribe.channel.as_str());
                ensure!(
                    subscribe.key == msgpack(&json!(key)),
                    "Subscribe.key is not the MessagePack of {key:?}: {:02x?}",
                    &subscribe.key[..]
                );
                Ok((id, subscribe))
            }
            other => Err(format!("expected Subscribe, got {other:?}")),
        }
    }

    async fn expect_value(&mut self, sub: u64, value: &str, epoch: u64, seq: u64, cached: bool) -> Outcome {
        let got = self.child.value(sub, self.step).await?;
        ensure!(
            got["value"] == json!(value) && got["epoch"] == json!(epoch) && got["seq"] == json!(seq),
            "delivered {got}, expected {value:?} at ({epoch}, {seq})"
        );
        ensure!(got["cached"] == json!(cached), "delivered {got} with cached {}, expected {cached}", got["cached"]);
        Ok(())
    }

    async fn subscribe(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let (sub, subscribe) = self.start_subscribe(&mut conn, "db.url").await?;
        ensure!(subscribe.last_seen.is_none(), "a first Subscribe has last_seen {:?}", subscribe.last_seen);
        let key = subscribe.key.clone();
        let event = |seq: u64, value: &str, cached: bool| {
            Frame::Event(tandem_protocol::Event {
                channel: CHANNEL.into(),
                key: key.clone(),
                epoch: 1,
                seq,
                payload: msgpack(&json!(value)),
                cached,
            })
        };
        conn.send(Frame::Ack(Ack { id: subscribe.id, result: Ok(()) })).await?;
        conn.send(event(1, "v1", false)).await?; // the replay of the cached value
        self.child.ok(sub, self.step).await?;
        self.expect_value(sub, "v1", 1, 1, false).await?;
        conn.send(event(2, "v2", false)).await?;
        self.expect_value(sub, "v2", 1, 2, false).await?;
        conn.send(event(2, "v2", false)).await?; // a duplicate
        conn.send(event(1, "v1", false)).await?; // an older value
        conn.send(event(3, "v3", true)).await?;
        self.expect_value(sub, "v3", 1, 3, true).await?;
        conn.send(event(4, "v4", false)).await?;
        self.expect_value(sub, "v4", 1, 4, false).await?;
        let unsubscribe = self.child.send(json!({ "op": "unsubscribe", "target": sub })).await?;
        match conn.recv(self.step).await? {
            Frame::Unsubscribe(u) if u.key == key && u.channel.as_str() == CHANNEL => {
                ensure!(u.id != subscribe.id, "Unsubscribe reuses the Subscribe's id");
                conn.send(Frame::Ack(Ack { id: u.id, result: Ok(()) })).await?;
            }
            other => return Err(format!("expected Unsubscribe of the same key bytes, got {other:?}")),
        }
        self.child.ok(unsubscribe, self.step).await?;
        // An event sent before the leader read the Unsubscribe: ignored.
        conn.send(event(5, "v5", false)).await?;
        self.round_trip(&mut conn, &[subscribe.id]).await?;
        ensure!(
            !self.child.seen(|v| v["event"] == json!("value") && v["seq"] == json!(5)),
            "a value was delivered after unsubscribing"
        );
        Ok(())
    }

    async fn subscribe_refused(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let (sub, subscribe) = self.start_subscribe(&mut conn, "db.url").await?;
        let error = RemoteError::unavailable("upstream starting");
        conn.send(Frame::Ack(Ack { id: subscribe.id, result: Err(error) })).await?;
        let error = self.child.err(sub, self.step).await?;
        let (kind, _, message) = remote(&error);
        ensure!(
            error_type(&error) == "Remote" && kind == "Unavailable" && message == "upstream starting",
            "the refused subscribe failed with {error}, expected Remote Unavailable \"upstream starting\""
        );
        Ok(())
    }

    async fn ended(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let (sub, subscribe) = self.start_subscribe(&mut conn, "db.url").await?;
        conn.send(Frame::Ack(Ack { id: subscribe.id, result: Ok(()) })).await?;
        self.child.ok(sub, self.step).await?;
        let error = RemoteError::rejected("no").with_code(ErrorCode::upstream("limit"));
        conn.send(Frame::Ended(tandem_protocol::Ended { channel: CHANNEL.into(), key: subscribe.key, error })).await?;
        let end = self
            .child
            .wait(self.step, "end of the subscription", |v| v["event"] == json!("end") && v["sub"] == json!(sub))
            .await?;
        let (kind, code, message) = remote(&end["error"]);
        ensure!(
            (kind.as_str(), code.as_str(), message.as_str()) == ("Rejected", "limit", "no"),
            "the subscription ended with {}, expected Rejected / limit / no",
            end["error"]
        );
        Ok(())
    }

    /// Polls the driver's `status` until `state` (and `code`, for Down) shows.
    async fn await_state(&mut self, state: &str, code: Option<&str>) -> Outcome {
        let until = Instant::now() + self.step;
        loop {
            let id = self.child.send(json!({ "op": "status", "channel": CHANNEL })).await?;
            let reply = self.child.ok(id, self.step).await?;
            let code_ok = code.is_none_or(|code| reply["error"]["code"] == json!(code));
            if reply["state"] == json!(state) && code_ok {
                return Ok(());
            }
            ensure!(Instant::now() < until, "the channel's state is {reply}, expected {state} {code:?}");
            tokio::time::sleep(Duration::from_millis(20)).await; // polling the driver, with a deadline
        }
    }

    /// Polls the driver's `status` until it reports a link to the leader at `epoch`
    /// (a follower may fail calls while it is still reading the new `Welcome`).
    async fn await_connected(&mut self, epoch: u64) -> Outcome {
        let until = Instant::now() + self.step;
        loop {
            let id = self.child.send(json!({ "op": "status", "channel": CHANNEL })).await?;
            let reply = self.child.ok(id, self.step).await?;
            if reply["link"] == json!("connected") && reply["epoch"] == json!(epoch) {
                return Ok(());
            }
            ensure!(Instant::now() < until, "the follower reports {reply}, expected connected at epoch {epoch}");
            tokio::time::sleep(Duration::from_millis(20)).await; // polling the driver, with a deadline
        }
    }

    /// [`Self::await_connected`], answering the follower's pings meanwhile.
    async fn await_connected_answering(&mut self, conn: &mut Conn, epoch: u64) -> Outcome {
        let until = Instant::now() + self.step;
        loop {
            let id = self.child.send(json!({ "op": "status", "channel": CHANNEL })).await?;
            let reply = self.child.ok(id, self.step).await?;
            if reply["link"] == json!("connected") && reply["epoch"] == json!(epoch) {
                return Ok(());
            }
            ensure!(Instant::now() < until, "the follower reports {reply}, expected connected at epoch {epoch}");
            // Answers what arrived (pings) for a moment: the poll interval, with a deadline.
            match conn.recv(Duration::from_millis(20)).await {
                Ok(frame) => return Err(format!("expected nothing but pings, got {frame:?}")),
                Err(e) if e.starts_with("no frame") => {}
                Err(e) => return Err(e),
            }
        }
    }
}

// After the `ensure!` macro above, which the cases there use.
mod liveness;
