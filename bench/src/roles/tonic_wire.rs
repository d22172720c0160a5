//! The tonic peer's gRPC service, written as tonic's code generator would
//! write it (no `.proto`, no protoc): prost messages derived by hand, a tower
//! `Service` that routes by path to `tonic::server::Grpc` with
//! `tonic_prost::ProstCodec`, and a client on `tonic::client::Grpc`.
//!
//! ```text
//! package bench;
//! service Bench {
//!   rpc Echo(Payload) returns (Payload);               // the invoke phases
//!   rpc Subscribe(Keys) returns (stream Event);        // the fan-out phases
//! }
//! ```
//!
//! One `Subscribe` stream carries every key (the `key` field), as the floor's
//! fan-out connection does.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

const SERVICE: &str = "bench.Bench";
const ECHO_PATH: &str = "/bench.Bench/Echo";
const SUBSCRIBE_PATH: &str = "/bench.Bench/Subscribe";

/// Events a subscriber's stream may hold before the publisher waits for it
/// (16 bursts of the default 16 keys; the floor's queue holds 16 bursts).
const STREAM_QUEUE: usize = 256;

/// The echo request and answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(bytes = "bytes", tag = "1")]
    pub body: Bytes,
}

/// The `Subscribe` request: how many keys the subscriber wants (the server sends all it publishes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Keys {
    #[prost(uint32, tag = "1")]
    pub keys: u32,
}

/// One fan-out event: the floor's event fields, as a message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(uint32, tag = "1")]
    pub key: u32,
    #[prost(uint64, tag = "2")]
    pub idx: u64,
    #[prost(fixed64, tag = "3")]
    pub sent_ns: u64,
    #[prost(bytes = "bytes", tag = "4")]
    pub pad: Bytes,
}

/// The open `Subscribe` streams, which the server's publisher feeds.
pub type Subscribers = Arc<Mutex<Vec<mpsc::Sender<Result<Event, Status>>>>>;

/// The server side: what generated code's `BenchServer` is.
#[derive(Clone, Default)]
pub struct BenchService {
    pub subscribers: Subscribers,
}

impl tonic::server::NamedService for BenchService {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for BenchService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        match request.uri().path() {
            ECHO_PATH => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<Payload, Payload>::default());
                Ok(grpc.unary(Echo, request).await)
            }),
            SUBSCRIBE_PATH => {
                let subscribe = Subscribe(self.subscribers.clone());
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Event, Keys>::default());
                    Ok(grpc.server_streaming(subscribe, request).await)
                })
            }
            path => {
                let status = Status::unimplemented(format!("no method {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

struct Echo;

impl tonic::server::UnaryService<Payload> for Echo {
    type Response = Payload;
    type Future = std::future::Ready<Result<Response<Payload>, Status>>;

    fn call(&mut self, request: Request<Payload>) -> Self::Future {
        std::future::ready(Ok(Response::new(request.into_inner())))
    }
}

struct Subscribe(Subscribers);

impl tonic::server::ServerStreamingService<Keys> for Subscribe {
    type Response = Event;
    type ResponseStream = ReceiverStream<Result<Event, Status>>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _: Request<Keys>) -> Self::Future {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        std::future::ready(Ok(Response::new(ReceiverStream::new(rx))))
    }
}

/// The client side: what generated code's `BenchClient<Channel>` is. Clones
/// share the channel (one HTTP/2 connection).
#[derive(Clone)]
pub struct BenchClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl BenchClient {
    /// One HTTP/2 connection to the server's Unix socket, as tonic's `uds` example makes it.
    pub async fn connect(socket: PathBuf) -> Result<BenchClient> {
        // The URI is required and ignored: the connector dials the socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
            }))
            .await
            .context("connect to the tonic server")?;
        Ok(BenchClient { grpc: tonic::client::Grpc::new(channel) })
    }

    pub async fn echo(&mut self, body: Bytes) -> Result<Bytes, Status> {
        self.ready().await?;
        let codec = ProstCodec::<Payload, Payload>::default();
        let path = PathAndQuery::from_static(ECHO_PATH);
        let answer = self.grpc.unary(Request::new(Payload { body }), path, codec).await?;
        Ok(answer.into_inner().body)
    }

    pub async fn subscribe(&mut self, keys: u32) -> Result<tonic::Streaming<Event>, Status> {
        self.ready().await?;
        let codec = ProstCodec::<Keys, Event>::default();
        let path = PathAndQuery::from_static(SUBSCRIBE_PATH);
        let answer = self.grpc.server_streaming(Request::new(Keys { keys }), path, codec).await?;
        Ok(answer.into_inner())
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc.ready().await.map_err(|e| Status::unavailable(format!("tonic channel not ready: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::UnixListener;
    use tokio_stream::wrappers::UnixListenerStream;

    use super::*;

    /// The hand-written service and client speak gRPC to each other over a
    /// Unix socket: an echo comes back whole, a subscriber gets what the
    /// server pushes into its stream, and an unknown method is refused.
    #[tokio::test]
    async fn echo_and_subscribe_over_a_unix_socket() {
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("tonic.sock");
            let service = BenchService::default();
            let subscribers = service.subscribers.clone();
            let listener = UnixListener::bind(&socket).unwrap();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(UnixListenerStream::new(listener)),
            );
            let mut client = BenchClient::connect(socket).await.unwrap();

            let body = Bytes::from_static(b"sixty-four bytes or any other length");
            assert_eq!(client.echo(body.clone()).await.unwrap(), body);

            let mut stream = client.subscribe(16).await.unwrap();
            let sender = subscribers.lock().unwrap()[0].clone();
            let event = Event { key: 3, idx: 7, sent_ns: 42, pad: Bytes::from_static(b"pad") };
            sender.send(Ok(event.clone())).await.unwrap();
            assert_eq!(stream.message().await.unwrap(), Some(event));

            let mut grpc = client.grpc.clone();
            grpc.ready().await.unwrap();
            let path = PathAndQuery::from_static("/bench.Bench/Nothing");
            let refused = grpc
                .unary(Request::new(Payload { body }), path, ProstCodec::<Payload, Payload>::default())
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
            server.abort();
        })
        .await;
        outcome.expect("the tonic round trips took over 20 s");
    }
}
