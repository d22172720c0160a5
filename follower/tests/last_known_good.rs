//! A leader that starts without its upstream, and its last-known-good cache on disk.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use tandem_follower::{Source, State, Update};
use tandem_leader::{Cache, Leader};
use tandem_protocol::{ErrorKind, RemoteError};

const E_DOWN: tandem_protocol::ErrorCode = tandem_protocol::ErrorCode::named("E_DOWN");

/// An upstream that can be switched on and off: while off, building it fails.
#[derive(Clone, Default)]
struct Switch {
    up: Arc<AtomicBool>,
    upstream: MemUpstream,
}

impl Switch {
    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

fn fast_retry() -> tandem_leader::Config {
    let mut config = tandem_leader::Config::default();
    config.upstream_retry_initial = Duration::from_millis(5);
    config.upstream_retry_max = Duration::from_millis(50);
    config
}

/// A leader whose upstream is rebuilt until `switch` is on, with an optional cache.
fn retrying_leader(switch: &Switch, cache: Option<Cache>, sock_dir: &Path, epoch: u64) -> (Leader, PathBuf) {
    let switch = switch.clone();
    let mut builder = Leader::builder().epoch(epoch).config(fast_retry());
    if let Some(cache) = cache {
        builder = builder.cache(cache);
    }
    let leader = builder
        .channel_with_retry::<Kv, _, _, _>(move || {
            let (up, upstream) = (switch.up.load(Ordering::SeqCst), switch.upstream.clone());
            async move {
                if up { Ok(upstream) } else { Err(RemoteError::unavailable("registry unreachable").with_code(E_DOWN)) }
            }
        })
        .start();
    let path = leader.bind_unix(sock_dir.join(format!("leader-{epoch}.sock"))).expect("bind");
    (leader, path)
}

/// Every log line of this test binary, to assert on warnings.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until a log line contains all of `needles`.
async fn logged(needles: &[&str]) {
    let buffer = logs();
    loop {
        let text = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
        if text.lines().any(|line| needles.iter().all(|n| line.contains(n))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn key_bytes(key: &str) -> Vec<u8> {
    tandem_protocol::payload::encode(&key.to_string()).unwrap().to_vec()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Runs a leader with a live upstream and the cache, delivers `values`, stops it (flushing the cache).
async fn fill_cache(cache_dir: &Path, values: &[(&str, &str)]) {
    let sock = private_dir();
    let switch = Switch::default();
    switch.set(true);
    let (leader, path) = retrying_leader(&switch, Some(Cache::open(cache_dir).unwrap()), sock.path(), 1);
    let kv = follower(&path).client::<Kv>();
    for (key, value) in values {
        let mut sub = kv.subscribe(key.to_string()).await.unwrap();
        switch.upstream.put(key, value);
        while sub.next().await.unwrap().value != *value {}
    }
    kv.close().await;
    leader.shutdown().await;
}

#[tokio::test]
async fn a_leader_starts_without_its_upstream_and_everything_flows_once_it_is_built() {
    within(TEST_TIMEOUT, async {
        let dir = private_dir();
        let switch = Switch::default();
        switch.upstream.put("k", "first");
        let (_leader, path) = retrying_leader(&switch, None, dir.path(), 1);
        let kv = follower(&path).client::<Kv>();
        let mut status = kv.watch();
        let status = status.wait_for(|s| matches!(s.state_of("kv"), State::UpstreamDown(_))).await.unwrap().clone();
        let State::UpstreamDown(reason) = status.state_of("kv") else { unreachable!() };
        assert_eq!(reason.code, "E_DOWN", "the state carries the build error: {reason}");
        // Calls fail fast, typed, with the cause.
        let started = tokio::time::Instant::now();
        let error = kv.invoke(KvRequest::Get("k".into())).await.unwrap_err();
        assert_eq!(error.remote().map(|e| (e.kind, e.code.as_str())), Some((ErrorKind::Unavailable, "E_DOWN")));
        assert!(started.elapsed() < Duration::from_secs(2), "the call waited {:?}", started.elapsed());
        // Subscriptions are accepted as pending.
        let mut sub = kv.subscribe("k".into()).await.unwrap();
        assert_eq!(switch.upstream.counters.subscribes.get(), 0);
        switch.set(true);
        let update = sub.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.source), ("first", Source::Live));
        kv.ready().await.unwrap();
        switch.upstream.put("k", "second");
        assert_eq!(sub.next().await.unwrap().value, "second");
        assert_eq!(kv.invoke(KvRequest::Get("k".into())).await.unwrap(), Some("second".into()));
        assert_eq!(switch.upstream.counters.subscribes.get(), 1);
    })
    .await
}

#[tokio::test]
async fn cached_values_are_served_marked_while_the_upstream_is_down_then_live_values_follow() {
    within(TEST_TIMEOUT, async {
        let cache_dir = private_dir();
        fill_cache(cache_dir.path(), &[("k", "remembered"), ("same", "unchanged")]).await;
        // Written atomically: two files, no temporary left, 0600 in a 0700 directory.
        let files = names(cache_dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files.iter().all(|f| f.ends_with(".lkg") && !f.starts_with('.')), "{files:?}");
        for file in &files {
            let mode = std::fs::metadata(cache_dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        assert_eq!(std::fs::metadata(cache_dir.path()).unwrap().permissions().mode() & 0o777, 0o700);

        // A new leader, upstream unreachable: the cached values at once, marked.
        let sock = private_dir();
        let switch = Switch::default();
        let (leader, path) = retrying_leader(&switch, Some(Cache::open(cache_dir.path()).unwrap()), sock.path(), 2);
        let kv = follower(&path).client::<Kv>();
        let mut sub = kv.subscribe("k".into()).await.unwrap();
        let mut same = kv.subscribe("same".into()).await.unwrap();
        let cached = sub.next().await.unwrap();
        assert_eq!((cached.value.as_str(), cached.source, cached.epoch), ("remembered", Source::Cache, 2));
        assert!(cached.is_cached());
        let cached_same = same.next().await.unwrap();
        assert_eq!((cached_same.value.as_str(), cached_same.source), ("unchanged", Source::Cache));
        assert!(matches!(kv.state(), State::UpstreamDown(_)));
        // A second subscriber of the key gets the cached value too.
        let other = follower(&path).client::<Kv>();
        let mut late = other.subscribe("k".into()).await.unwrap();
        assert_eq!(late.next().await.unwrap().source, Source::Cache);

        // The upstream comes up: the real values follow as newer, unmarked updates,
        // even the one equal to the cached value.
        switch.upstream.put("k", "fresh");
        switch.upstream.put("same", "unchanged");
        switch.set(true);
        let live = sub.next().await.unwrap();
        assert_eq!((live.value.as_str(), live.source), ("fresh", Source::Live));
        assert!(live.position() > cached.position());
        let live_same = same.next().await.unwrap();
        assert_eq!((live_same.value.as_str(), live_same.source), ("unchanged", Source::Live));
        assert!(live_same.position() > cached_same.position());
        let mut seen: Vec<Update<String>> = vec![cached, live];
        for n in 0..20 {
            switch.upstream.put("k", &format!("v{n}"));
            seen.push(sub.next().await.unwrap());
        }
        assert!(seen.windows(2).all(|w| w[0].position() < w[1].position()), "positions must strictly increase");
        assert!(seen[1..].iter().all(|u| u.source == Source::Live));
        assert_eq!(seen.last().unwrap().value, "v19");
        // The late subscriber ends on the live value too.
        let mut last = late.next().await.unwrap();
        while last.value != "v19" {
            last = late.next().await.unwrap();
        }
        assert_eq!(last.source, Source::Live);
        // Its cache writer stopped before the cache directory is removed:
        // one still writing would leave the directory and a `.lkg` file.
        leader.shutdown().await;
        let path = cache_dir.path().to_owned();
        cache_dir.close().unwrap_or_else(|e| panic!("{} not removed: {e}", path.display()));
        assert!(!path.exists(), "{} left behind", path.display());
    })
    .await
}

#[tokio::test]
async fn the_cache_keeps_the_newest_value_of_a_burst_and_leaves_no_temporary_files() {
    within(TEST_TIMEOUT, async {
        let cache_dir = private_dir();
        let values: Vec<String> = (0..200).map(|n| format!("burst-{n}")).collect();
        {
            let sock = private_dir();
            let switch = Switch::default();
            switch.set(true);
            let (leader, path) = retrying_leader(&switch, Some(Cache::open(cache_dir.path()).unwrap()), sock.path(), 1);
            let kv = follower(&path).client::<Kv>();
            let mut sub = kv.subscribe("hot".into()).await.unwrap();
            for value in &values {
                switch.upstream.put("hot", value);
            }
            while sub.next().await.unwrap().value != "burst-199" {}
            leader.shutdown().await;
        }
        let files = names(cache_dir.path());
        assert_eq!(files.len(), 1, "one file per key, no temporary files: {files:?}");
        let sock = private_dir();
        let (leader, path) =
            retrying_leader(&Switch::default(), Some(Cache::open(cache_dir.path()).unwrap()), sock.path(), 2);
        let kv = follower(&path).client::<Kv>();
        let mut sub = kv.subscribe("hot".into()).await.unwrap();
        let update = sub.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.source), ("burst-199", Source::Cache));
        leader.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn corrupt_and_foreign_cache_files_are_ignored_with_a_warning_naming_them() {
    within(TEST_TIMEOUT, async {
        logs();
        let cache_dir = private_dir();
        fill_cache(cache_dir.path(), &[("truncated", "x"), ("good", "kept"), ("wrong", "y")]).await;
        let cache = Cache::open(cache_dir.path()).unwrap();
        let file = |key: &str| cache.file_of("kv", &key_bytes(key));
        // Garbage bytes.
        std::fs::write(file("garbage"), b"\x00\xffnot a cache file at all").unwrap();
        std::fs::set_permissions(file("garbage"), std::fs::Permissions::from_mode(0o600)).unwrap();
        // A truncated file.
        let bytes = std::fs::read(file("truncated")).unwrap();
        std::fs::write(file("truncated"), &bytes[..bytes.len() / 2]).unwrap();
        // Another key's file under this key's name (foreign / wrong key).
        std::fs::copy(file("good"), file("wrong")).unwrap();
        // A symbolic link to a valid file.
        std::os::unix::fs::symlink(file("good"), file("linked")).unwrap();
        // A file of another channel's key under this name.
        std::fs::copy(file("good"), cache.file_of("other-channel", &key_bytes("good"))).unwrap();
        // Something that is not ours at all.
        std::fs::write(cache_dir.path().join("notes.txt"), b"hello").unwrap();

        let sock = private_dir();
        let (leader, path) =
            retrying_leader(&Switch::default(), Some(Cache::open(cache_dir.path()).unwrap()), sock.path(), 2);
        logged(&["notes.txt", "not a tandem cache file"]).await;
        let kv = follower(&path).client::<Kv>();
        let mut subs = Vec::new();
        for (key, reason) in [
            ("garbage", "bad magic"),
            ("truncated", "truncated"),
            ("wrong", "another entry"),
            ("linked", "symbolic link"),
        ] {
            subs.push((key, kv.subscribe(key.to_string()).await.unwrap()));
            let name = file(key).file_name().unwrap().to_string_lossy().into_owned();
            logged(&["cache file ignored", &name, reason]).await;
        }
        for (key, sub) in &subs {
            assert!(sub.latest().is_none(), "{key} must not be served from a bad file");
        }
        // The valid file is still served: the leader did not stop on the bad ones.
        let mut good = kv.subscribe("good".into()).await.unwrap();
        let update = good.next().await.unwrap();
        assert_eq!((update.value.as_str(), update.source), ("kept", Source::Cache));
        leader.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn an_insecure_cache_directory_is_refused_with_the_fix() {
    let dir = private_dir();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let error = Cache::open(&open).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, tandem_leader::Error::InsecureCacheDirectory { mode: 0o755, .. }), "{message}");
    assert!(message.contains("chmod 700") && message.contains(&*open.to_string_lossy()), "{message}");
    // A missing one is created 0700.
    let fresh = dir.path().join("a/b");
    Cache::open(&fresh).unwrap();
    assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
    // A file is not a directory.
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let error = Cache::open(&file).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, tandem_leader::Error::CacheNotADirectory { .. }), "{message}");
    assert!(message.contains("not a directory") && !message.contains("chmod"), "{message}");
}

#[tokio::test]
async fn acknowledged_pending_subscriptions_refused_by_the_upstream_end_with_the_reason() {
    within(TEST_TIMEOUT, async {
        logs();
        let dir = private_dir();
        let switch = Switch::default();
        let (_leader, path) = retrying_leader(&switch, None, dir.path(), 1);
        let kv = follower(&path).client::<Kv>();
        // Accepted while the upstream is not built; refused once it is ("denied*" keys).
        let mut sub = kv.subscribe("denied-x".into()).await.unwrap();
        let mut fine = kv.subscribe("fine".into()).await.unwrap();
        assert!(sub.ended().is_none());
        switch.set(true);
        // The follower that asked is told: its stream ends, with the upstream's reason.
        assert!(sub.next().await.is_none(), "the refused subscription ends");
        let error = sub.ended().expect("ended by the leader");
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("E_DENIED"), "{error}");
        logged(&["the upstream refused a pending subscription; ending it for its subscribers", "E_DENIED"]).await;
        // The others flow.
        switch.upstream.put("fine", "1");
        assert_eq!(fine.next().await.unwrap().value, "1");
        // A new subscriber of a refused key is told at once.
        let other = follower(&path).client::<Kv>();
        other.ready().await.unwrap();
        let error = other.subscribe("denied-y".into()).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("E_DENIED"));
        // And the same process asking again gets the refusal as an error too.
        let error = kv.subscribe("denied-x".into()).await.unwrap_err();
        assert_eq!(error.remote().map(|e| e.code.as_str()), Some("E_DENIED"));
    })
    .await
}
