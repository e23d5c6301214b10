//! Handover messages over a Unix stream socket, the first with descriptors
//! attached (`SCM_RIGHTS`). Reads take exactly one message, so descriptors
//! and the messages after them are never mixed up.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use edge_proto::handover::{self, HandoverMessage};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use rustix::net::{ReturnFlags, SendFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;

use super::UpgradeError;

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 16;

/// Sends `message`, with `fds` attached to its first byte.
pub async fn send(stream: &UnixStream, message: &HandoverMessage, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("{} descriptors exceed the {MAX_FDS} a message carries", fds.len())));
    }
    let bytes = handover::encode_message(message);
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let rest = &bytes[sent..];
        let attach = sent == 0 && !fds.is_empty();
        let result = stream.try_io(Interest::WRITABLE, || {
            if attach {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("descriptors do not fit the control buffer"));
                }
                Ok(rustix::net::sendmsg(stream, &[IoSlice::new(rest)], &mut control, SendFlags::NOSIGNAL)?)
            } else {
                Ok(rustix::net::send(stream, rest, SendFlags::NOSIGNAL)?)
            }
        });
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, collecting any descriptors that come
/// with them.
async fn read_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), UpgradeError> {
    let mut got = 0;
    while got < buf.len() {
        stream.readable().await?;
        let target = &mut buf[got..];
        let result = stream.try_io(Interest::READABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let message =
                rustix::net::recvmsg(stream, &mut [IoSliceMut::new(target)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
            for ancillary in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = ancillary {
                    fds.extend(received);
                }
            }
            Ok((message.bytes, message.flags))
        });
        match result {
            Ok((0, _)) => {
                return Err(UpgradeError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the other process hung up")))
            }
            Ok((_, flags)) if flags.contains(ReturnFlags::CTRUNC) => {
                return Err(UpgradeError::Protocol(format!("more than {MAX_FDS} descriptors sent")));
            }
            Ok((n, _)) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one message and the descriptors sent with it.
pub async fn recv(stream: &UnixStream) -> Result<(HandoverMessage, Vec<OwnedFd>), UpgradeError> {
    let mut fds = Vec::new();
    let mut prefix = [0u8; 4];
    read_exact(stream, &mut prefix, &mut fds).await?;
    let len = handover::message_len(prefix)?;
    let mut body = vec![0u8; len];
    read_exact(stream, &mut body, &mut fds).await?;
    Ok((handover::decode_message(&body)?, fds))
}

/// Receives one message that must come without descriptors.
pub async fn recv_plain(stream: &UnixStream) -> Result<HandoverMessage, UpgradeError> {
    let (message, fds) = recv(stream).await?;
    if !fds.is_empty() {
        return Err(UpgradeError::Protocol("unexpected descriptors".into()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[tokio::test]
    async fn messages_carry_descriptors_that_work_on_the_other_side() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = HandoverMessage::Offer {
            version: handover::HANDOVER_VERSION,
            epoch: 1,
            predecessor_pid: 1,
            sockets: vec![handover::OfferedSocket { role: handover::SocketRole::Tls, addr: Some(addr) }],
        };
        send(&a, &offer, &[listener.as_fd()]).await.unwrap();
        send(&a, &HandoverMessage::Ready { pid: 9 }, &[]).await.unwrap();
        let (got, fds) = recv(&b).await.unwrap();
        assert_eq!(got, offer);
        assert_eq!(fds.len(), 1);
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        // The descriptor is the same socket: a connection to it is accepted
        // through the received copy.
        drop(listener);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        assert!(received.accept().is_ok());
        assert_eq!(recv_plain(&b).await.unwrap(), HandoverMessage::Ready { pid: 9 });
        drop(a);
        assert!(recv(&b).await.is_err(), "a hang-up is an error, not a message");
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_reading_it() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(recv(&b).await, Err(UpgradeError::Format(_))));
    }
}
