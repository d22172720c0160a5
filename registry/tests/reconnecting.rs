//! [`Reconnecting`] against real servers: one that is not there yet, a
//! connection cut by a proxy (the same server, its revisions still valid), a
//! server restarted empty on the same port, and lower limits after a restart.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{LIMIT, SETTLE, next, start};
use futures::StreamExt;
use tandem_registry::{
    Config, ConnectionState, Error, Instance, KeyState, Reconnecting, RegistryClient, Server, ServerHandle, ServerInfo,
};
use tandem_testkit::{eventually, within};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn value(value: &str, revision: u64) -> KeyState {
    KeyState { value: Some(Bytes::copy_from_slice(value.as_bytes())), revision }
}

fn absent(revision: u64) -> KeyState {
    KeyState { value: None, revision }
}

/// A port nothing listens on (bound, then released).
async fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

async fn serve_on(addr: SocketAddr, config: Config) -> ServerHandle {
    Server::bind(addr, config).await.expect("the port is free again").spawn()
}

/// Waits for the client to be connected; returns the server's hello.
async fn connected(registry: &Reconnecting) -> ServerInfo {
    let mut state = registry.state();
    let state = state.wait_for(|s| matches!(s, ConnectionState::Connected { .. })).await.unwrap();
    let ConnectionState::Connected { server } = &*state else { unreachable!() };
    server.clone()
}

/// Waits for the client to be down; returns why.
async fn unavailable(registry: &Reconnecting) -> String {
    let mut state = registry.state();
    let state = state.wait_for(|s| matches!(s, ConnectionState::Unavailable { .. })).await.unwrap();
    let ConnectionState::Unavailable { reason } = &*state else { unreachable!() };
    reason.clone()
}

/// A TCP proxy to a server that can cut every connection and refuse (accept,
/// then close) new ones, while the server keeps its state.
struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl Proxy {
    async fn to(server: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = watch::Sender::new(true);
        let gate = open.subscribe();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut gate = gate.clone();
                if !*gate.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(server).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = gate.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Proxy { addr, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn reopen(&self) {
        self.open.send_replace(true);
    }
}

#[tokio::test]
async fn a_registry_not_there_yet_fails_calls_at_once_and_what_was_followed_flows_once_it_is_up() {
    within(LIMIT, async {
        let addr = free_addr().await;
        let registry = Reconnecting::start(addr.to_string());
        assert_eq!(registry.addr(), addr.to_string());
        let reason = unavailable(&registry).await;
        assert!(reason.contains("could not connect to the registry"), "{reason}");
        let error = registry.current().expect_err("no client while down");
        assert!(matches!(error, Error::Connect { .. }) && error.is_retryable(), "{error:?}");
        let mut values = registry.follow_key("k").await.expect("accepted while down");
        let mut lists = registry.follow_service("billing").await.expect("accepted while down");
        let error = registry.register(Instance::new("billing", "b1", "a:1"), Duration::from_secs(10)).await;
        assert!(matches!(error, Err(Error::Connect { .. })), "a registration needs a connection: {error:?}");

        let _server = serve_on(addr, Config::default()).await;
        connected(&registry).await;
        assert_eq!(next(&mut values).await, absent(1), "the current state first, an absence too");
        assert_eq!(next(&mut lists).await, Vec::<Instance>::new());
        let client = registry.current().expect("connected");
        assert_eq!(client.put("k", "v").await.unwrap(), 2);
        assert_eq!(next(&mut values).await, value("v", 2));
    })
    .await
}

#[tokio::test]
async fn a_lost_connection_resumes_every_key_from_its_revision_and_registers_again() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let admin = RegistryClient::connect(server.local_addr()).await.unwrap();
        admin.put("k", "v1").await.unwrap(); // 2
        let proxy = Proxy::to(server.local_addr()).await;
        let registry = Reconnecting::start(proxy.addr.to_string());
        let hello = connected(&registry).await;
        let mut values = registry.follow_key("k").await.unwrap();
        assert_eq!(next(&mut values).await, value("v1", 2));
        let b1 = Instance::new("billing", "b1", "10.0.0.1:80");
        registry.register(b1.clone(), Duration::from_secs(10)).await.unwrap();
        let mut members = admin.watch_service("billing").await.unwrap();
        assert!(matches!(next(&mut members).await.unwrap(), tandem_registry::ServiceEvent::Join(i) if i == b1));

        proxy.cut();
        // "connection lost: ...", or already the next attempt's failure.
        let reason = unavailable(&registry).await;
        assert!(reason.contains("connection to the registry was lost"), "{reason}");
        assert!(registry.current().is_err(), "calls fail at once while down");
        // The instance left with its connection.
        assert!(matches!(next(&mut members).await.unwrap(), tandem_registry::ServiceEvent::Leave { .. }));
        admin.put("k", "v2").await.unwrap(); // 3
        admin.put("k", "v3").await.unwrap(); // 4
        admin.delete("k").await.unwrap(); // 5
        admin.put("k", "v4").await.unwrap(); // 6

        proxy.reopen();
        let again = connected(&registry).await;
        assert_eq!(again.incarnation, hello.incarnation, "the same server");
        // Every change made meanwhile, in order: resumed, not read again.
        for expected in [value("v2", 3), value("v3", 4), absent(5), value("v4", 6)] {
            assert_eq!(next(&mut values).await, expected);
        }
        assert!(matches!(next(&mut members).await.unwrap(), tandem_registry::ServiceEvent::Join(i) if i == b1));
        assert!(registry.deregister("billing", "b1").await.unwrap());
        assert!(!registry.deregister("billing", "b1").await.unwrap(), "no longer held");
        assert!(matches!(next(&mut members).await.unwrap(), tandem_registry::ServiceEvent::Leave { .. }));
    })
    .await
}

