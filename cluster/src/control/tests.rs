//! The control socket's unit tests.

use std::io::{self};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use futures::StreamExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{Framed, LinesCodec};

use super::client::*;
use super::limits::*;
use super::names::*;
use super::server::*;
use super::wire::*;
use crate::{Error, ExitReason, ReloadError, ReplaceReason, ReplacedWorker, ScaleTo, StartFailure};

#[test]
fn names_are_checked() {
    assert!(validate_name("config_center").is_ok());
    assert!(validate_name("a.b-c_1").is_ok());
    for bad in ["", ".hidden", "a/b", "..", "x y", &"n".repeat(65)] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn requests_are_json_lines() {
    assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"cmd":"status"}"#);
    assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"reload"}"#).unwrap(), Request::Reload);
    assert_eq!(serde_json::to_string(&Request::ReloadAgent).unwrap(), r#"{"cmd":"reload_agent"}"#);
    assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
    // Scale and restart, as docs/operating.md shows them.
    let scale = Request::Scale { workers: ScaleTo::Remove(2) };
    assert_eq!(serde_json::to_string(&scale).unwrap(), r#"{"cmd":"scale","workers":{"remove":2}}"#);
    assert_eq!(
        serde_json::from_str::<Request>(r#"{"cmd":"scale","workers":{"to":4}}"#).unwrap(),
        Request::Scale { workers: ScaleTo::To(4) }
    );
    assert_eq!(serde_json::to_string(&Request::Restart { worker: 2 }).unwrap(), r#"{"cmd":"restart","worker":2}"#);
    assert_eq!(serde_json::to_string(&Request::RestartAgent).unwrap(), r#"{"cmd":"restart_agent"}"#);
    // A negative count, a missing one, or a count over u32 does not read: a bad request.
    for bad in [
        r#"{"cmd":"scale","workers":{"to":-1}}"#,
        r#"{"cmd":"scale"}"#,
        r#"{"cmd":"scale","workers":{"add":4294967296}}"#,
        r#"{"cmd":"restart"}"#,
        r#"{"cmd":"restart","worker":-1}"#,
    ] {
        assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
    }
    let report = crate::ScaleReport {
        from: 4,
        to: 3,
        added: Vec::new(),
        removed: vec![crate::RemovedWorker { worker: 4, pid: Some(25133), exit: Some(ExitReason::Code(0)) }],
        took: std::time::Duration::from_millis(12),
    };
    assert_eq!(
        serde_json::to_string(&report).unwrap(),
        r#"{"from":4,"to":3,"added":[],"removed":[{"worker":4,"pid":25133,"exit":{"Code":0}}],"took_ms":12}"#
    );
}

#[test]
fn the_refusal_line_is_pinned() {
    assert_eq!(
        encode_reply(&Response::too_many_connections(), MAX_LINE),
        r#"{"ok":false,"error":"the master is serving its limit of 16 control connections; try again","code":"too_many_connections"}"#
    );
    let refused = response_result(&encode_reply(&Response::too_many_connections(), MAX_LINE));
    assert!(matches!(&refused, Err(e @ ControlError::Busy(_)) if e.is_retryable()), "{refused:?}");
    let failed = response_result(r#"{"ok":false,"error":"reload already running"}"#);
    assert!(matches!(&failed, Err(ControlError::Failed(e)) if e == "reload already running"), "{failed:?}");
}

/// A failed reload crosses the socket typed: the line carries the text (for
/// older clients) and the error, and the client gets the same error back.
#[test]
fn a_reload_error_crosses_the_socket_typed_and_in_words() {
    let failed = ReloadError::Failed {
        worker: 2,
        new_pid: Some(4250),
        cause: StartFailure::Exited(ExitReason::Code(3)),
        replaced: vec![ReplacedWorker { id: 1, old_pid: 4247, new_pid: 4249 }],
    };
    let line = encode_reply(&Response::reload_failed(failed.clone()), MAX_LINE);
    assert_eq!(
        line,
        r#"{"ok":false,"error":"worker 2: new process 4250 exited with code 3 before it was ready (rolled back; 1 slot(s) had already been replaced)","reload_error":{"kind":"failed","worker":2,"new_pid":4250,"cause":{"kind":"exited","detail":{"Code":3}},"replaced":[{"worker":1,"old_pid":4247,"new_pid":4249}]}}"#
    );
    match response_result(&line) {
        Err(ControlError::Reload(e)) => {
            assert_eq!(e, failed);
            assert_eq!(ControlError::Reload(e).to_string(), failed.to_string(), "the CLI prints the same text");
        }
        other => panic!("expected Reload, got {other:?}"),
    }
    // Every kind the machines answer with, round trip.
    let errors = [
        ReloadError::InProgress { running: ReplaceReason::AgentReload },
        ReloadError::ShuttingDown,
        ReloadError::NotReady,
        ReloadError::AgentNotReady,
        ReloadError::ExecutableMissing { path: PathBuf::from("/srv/app/config_center") },
        ReloadError::MasterGone,
        ReloadError::AgentFailed {
            old_pid: 4200,
            new_pid: Some(4242),
            cause: StartFailure::IpcMismatch(ExitReason::Code(111)),
        },
        ReloadError::AgentFailed {
            old_pid: 4200,
            new_pid: None,
            cause: StartFailure::Spawn("Permission denied (os error 13)".into()),
        },
        ReloadError::Failed {
            worker: 1,
            new_pid: Some(7),
            cause: StartFailure::TimedOut(std::time::Duration::from_secs(2)),
            replaced: Vec::new(),
        },
        ReloadError::InProgress { running: ReplaceReason::Scale },
        ReloadError::InProgress { running: ReplaceReason::Restart },
        ReloadError::TooFewWorkers { current: 2, asked: ScaleTo::To(0), result: 0 },
        ReloadError::TooFewWorkers { current: 2, asked: ScaleTo::Remove(5), result: -3 },
        ReloadError::TooManyWorkers { current: 2, asked: ScaleTo::Add(2000), result: 2002, max: crate::MAX_WORKERS },
        ReloadError::ReusePortFixed { listener: "http".into(), workers: 2 },
        ReloadError::UnknownWorker { worker: 9, workers: 2 },
        ReloadError::WorkerNotReady { worker: 1 },
        ReloadError::ScaleFailed {
            worker: 3,
            new_pid: Some(8),
            cause: StartFailure::TimedOut(std::time::Duration::from_secs(2)),
            workers: 2,
        },
    ];
    for e in errors {
        let line = encode_reply(&Response::reload_failed(e.clone()), MAX_LINE);
        let error = serde_json::from_str::<Response>(&line).unwrap().error;
        assert_eq!(error.as_deref(), Some(e.to_string().as_str()), "{line}");
        match response_result(&line) {
            Err(ControlError::Reload(back)) => assert_eq!(back, e, "{line}"),
            other => panic!("expected Reload, got {other:?} from {line}"),
        }
    }
    assert_eq!(
        serde_json::to_string(&ReloadError::InProgress { running: ReplaceReason::Reload }).unwrap(),
        r#"{"kind":"in_progress","running":"Reload"}"#
    );
    // As the control module's docs show it.
    assert_eq!(
        encode_reply(
            &Response::reload_failed(ReloadError::TooFewWorkers { current: 1, asked: ScaleTo::To(0), result: 0 }),
            MAX_LINE
        ),
        r#"{"ok":false,"error":"scaling 1 worker(s) to 0 would leave 0; a cluster keeps at least 1 worker (`tandem stop` stops it)","reload_error":{"kind":"too_few_workers","current":1,"asked":{"to":0},"result":0}}"#
    );
    let busy = response_result(&encode_reply(&Response::reload_failed(ReloadError::NotReady), MAX_LINE));
    assert!(matches!(&busy, Err(e @ ControlError::Reload(_)) if e.is_retryable()), "{busy:?}");
}

/// An older master's answer (text only), and a newer master's (an error of a
/// kind this client does not know), still read: as the text.
#[test]
fn a_reload_error_this_client_does_not_know_reads_as_its_text() {
    let old = response_result(r#"{"ok":false,"error":"worker 1: new process 9 was not ready within 2s"}"#);
    assert!(matches!(&old, Err(ControlError::Failed(e)) if e == "worker 1: new process 9 was not ready within 2s"));
    let newer = response_result(
        r#"{"ok":false,"error":"the moon is in the way","reload_error":{"kind":"moon_in_the_way","phase":3}}"#,
    );
    assert!(matches!(&newer, Err(ControlError::Failed(e)) if e == "the moon is in the way"), "{newer:?}");
    let cause = response_result(
        r#"{"ok":false,"error":"worker 1: new process 9 melted","reload_error":{"kind":"failed","worker":1,"new_pid":9,"cause":{"kind":"melted"},"replaced":[]}}"#,
    );
    assert!(matches!(&cause, Err(ControlError::Failed(e)) if e == "worker 1: new process 9 melted"), "{cause:?}");
}

/// An error that cannot be written as JSON (a path that is not UTF-8) is
/// answered in words, not replaced by "could not encode".
#[test]
fn a_reload_error_that_does_not_encode_is_answered_in_words() {
    use std::os::unix::ffi::OsStrExt;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/srv/\xff/app"));
    let e = ReloadError::ExecutableMissing { path };
    let line = encode_reply(&Response::reload_failed(e.clone()), MAX_LINE);
    match response_result(&line) {
        Err(ControlError::Failed(text)) => assert_eq!(text, e.to_string()),
        other => panic!("expected Failed, got {other:?} from {line}"),
    }
}

#[test]
fn a_bad_request_is_echoed_cut_short_with_its_length() {
    let why = |line: &str| {
        let e = serde_json::from_str::<Request>(line).unwrap_err();
        Response::bad_request(line, &e)
    };
    assert_eq!(
        why("status").error.as_deref(),
        Some(
            r#"bad request (6 bytes, starting "status"): expected value at line 1 column 1; expected {"cmd":"info|status|leader|reload|reload_agent|scale|restart|restart_agent|stop"}"#
        )
    );
    // The repro of issue 23: 4 MiB of \x01 (Debug-escaped, each is 5 bytes).
    let flood = "\u{1}".repeat(4 * 1024 * 1024);
    let line = encode_reply(&why(&flood), MAX_LINE);
    assert!(line.len() < 1024, "{} bytes: {line}", line.len());
    let prefix = r"\\u{1}".repeat(ECHO_PREFIX);
    assert!(line.contains(&format!(r#"(4194304 bytes, starting \"{prefix}\"...): "#)), "{line}");
    // The parser quotes an unknown command: cut short too.
    let long = format!(r#"{{"cmd":"{}"}}"#, "é".repeat(2000));
    let line = encode_reply(&why(&long), MAX_LINE);
    assert!(line.len() < 1024, "{} bytes: {line}", line.len());
    assert!(line.contains("(4010 bytes, starting ") && line.contains("unknown variant"), "{line}");
    let too_long = encode_reply(&Response::line_too_long(&[b'x'; MAX_REQUEST_LINE + 1]), MAX_LINE);
    assert!(too_long.len() < 1024, "{too_long}");
    assert!(too_long.contains(&format!("longer than 4096 bytes (the limit), starting \\\"{}\\\"...", "x".repeat(64))));
}

#[test]
fn cut_stops_at_a_character_boundary() {
    assert_eq!(cut("abc", 10), "abc");
    assert_eq!(cut("abc", 2), "ab");
    assert_eq!(cut("héllo", 2), "h");
    assert_eq!(cut("héllo", 3), "hé");
    assert_eq!(cut("", 0), "");
}

#[test]
fn an_answer_over_the_line_limit_is_replaced_by_an_error() {
    let small = Response::ok("x".repeat(20));
    assert_eq!(encode_reply(&small, 64), serde_json::to_string(&small).unwrap());
    let big = Response::ok("x".repeat(100));
    let line = encode_reply(&big, 64);
    assert_eq!(line, r#"{"ok":false,"error":"the answer is 123 bytes, over the control socket's limit of 64"}"#);
    assert_eq!(serde_json::to_string(&big).unwrap().len(), 123);
}

/// A client that never reads: its answer (larger than the socket's
/// buffers) is abandoned after `WRITE_TIMEOUT`, the connection to be
/// closed; one that reads gets it.
#[tokio::test(start_paused = true)]
async fn an_answer_not_read_is_abandoned_after_the_write_timeout() {
    let answer = Response::ok("x".repeat(MAX_LINE - 100));
    let (master, _client) = UnixStream::pair().unwrap();
    let mut framed = Framed::new(master, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
    let started = tokio::time::Instant::now();
    assert!(!send(&mut framed, &answer, &Warnings::default()).await);
    assert_eq!(started.elapsed(), WRITE_TIMEOUT);

    let (master, client) = UnixStream::pair().unwrap();
    let mut framed = Framed::new(master, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
    let reader = tokio::spawn(async move {
        let mut client = Framed::new(client, LinesCodec::new_with_max_length(MAX_LINE));
        client.next().await.map(|line| line.map(|l| l.len()))
    });
    let started = tokio::time::Instant::now();
    assert!(send(&mut framed, &answer, &Warnings::default()).await);
    assert!(started.elapsed() < WRITE_TIMEOUT);
    assert_eq!(reader.await.unwrap().unwrap().unwrap(), MAX_LINE - 100 + r#"{"ok":true,"result":""}"#.len());
}

/// The master refuses a connection over its limit (`refuse`) and closes
/// it: whether that happens before the client sent its request (which
/// then fails with EPIPE) or after, the client reads the refusal.
#[tokio::test]
async fn a_refused_client_reads_the_refusal_even_when_its_request_was_not_sent() {
    let base = tempfile_dir();
    let path = base.join("control.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let busy = "the master is serving its limit of 16 control connections; try again";

    // Refused (and closed) before the request is sent.
    let mut client = ControlClient::connect_to(&path, "app").await.unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    refuse(stream);
    match client.call(Request::Status).await {
        Err(ControlError::Busy(why)) => assert_eq!(why, busy),
        other => panic!("expected Busy, got {other:?}"),
    }

    // Refused after the request arrived (it stays unread).
    let mut client = ControlClient::connect_to(&path, "app").await.unwrap();
    let call = tokio::spawn(async move { client.call(Request::Status).await });
    let (stream, _) = listener.accept().await.unwrap();
    stream.readable().await.unwrap();
    refuse(stream);
    match call.await.unwrap() {
        Err(ControlError::Busy(why)) => assert_eq!(why, busy),
        other => panic!("expected Busy, got {other:?}"),
    }

    // Closed without a word: the cause is said, not "bad answer".
    let mut client = ControlClient::connect_to(&path, "app").await.unwrap();
    drop(listener.accept().await.unwrap());
    let closed = client.call(Request::Status).await;
    assert!(matches!(closed, Err(ControlError::Closed { .. })), "{closed:?}");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn private_dir_refuses_open_directories() {
    let base = tempfile_dir();
    let open = base.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(private_dir(&open).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    let fresh = base.join("fresh");
    private_dir(&fresh).unwrap();
    assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
    std::fs::remove_dir_all(&base).unwrap();
}

#[tokio::test]
async fn one_master_per_name_and_a_dead_masters_socket_is_taken_over() {
    let base = tempfile_dir();
    let clusters = base.join("tandem");
    let first = ControlServer::bind_in(&clusters, "app").unwrap();
    match ControlServer::bind_in(&clusters, "app") {
        Err(Error::NameInUse { name, pid }) => assert_eq!((name.as_str(), pid), ("app", std::process::id())),
        other => panic!("expected NameInUse, got {other:?}"),
    }
    assert_eq!(std::fs::metadata(&clusters).unwrap().mode() & 0o777, 0o700);
    assert!(ControlServer::bind_in(&clusters, "other").is_ok());
    drop(first);
    assert!(!clusters.join("app").exists(), "a stopped master removes its name's directory");
    // A master that died leaves its directory and socket file behind (and no lock holder).
    private_dir(&clusters.join("app")).unwrap();
    let stale = clusters.join("app").join(SOCKET_FILE);
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let second = ControlServer::bind_in(&clusters, "app").unwrap();
    assert!(UnixStream::connect(&stale).await.is_ok(), "the new master listens on the path");
    drop(second);
    assert!(!stale.exists(), "the socket is removed with its master");
    assert!(matches!(ControlServer::bind_in(&clusters, "../x"), Err(Error::InvalidName { .. })));
    std::fs::remove_dir_all(&base).unwrap();
}

fn tempfile_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let dir = std::env::temp_dir().join(format!("tandem-control-test-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
