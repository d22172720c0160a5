//! Many distinct keys through one Leader over one registry connection: the
//! `many_keys` example (real `tandem-registry`, the Leader, a follower process)
//! checks that every sampled key receives its put (all of them, at 100 000).

mod common;

use std::time::Duration;

use common::{Proc, example, field, registry_bin};

async fn run(keys: usize, sample: usize, within: Duration) {
    let registry = registry_bin();
    let keys_arg = keys.to_string();
    let sample_arg = sample.to_string();
    let mut proc = Proc::spawn(
        &example("many_keys"),
        &[
            "--keys",
            &keys_arg,
            "--sample",
            &sample_arg,
            "--follower-buffer",
            "1",
            "--registry-bin",
            registry.to_str().unwrap(),
        ],
    );
    let stats = proc.expect_line(within, |l| l.starts_with("registry connections=")).await;
    assert_eq!(field(&stats, "connections"), Some("1"), "{stats}");
    assert_eq!(field(&stats, "watches"), Some(keys_arg.as_str()), "{stats}");
    assert_eq!(field(&stats, "keys"), Some(keys_arg.as_str()), "{stats}");
    let received = proc.expect_line(within, |l| l.starts_with("received=")).await;
    assert_eq!(field(&received, "received"), Some(sample_arg.as_str()), "{received}");
    assert!(proc.wait(within).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_keys_through_one_leader_all_receive_their_updates() {
    tokio::time::timeout(Duration::from_secs(120), run(5_000, 500, Duration::from_secs(60)))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow in debug builds (about 80 s on 2 cores); run with --release for the figures in docs/upstream-restarts.md"]
async fn a_hundred_thousand_keys_through_one_leader_all_receive_their_updates() {
    // Every one of the 100 000 keys gets a put, and every put reaches the follower.
    tokio::time::timeout(Duration::from_secs(600), run(100_000, 100_000, Duration::from_secs(300)))
        .await
        .expect("test timed out");
}