#[tokio::test]
async fn a_resume_past_the_history_delivers_the_current_state() {
    within(LIMIT, async {
        let mut config = Config::default();
        config.history = 2;
        let server = start(config).await;
        let admin = RegistryClient::connect(server.local_addr()).await.unwrap();
        admin.put("kept", "old").await.unwrap(); // 2
        admin.put("gone", "old").await.unwrap(); // 3
        let proxy = Proxy::to(server.local_addr()).await;
        let registry = Reconnecting::start(proxy.addr.to_string());
        connected(&registry).await;
        let mut kept = registry.follow_key("kept").await.unwrap();
        let mut gone = registry.follow_key("gone").await.unwrap();
        assert_eq!(next(&mut kept).await, value("old", 2));
        assert_eq!(next(&mut gone).await, value("old", 3));

        proxy.cut();
        unavailable(&registry).await;
        admin.put("kept", "new").await.unwrap(); // 4
        admin.delete("gone").await.unwrap(); // 5
        for i in 0..5 {
            admin.put("other", format!("{i}")).await.unwrap(); // 6..=10: the history holds 9 and 10
        }
        proxy.reopen();
        connected(&registry).await;
        assert_eq!(next(&mut kept).await, value("new", 4), "the current value, from the snapshot");
        assert_eq!(next(&mut gone).await, absent(10), "deleted, at the snapshot's revision");
        admin.put("gone", "back").await.unwrap(); // 11
        assert_eq!(next(&mut gone).await, value("back", 11));
    })
    .await
}

#[tokio::test]
async fn a_registry_restarted_empty_on_the_same_port_is_read_again() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let addr = server.local_addr();
        let registry = Reconnecting::start(addr.to_string());
        let first = connected(&registry).await;
        let mut k = registry.follow_key("k").await.unwrap();
        let mut j = registry.follow_key("j").await.unwrap();
        assert_eq!(next(&mut k).await, absent(1));
        assert_eq!(next(&mut j).await, absent(1));
        let client = registry.current().unwrap();
        for i in 1..=30 {
            client.put("k", format!("v{i}")).await.unwrap();
        }
        client.put("j", "x").await.unwrap(); // 32
        for i in 1..=30 {
            assert_eq!(next(&mut k).await, value(&format!("v{i}"), i + 1));
        }
        assert_eq!(next(&mut j).await, value("x", 32));
        drop(client);

        server.shutdown().await;
        unavailable(&registry).await;
        let _server = serve_on(addr, Config::default()).await;
        let second = connected(&registry).await;
        assert_ne!(second.incarnation, first.incarnation);
        // Gone on the new server: reported as deleted, at its revision, not left at v30.
        assert_eq!(next(&mut k).await, absent(1));
        assert_eq!(next(&mut j).await, absent(1));
        registry.current().unwrap().put("k", "after-restart").await.unwrap();
        assert_eq!(next(&mut k).await, value("after-restart", 2));
    })
    .await
}

