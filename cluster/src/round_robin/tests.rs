//! The round-robin dispatcher's unit tests, against fake workers on real
//! descriptor channels.

use std::time::Duration;

use super::*;
use crate::fdpass;
use crate::identity::SlotId;

const WAIT: Duration = Duration::from_secs(5);

fn key(id: u32) -> ProcKey {
    ProcKey { slot: SlotId::Worker(id), generation: u64::from(id) }
}

/// A fake worker: the other end of a descriptor channel.
async fn worker(rr: &RoundRobin, id: u32) -> FdChannel {
    let (master, worker) = fdpass::pair().unwrap();
    rr.register(key(id), Arc::new(FdChannel::new(master).unwrap())).await;
    rr.notify(Cmd::Ready(key(id)));
    FdChannel::new(worker).unwrap()
}

/// The next handed connection: (id, the local port of the client it came from).
async fn handed(w: &FdChannel) -> (u64, u16) {
    let m = tokio::time::timeout(WAIT, w.recv()).await.expect("a connection in time").unwrap().unwrap();
    let mut parts = m.header.split(' ');
    assert_eq!(parts.next(), Some("C"));
    let id = parts.next().unwrap().parse().unwrap();
    assert_eq!(parts.next(), Some("http"));
    let stream = std::net::TcpStream::from(m.fd.unwrap());
    (id, stream.peer_addr().unwrap().port())
}

#[tokio::test]
async fn connections_alternate_and_come_back_from_a_stopping_or_dead_worker() {
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let rr = RoundRobin::start(vec![("http".into(), OwnedFd::from(listener))], &tasks, cancel.clone()).unwrap();
    let a = worker(&rr, 1).await;
    let b = worker(&rr, 2).await;

    let c1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (id1, port1) = handed(&a).await;
    assert_eq!(port1, c1.local_addr().unwrap().port());
    let c2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_, port2) = handed(&b).await;
    assert_eq!(port2, c2.local_addr().unwrap().port(), "the next worker gets the next connection");

    // A hands its connection back (it is stopping): B gets the same client.
    a.send(&format!("B {id1}"), None).await.unwrap();
    let (_, port) = handed(&b).await;
    assert_eq!(port, port1);

    // A is not ready any more: new connections all go to B; B dies without
    // acknowledging one, which then goes to a new worker C.
    let c3 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_, port3) = handed(&b).await;
    assert_eq!(port3, c3.local_addr().unwrap().port());
    let c = worker(&rr, 3).await;
    rr.notify(Cmd::Retire(key(1)));
    rr.notify(Cmd::Remove(key(2)));
    let mut ports = vec![handed(&c).await.1, handed(&c).await.1, handed(&c).await.1];
    ports.sort_unstable();
    let mut expected = vec![port1, port2, port3];
    expected.sort_unstable();
    assert_eq!(ports, expected, "every connection B had not acknowledged goes to C");
    cancel.cancel();
    tasks.close();
    drop((c1, c2, c3));
}

#[tokio::test]
async fn a_connection_a_worker_could_not_receive_is_closed_counted_and_frees_its_slot() {
    use tokio::io::AsyncReadExt;
    tandem_testkit::within(Duration::from_secs(30), async {
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let rr = RoundRobin::start(vec![("http".into(), OwnedFd::from(listener))], &tasks, cancel.clone()).unwrap();
        let a = worker(&rr, 1).await;

        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (id, _) = handed(&a).await; // the worker's copy is closed: as if never received
        a.send(&format!("L {id}"), None).await.unwrap();
        let mut buf = [0u8; 1];
        let read =
            tokio::time::timeout(WAIT, client.read(&mut buf)).await.expect("the client sees a close, not a hang");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(rr.stats().lost.load(Ordering::Relaxed), 1);

        // The lost connection no longer counts as unacknowledged: the worker
        // still gets MAX_UNACKED new ones.
        let mut clients = Vec::new();
        for _ in 0..MAX_UNACKED {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            handed(&a).await;
        }
        cancel.cancel();
        tasks.close();
    })
    .await;
}

#[tokio::test]
async fn a_worker_that_cannot_receive_a_descriptor_says_so_and_goes_on() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    tandem_testkit::within(Duration::from_secs(30), async {
        let (master, worker_end) = fdpass::pair().unwrap();
        let master_raw = master.try_clone().unwrap();
        let master = FdChannel::new(master).unwrap();
        let mut side = WorkerSide::new(Arc::new(FdChannel::new(worker_end).unwrap()));
        side.declare("http", None);
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let mut listener = side.take("http", stop.clone()).unwrap();
        side.spawn_reader(stop.clone(), &tasks);

        // More descriptors than the receiver takes: the kernel truncates the
        // control data (`MSG_CTRUNC`), as for a worker out of descriptors.
        let sockets: Vec<_> = (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let raw: Vec<_> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
        let iov = [IoSlice::new(b"C 7 http")];
        sendmsg::<()>(master_raw.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None)
            .unwrap();
        let answer = tokio::time::timeout(WAIT, master.recv()).await.expect("an answer").unwrap().unwrap();
        assert_eq!(answer.header, "L 7");
        assert!(listener.queue.items.lock().unwrap().is_empty(), "nothing queued for accept");

        // The channel goes on: the next connection is taken and acknowledged.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (conn, _) = server.accept().unwrap();
        master.send("C 8 http", Some(conn.as_fd())).await.unwrap();
        let (stream, peer) = tokio::time::timeout(WAIT, listener.accept()).await.expect("accepted").unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let ack = tokio::time::timeout(WAIT, master.recv()).await.expect("an ack").unwrap().unwrap();
        assert_eq!(ack.header, "A 8");
        drop(stream);
        stop.cancel();
        tasks.close();
    })
    .await;
}
