//! The golden frames as data: each frame's bytes beside its decoded fields,
//! in the JSON schema `README.md` documents.

use serde_json::{Value, json};
use tandem_protocol::{Frame, RemoteError, UpstreamState};

/// The schema name written in `vectors.json`.
pub const SCHEMA: &str = "tandem-conformance-vectors/1";

/// The largest integer a JSON reader with IEEE doubles (JavaScript) reads exactly.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Bytes as lowercase hex digits, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex digits (whitespace ignored) as bytes; `None` if they are not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()).collect()
}

/// A u64 field: a JSON number up to 2^53 - 1, above it a string of decimal digits.
pub fn u64_json(n: u64) -> Value {
    if n <= MAX_SAFE_INTEGER { json!(n) } else { json!(n.to_string()) }
}

/// A [`RemoteError`] as `{"kind", "code", "message"}`.
pub fn error_json(error: &RemoteError) -> Value {
    json!({ "kind": error.kind.as_str(), "code": error.code.as_str(), "message": error.message })
}

/// Who writes a frame kind: `"F>L"`, `"L>F"` or `"both"`.
pub fn direction(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_)
        | Frame::Invoke(_)
        | Frame::Cancel(_)
        | Frame::Subscribe(_)
        | Frame::Unsubscribe(_)
        | Frame::Publish(_)
        | Frame::Open(_)
        | Frame::SubscribeOne(_)
        | Frame::Settle(_)
        | Frame::Mirror(_) => "F>L",
        Frame::Ping(_) | Frame::Pong(_) | Frame::Goodbye(_) => "both",
        _ => "L>F",
    }
}

/// A frame's fields by name (bin fields as hex strings).
pub fn fields(frame: &Frame) -> Value {
    match frame {
        Frame::Hello(h) => json!({
            "version": h.version, "peer_id": h.peer_id.to_string(), "pid": h.pid,
            "channels": h.channels, "token": h.token,
        }),
        Frame::Welcome(w) => json!({
            "version": w.version, "leader_id": w.leader_id.to_string(), "epoch": u64_json(w.epoch),
            "pid": w.pid, "heartbeat_ms": w.heartbeat_ms,
        }),
        Frame::Reject(r) => json!({ "version": r.version, "error": error_json(&r.error) }),
        Frame::Invoke(i) => json!({
            "id": u64_json(i.id), "channel": i.channel.as_str(), "deadline_ms": i.deadline_ms,
            "oneway": i.oneway, "payload": hex(&i.payload),
        }),
        Frame::Response(r) => json!({
            "id": u64_json(r.id),
            "result": match &r.result {
                Ok(payload) => json!({ "ok": hex(payload) }),
                Err(error) => json!({ "err": error_json(error) }),
            },
        }),
        Frame::Cancel(id) => json!({ "id": u64_json(*id) }),
        Frame::Subscribe(s) => json!({
            "id": u64_json(s.id), "channel": s.channel.as_str(), "key": hex(&s.key),
            "last_seen": s.last_seen.map(|p| json!({ "epoch": u64_json(p.epoch), "seq": u64_json(p.seq) })),
        }),
        Frame::Unsubscribe(u) => json!({ "id": u64_json(u.id), "channel": u.channel.as_str(), "key": hex(&u.key) }),
        Frame::Event(e) => json!({
            "channel": e.channel.as_str(), "key": hex(&e.key), "epoch": u64_json(e.epoch),
            "seq": u64_json(e.seq), "payload": hex(&e.payload), "cached": e.cached,
        }),
        Frame::Publish(p) => json!({ "id": u64_json(p.id), "channel": p.channel.as_str(), "payload": hex(&p.payload) }),
        Frame::Ack(a) => json!({
            "id": u64_json(a.id),
            "result": match &a.result {
                Ok(()) => json!({ "ok": null }),
                Err(error) => json!({ "err": error_json(error) }),
            },
        }),
        Frame::Status(s) => json!({ "channel": s.channel.as_str(), "state": state_json(&s.state) }),
        Frame::Ping(nonce) | Frame::Pong(nonce) => json!({ "nonce": u64_json(*nonce) }),
        Frame::Goodbye(reason) => json!({ "reason": reason }),
        Frame::Open(channels) => json!({ "channels": channels }),
        Frame::Ended(e) => json!({ "channel": e.channel.as_str(), "key": hex(&e.key), "error": error_json(&e.error) }),
        Frame::SubscribeOne(s) => json!({
            "id": u64_json(s.id), "channel": s.channel.as_str(), "key": hex(&s.key),
            "window": s.window, "ack_timeout_ms": s.ack_timeout_ms,
        }),
        Frame::Delivery(d) => json!({
            "sub": u64_json(d.sub), "tag": u64_json(d.tag), "epoch": u64_json(d.epoch),
            "seq": u64_json(d.seq), "payload": hex(&d.payload), "redelivered": d.redelivered,
        }),
        Frame::Settle(s) => json!({
            "sub": u64_json(s.sub),
            "acked": s.acked.iter().map(|t| u64_json(*t)).collect::<Vec<_>>(),
            "released": s.released.iter().map(|t| u64_json(*t)).collect::<Vec<_>>(),
        }),
        Frame::Mirror(id) => json!({ "id": u64_json(*id) }),
        Frame::Mirrored(m) => json!({
            "entries": m.entries.iter().map(|e| json!({
                "channel": e.channel.as_str(), "key": hex(&e.key), "epoch": u64_json(e.epoch),
                "seq": u64_json(e.seq), "payload": hex(&e.payload), "revision": e.revision.map(u64_json),
            })).collect::<Vec<_>>(),
            "removed": m.removed.iter().map(|r| json!({ "channel": r.channel.as_str(), "key": hex(&r.key) }))
                .collect::<Vec<_>>(),
            "synced": m.synced,
        }),
        other => json!({ "unsupported": other.kind() }),
    }
}

/// An [`UpstreamState`] as `{"state": "Starting" | "Ready" | "Down", "error": RemoteError or null}`.
pub fn state_json(state: &UpstreamState) -> Value {
    match state {
        UpstreamState::Starting => json!({ "state": "Starting", "error": null }),
        UpstreamState::Ready => json!({ "state": "Ready", "error": null }),
        UpstreamState::Down(error) => json!({ "state": "Down", "error": error_json(error) }),
        other => json!({ "state": format!("{other:?}"), "error": null }),
    }
}

/// One vector: `decode_only` vectors are bytes a reader must accept that a
/// writer never produces (encoding `fields` gives other bytes).
pub fn vector(name: &str, frame: &Frame, wire: &[u8], decode_only: bool) -> Value {
    json!({
        "name": name,
        "kind": frame.kind(),
        "direction": direction(frame),
        "hex": hex(wire),
        "decode_only": decode_only,
        "fields": fields(frame),
    })
}
