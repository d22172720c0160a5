//! Passing file descriptors between the master and a child (SCM_RIGHTS).
//!
//! This is the only module that sends or receives descriptors. It uses its
//! own `SOCK_SEQPACKET` socketpair per child, separate from the framed IPC
//! stream: on a byte stream, a descriptor rides on whichever `recvmsg` happens
//! to read its first byte, and a framed reader that buffers ahead loses it. A
//! seqpacket socket keeps every message (bytes + descriptors) one unit, read
//! whole by one `recvmsg`.
//!
//! Each message carries a short text header (at most [`MAX_HEADER`] bytes) and
//! zero or one descriptor. Descriptors arrive close-on-exec
//! (`MSG_CMSG_CLOEXEC`), owned (`OwnedFd`), so none leaks into a child of the
//! receiver and none stays open when a message is dropped.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The largest header a message may carry; a longer one is an error to the sender.
pub(crate) const MAX_HEADER: usize = 512;

/// A new close-on-exec seqpacket socketpair: (master end, child end).
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
        .map_err(io::Error::from)
}

/// One end of a descriptor channel.
#[derive(Debug)]
pub(crate) struct FdChannel {
    fd: AsyncFd<OwnedFd>,
}

/// A received message: its header and the descriptor it carried, if any.
#[derive(Debug)]
pub(crate) struct Received {
    pub header: String,
    pub fd: Option<OwnedFd>,
    /// The message carried descriptors this process did not receive: the
    /// kernel set `MSG_CTRUNC`, because this process is out of descriptors
    /// (`EMFILE`: the kernel closes what it could not install) or the message
    /// carried more than fit. The header is intact; `fd` is `None`.
    pub fd_lost: bool,
}

impl FdChannel {
    /// Wraps one end of [`pair`] (it must be non-blocking; `pair` makes it so).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
            .map_err(io::Error::from)?;
        // SAFETY: `fd` is an `OwnedFd` moved into the `AsyncFd`: it is valid and
        // open, nothing else can close it, and `as_raw_fd` keeps returning the
        // same descriptor until the `AsyncFd` drops it.
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) };
        Ok(FdChannel { fd: registered.map_err(io::Error::from)? })
    }

    /// Sends `header` with `fd` (if any). The receiver gets its own descriptor
    /// for the same open file; the caller keeps (and later closes) its own.
    pub(crate) async fn send(&self, header: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if header.len() > MAX_HEADER || header.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an fd-channel header must be 1 to {MAX_HEADER} bytes, not {}", header.len()),
            ));
        }
        let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|inner| {
                let iov = [IoSlice::new(header.as_bytes())];
                let cmsgs: Vec<ControlMessage<'_>> =
                    if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
                sendmsg::<()>(inner.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
            });
            match result {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message. `Ok(None)` when the other end closed the channel.
    /// A message with more than one descriptor, or a truncated one, is an
    /// error (its descriptors are closed).
    pub(crate) async fn recv(&self) -> io::Result<Option<Received>> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_one(inner.as_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_one(fd: BorrowedFd<'_>) -> io::Result<Option<Received>> {
    let mut buf = [0u8; MAX_HEADER + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    // Descriptors that did not fit: out of descriptors (the kernel closed the
    // ones it could not install) or more than `cmsg` holds. nix will not
    // iterate a truncated control buffer, so a descriptor the kernel did
    // install in the second case stays open: only a broken sender sends more
    // than one, and the master never does.
    let fd_lost = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let len = msg.bytes;
    let mut fds = Vec::new();
    if !fd_lost {
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: the kernel just installed `r` in this process's fd
                    // table for this message (SCM_RIGHTS); nothing else refers to
                    // it, so wrapping it in an `OwnedFd` makes it closed exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                }
            }
        }
    }
    if len == 0 && fds.is_empty() && !fd_lost {
        return Ok(None); // seqpacket EOF
    }
    if truncated || fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a malformed fd-channel message ({len} bytes, {} descriptors, truncated: {truncated})", fds.len()),
        ));
    }
    let header = std::str::from_utf8(&buf[..len])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "an fd-channel header is not UTF-8"))?
        .to_owned();
    Ok(Some(Received { header, fd: fds.pop(), fd_lost }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_descriptor_and_its_header_arrive_together() {
        let (a, b) = pair().unwrap();
        let (a, b) = (FdChannel::new(a).unwrap(), FdChannel::new(b).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        a.send("L tcp http", Some(listener.as_fd())).await.unwrap();
        a.send("no fd", None).await.unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.header, "L tcp http");
        let passed = std::net::TcpListener::from(got.fd.expect("an fd"));
        assert_eq!(passed.local_addr().unwrap(), addr, "the same socket");
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.header, "no fd");
        assert!(got.fd.is_none());
        drop(a);
        assert!(b.recv().await.unwrap().is_none(), "EOF once the other end is closed");
    }

    #[tokio::test]
    async fn malformed_messages_are_errors_and_the_channel_goes_on() {
        let (a, b) = pair().unwrap();
        let b = FdChannel::new(b).unwrap();
        let one = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let two = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = [one.as_raw_fd(), two.as_raw_fd()];
        // Two descriptors in one message.
        let iov = [IoSlice::new(b"L tcp x")];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None).unwrap();
        assert_eq!(b.recv().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A header that is not UTF-8.
        let iov = [IoSlice::new(&[0xff, 0xfe])];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        assert_eq!(b.recv().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A header longer than MAX_HEADER (truncated on receipt).
        let long = vec![b'x'; MAX_HEADER + 10];
        let iov = [IoSlice::new(&long)];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        assert_eq!(b.recv().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // The channel still works afterwards.
        let iov = [IoSlice::new(b"ok")];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        assert_eq!(b.recv().await.unwrap().unwrap().header, "ok");
    }

    /// What a receiver out of descriptors sees (`MSG_CTRUNC`), driven here by
    /// more descriptors than the receive buffer holds: the header arrives, the
    /// descriptor is reported lost, and the channel goes on.
    #[tokio::test]
    async fn a_descriptor_that_could_not_be_received_is_reported_with_its_header() {
        let (a, b) = pair().unwrap();
        let b = FdChannel::new(b).unwrap();
        let listeners: Vec<_> = (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let raw: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        let iov = [IoSlice::new(b"C 7 http")];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None).unwrap();
        let got = b.recv().await.expect("not an error").expect("not EOF");
        assert_eq!(got.header, "C 7 http");
        assert!(got.fd.is_none());
        assert!(got.fd_lost);
        let iov = [IoSlice::new(b"ok")];
        sendmsg::<()>(a.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!((got.header.as_str(), got.fd_lost), ("ok", false));
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_to_the_sender() {
        let (a, _b) = pair().unwrap();
        let a = FdChannel::new(a).unwrap();
        let err = a.send(&"x".repeat(MAX_HEADER + 1), None).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