#[tokio::test]
async fn services_are_followed_and_instances_registered_again_across_a_restart() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let addr = server.local_addr();
        let registry = Reconnecting::start(addr.to_string());
        connected(&registry).await;
        let mut lists = registry.follow_service("billing").await.unwrap();
        assert_eq!(next(&mut lists).await, Vec::<Instance>::new());
        let b1 = Instance::new("billing", "b1", "10.0.0.1:80");
        registry.register(b1.clone(), Duration::from_secs(10)).await.unwrap();
        assert_eq!(next(&mut lists).await, vec![b1.clone()]);

        server.shutdown().await;
        unavailable(&registry).await;
        let _server = serve_on(addr, Config::default()).await;
        connected(&registry).await;
        // Registered again before the new connection is published.
        let admin = RegistryClient::connect(addr).await.unwrap();
        assert_eq!(admin.discover("billing").await.unwrap(), vec![b1.clone()]);
        // The list on the new connection (an empty one may come first, from the old server's last moments).
        while next(&mut lists).await != vec![b1.clone()] {}
        let b2 = Instance::new("billing", "b2", "10.0.0.2:80");
        admin.register(b2.clone(), Duration::from_secs(10)).await.unwrap().deregister().await.unwrap();
        assert_eq!(next(&mut lists).await, vec![b1.clone(), b2]);
        assert_eq!(next(&mut lists).await, vec![b1.clone()]);
        assert!(registry.deregister("billing", "b1").await.unwrap());
        assert_eq!(next(&mut lists).await, Vec::<Instance>::new());
        assert_eq!(admin.discover("billing").await.unwrap(), Vec::<Instance>::new());
    })
    .await
}

#[tokio::test]
async fn a_refusal_is_the_callers_at_once_and_retried_after_a_reconnect() {
    within(LIMIT, async {
        let limited = |max| {
            let mut config = Config::default();
            config.max_watches_per_connection = max;
            config
        };
        let server = start(limited(2)).await;
        let addr = server.local_addr();
        let registry = Reconnecting::start(addr.to_string());
        connected(&registry).await;
        let mut a = registry.follow_key("a").await.unwrap();
        let mut b = registry.follow_key("b").await.unwrap();
        let Err(error) = registry.follow_key("c").await else { panic!("over the limit: refused") };
        let remote = error.remote().expect("the registry's refusal");
        assert_eq!(remote.code, "too_many_watches", "{error:?}");
        assert_eq!((next(&mut a).await, next(&mut b).await), (absent(1), absent(1)));

        // Back with room for one watch: one key gets it, the other is retried.
        server.shutdown().await;
        unavailable(&registry).await;
        let server = serve_on(addr, limited(1)).await;
        let (winner, mut loser) = tokio::select! {
            Some(state) = a.next() => { assert_eq!(state, absent(1)); (a, b) }
            Some(state) = b.next() => { assert_eq!(state, absent(1)); (b, a) }
        };
        assert_eq!(server.stats().watches, 1);
        drop(winner);
        // Flows once the slot is free (its next attempt, within 2 s).
        assert_eq!(next(&mut loser).await, absent(1));
        assert_eq!(server.stats().watches, 1);
    })
    .await
}

#[tokio::test]
async fn the_connection_closes_with_the_last_handle_and_stream() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let registry = Reconnecting::start(server.local_addr().to_string());
        connected(&registry).await;
        let mut values = registry.follow_key("k").await.unwrap();
        assert_eq!(next(&mut values).await, absent(1));
        let copy = registry.clone();
        drop(registry);
        // The stream and the clone keep it going.
        copy.current().unwrap().put("k", "v").await.unwrap();
        assert_eq!(next(&mut values).await, value("v", 2));
        drop(copy);
        assert_eq!((server.stats().connections, server.stats().watches), (1, 1));
        drop(values);
        eventually(SETTLE, "the connection closed", || async { server.stats().connections == 0 }).await;
    })
    .await
}
