//! The last-known-good cache with real processes: `config_center --cache-dir`
//! run once with the registry up (values land on disk), then again with the
//! registry down (workers print the cached values, `source=cache`), then the
//! registry comes back (live values, `source=live`, with no restart).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Proc, example, field, private_dir};
use nix::sys::signal::Signal;
use tandem::registry::{RegistryClient, Server};

const TIMEOUT: Duration = Duration::from_secs(90);
const LINE: Duration = Duration::from_secs(20);

/// Waits until every worker printed a line with this value and source (lines
/// read earlier count too); returns each worker's (epoch, seq) for it.
async fn expect_value(master: &mut Proc, workers: usize, value: &str, source: &str) -> BTreeMap<String, (u64, u64)> {
    let matches = |l: &str| field(l, "value") == Some(value) && field(l, "source") == Some(source);
    let position = |line: &str| -> (String, (u64, u64)) {
        let at = (field(line, "epoch").unwrap().parse().unwrap(), field(line, "seq").unwrap().parse().unwrap());
        (field(line, "worker").unwrap().to_string(), at)
    };
    let mut seen: BTreeMap<String, (u64, u64)> =
        master.seen.iter().filter(|l| matches(l)).map(|l| position(l)).collect();
    while seen.len() < workers {
        let line = master.expect_line(LINE, matches).await;
        let (worker, at) = position(&line);
        seen.insert(worker, at);
    }
    seen
}

/// Waits for a line starting with `prefix` (lines read earlier count too).
async fn expect_prefix(proc: &mut Proc, prefix: &str) -> String {
    match proc.seen.iter().find(|l| l.starts_with(prefix)) {
        Some(line) => line.clone(),
        None => proc.expect_line(LINE, |l| l.starts_with(prefix)).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_center_serves_cached_values_while_the_registry_is_down_then_live_ones() {
    tokio::time::timeout(TIMEOUT, async {
        let cache = private_dir();
        let cache_dir = cache.path().join("lkg");
        let cache_arg = cache_dir.to_str().unwrap();
        let server = Server::bind("127.0.0.1:0", Default::default()).await.unwrap().spawn();
        let addr = server.local_addr();
        let addr_arg = addr.to_string();
        RegistryClient::connect(addr).await.unwrap().put("k", "remembered").await.unwrap();
        let args = [
            "--workers",
            "2",
            "--registry",
            &addr_arg,
            "--subscribe",
            "k",
            "--write-every",
            "0",
            "--cache-dir",
            cache_arg,
        ];

        // 1. Registry up: the value is delivered live and lands in the cache.
        let mut first = Proc::spawn(&example("config_center"), &args);
        expect_value(&mut first, 2, "remembered", "live").await;
        first.signal(Signal::SIGTERM);
        assert!(first.wait(LINE).await.success());
        drop(first);
        let files: Vec<String> = std::fs::read_dir(&cache_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 1, "one file for the one key, no temporary file: {files:?}");
        assert!(files[0].ends_with(".lkg"), "{files:?}");

        // 2. Registry down: the cluster starts anyway and serves the cached value, marked.
        server.shutdown().await;
        let mut second = Proc::spawn(&example("config_center"), &args);
        let cached = expect_value(&mut second, 2, "remembered", "cache").await;
        expect_prefix(&mut second, "cluster ready:").await;
        let line = expect_prefix(&mut second, "upstream connections:").await;
        assert!(line.contains("unknown"), "{line}");

        // 3. The registry comes back on the same address: live values, no restart.
        let server = Server::bind(addr, Default::default()).await.unwrap().spawn();
        RegistryClient::connect(addr).await.unwrap().put("k", "live-now").await.unwrap();
        let live = expect_value(&mut second, 2, "live-now", "live").await;
        for (worker, position) in &live {
            assert!(position > &cached[worker], "worker {worker}: {position:?} after {:?}", cached[worker]);
        }
        second.signal(Signal::SIGTERM);
        assert!(second.wait(LINE).await.success());
        drop(server);
    })
    .await
    .expect("test timed out");
}
