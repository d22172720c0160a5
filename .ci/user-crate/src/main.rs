//! A user's crate serving one port from two workers with axum, the master
//! handing each accepted connection to the next worker (round robin), with
//! nothing but `tandem` (feature `axum`), `axum` and `tokio`.
//!
//! It asks the port for `/` four times, checks both workers answered, stops
//! the cluster and exits 0 (1 with the reason otherwise):
//!
//! ```sh
//! cargo run --manifest-path .ci/user-crate/Cargo.toml
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use tandem::cluster::{AgentReady, BoxError, Cluster, ClusterEvent, ListenAddr, Listener, ShareMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> Result<(), BoxError> {
    tandem::logging::init_with_default("warn");
    let addr = ListenAddr::parse("127.0.0.1:0")?;
    Cluster::builder("tandem-user-crate")
        .workers(2)
        .listen_with("http", addr, ShareMode::RoundRobin)
        .agent(|ctx| async move {
            // No Leader in this one: the point is the port.
            ctx.ready(AgentReady { socket: ctx.default_socket_path() }).await?;
            ctx.stopped().await;
            Ok(())
        })
        .worker(|ctx| async move {
            let Listener::RoundRobin(listener) = ctx.listener("http")? else {
                return Err("expected a round-robin listener".into());
            };
            let pid = ctx.pid();
            let app = axum::Router::new().route("/", axum::routing::get(move || async move { format!("pid={pid}") }));
            // `RoundRobinListener: axum::serve::Listener`, from tandem's `axum` feature.
            let server = tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(ctx.shutdown_signal()).into_future());
            ctx.ready().await?;
            server.await??;
            Ok(())
        })
        .master(|ctx| async move {
            let mut events = ctx.events();
            while let Some(event) = events.recv().await {
                if matches!(event, ClusterEvent::ClusterReady { .. }) {
                    break;
                }
            }
            let address = ctx.listeners()[0].address.clone();
            let mut answers = BTreeSet::new();
            for _ in 0..4 {
                answers.insert(get(&address).await?);
            }
            println!("{address}: {answers:?}");
            ctx.shutdown();
            if answers.len() != 2 {
                return Err(format!("expected answers from both workers, got {answers:?}").into());
            }
            Ok(())
        })
        .run_blocking()?;
    Ok(())
}

/// `GET /` on a fresh connection (so the master hands each to the next worker); the body.
async fn get(address: &str) -> Result<String, BoxError> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Ok::<_, BoxError>(body)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await?
}
