//! A client's TCP stream that keeps the kernel's receive time of what it reads.
//!
//! A client process's own clock reading, taken when it has parsed a frame, counts the time the
//! process waited for a core on the machine it shares with the relay, Postgres and the writers.
//! The kernel stamps each incoming segment as it takes it in for the receiving socket
//! (`SO_TIMESTAMPNS`; on loopback, within the sender's `send`), before any process is scheduled,
//! so that stamp is when the delivery reached the client's socket. Reads go through `recvmsg` to
//! get it.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream whose reads record the kernel's receive time of the last segment they took.
#[derive(Debug)]
pub struct Stamped {
    inner: TcpStream,
    /// Microseconds since the epoch (the machine's real-time clock) at which the kernel took in
    /// the last segment of the latest read, if the kernel stamped it.
    last: Option<i64>,
}

impl Stamped {
    /// Asks the kernel to stamp the stream's incoming segments.
    pub fn new(inner: TcpStream) -> io::Result<Stamped> {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a c_int option value of the size given.
        let result = unsafe {
            libc::setsockopt(
                inner.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stamped { inner, last: None })
    }

    /// When the kernel received the last segment of the latest read, in microseconds since the
    /// epoch. For a frame parsed from that read, an upper bound of its arrival: a read that took
    /// several segments carries the time of the last one only.
    pub fn received_micros(&self) -> Option<i64> {
        self.last
    }
}

/// One `recvmsg` into `buf`: the bytes read and, when the kernel attached one, its receive time
/// in microseconds since the epoch.
fn receive(fd: libc::c_int, buf: &mut [u8]) -> io::Result<(usize, Option<i64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one SCM_TIMESTAMPNS message, aligned as cmsghdr needs.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is a plain C struct; zeroed is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at a live buffer and control area of the lengths it gives.
    let read = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the kernel filled msg's control area; the CMSG macros walk it within
    // msg_controllen, and the data of an SCM_TIMESTAMPNS message is one timespec.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let time: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                stamp = Some(time.tv_sec * 1_000_000 + time.tv_nsec / 1_000);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((read as usize, stamp))
}

impl AsyncRead for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || receive(fd, unfilled))
            {
                Ok((read, stamp)) => {
                    buf.advance(read);
                    // A read without a stamp leaves none: an earlier read's would time its
                    // frames too early.
                    if read > 0 {
                        this.last = stamp;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_read_carries_the_kernels_receive_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(address), listener.accept());
        let mut stamped = Stamped::new(client.unwrap()).unwrap();
        let (mut server, _) = server.unwrap();
        assert_eq!(stamped.received_micros(), None);

        // The kernel turns stamping on for the whole machine shortly after the first socket asks
        // for it (deferred work), and segments taken in before then carry no stamp: a read of
        // one leaves none. The first stamped read comes within a few tries.
        let mut buf = [0u8; 16];
        let mut tries = 0;
        let first = loop {
            let before = crate::system::now_micros();
            server.write_all(b"first").await.unwrap();
            let read = stamped.read(&mut buf).await.unwrap();
            let after = crate::system::now_micros();
            assert_eq!(&buf[..read], b"first");
            if let Some(first) = stamped.received_micros() {
                assert!(
                    (before..=after).contains(&first),
                    "{first} not within {before}..={after}"
                );
                break first;
            }
            tries += 1;
            assert!(tries < 1000, "no read carried a receive time");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        };

        // The next read's segment was sent later, so its stamp is not earlier.
        server.write_all(b"second").await.unwrap();
        let read = stamped.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..read], b"second");
        assert!(stamped.received_micros().unwrap() >= first);

        // Writes go through unchanged.
        stamped.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        server.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
