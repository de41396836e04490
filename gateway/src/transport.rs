//! A client connection's byte stream: plain TCP, or TLS over it (rustls). The worker reads,
//! writes and closes through this one seam and never asks which it is; a WebSocket transport
//! (issue 14) is a third case here, not a third copy of the worker's paths.
//!
//! Everything is non-blocking: a call does what the socket allows now and says what it did.
//! TLS state exists only for TLS connections (a box, so a plain connection's record stays
//! small). A [`Transport`] is a view over the two fields of the worker's connection record
//! (borrowed, not a struct of its own, which would pad the record by 8 bytes).

use std::io::{self, Read as _, Write as _};

use bytes::{Buf, BytesMut};
use mio::net::TcpStream;

/// What one [`Transport::read`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Got {
    /// `n` bytes of the client's stream (plaintext) were appended to the buffer; `full`: the
    /// socket gave as much as was asked (more may be waiting).
    Data { n: usize, full: bool },
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed (or the socket failed).
    Eof,
    /// The TLS layer refused the peer's bytes (its alert is written already).
    Failed,
}

/// What one [`Transport::write`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Wrote {
    /// Bytes of `out` taken (plaintext).
    pub taken: u64,
    /// The connection is broken.
    pub broken: bool,
}

/// TLS state of a connection that has it.
pub(crate) type Tls = Option<Box<rustls::ServerConnection>>;

/// A connection's socket and, over TLS, its TLS session.
pub(crate) struct Transport<'a> {
    pub stream: &'a mut TcpStream,
    pub tls: &'a mut Tls,
}

/// Whether a TLS handshake is still under way (never, for plain TCP).
pub(crate) fn is_handshaking(tls: &Tls) -> bool {
    tls.as_ref().is_some_and(|t| t.is_handshaking())
}

/// Whether the transport itself has bytes to send (TLS handshake records, alerts).
pub(crate) fn wants_write(tls: &Tls) -> bool {
    tls.as_ref().is_some_and(|t| t.wants_write())
}

impl Transport<'_> {
    /// Reads once from the socket, appending the plaintext to `buf` (through `scratch`).
    pub(crate) fn read(&mut self, scratch: &mut [u8], buf: &mut BytesMut) -> Got {
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return match self.stream.read(scratch) {
                    Ok(0) => Got::Eof,
                    Ok(n) => {
                        buf.extend_from_slice(&scratch[..n]);
                        Got::Data {
                            n,
                            full: n == scratch.len(),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Got::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => Got::Eof,
                };
            };
            return match tls.read_tls(&mut *self.stream) {
                Ok(0) => Got::Eof,
                Ok(_) => {
                    if let Err(err) = tls.process_new_packets() {
                        tracing::debug!("TLS error: {err}");
                        let _ = tls.write_tls(&mut *self.stream);
                        return Got::Failed;
                    }
                    let mut n = 0;
                    while let Ok(got @ 1..) = tls.reader().read(scratch) {
                        buf.extend_from_slice(&scratch[..got]);
                        n += got;
                    }
                    // rustls reads a bounded amount per call: assume more may wait.
                    Got::Data { n, full: true }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Got::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Got::Eof,
            };
        }
    }

    /// Writes as much of `out` as the socket takes now (and, over TLS, whatever the TLS layer
    /// has to send); the rest stays in `out` for the next writable event.
    pub(crate) fn write(&mut self, out: &mut BytesMut) -> Wrote {
        let mut w = Wrote::default();
        let Some(tls) = self.tls.as_mut() else {
            while !out.is_empty() {
                match self.stream.write(out) {
                    Ok(0) => {
                        w.broken = true;
                        break;
                    }
                    Ok(n) => {
                        out.advance(n);
                        w.taken += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        w.broken = true;
                        break;
                    }
                }
            }
            return w;
        };
        // rustls takes a bounded amount of plaintext at a time: alternate between handing it
        // plaintext and writing its records out, until everything is written or the socket
        // is full (then EPOLLOUT brings us back).
        loop {
            let before = out.len();
            while !out.is_empty() {
                match tls.writer().write(out) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        out.advance(n);
                        w.taken += n as u64;
                    }
                }
            }
            let blocked = match write_records(tls, self.stream) {
                Flushed::All => false,
                Flushed::Blocked => true,
                Flushed::Broken => {
                    w.broken = true;
                    return w;
                }
            };
            // No plaintext taken although rustls has nothing to write: stop rather than spin
            // (cannot happen with rustls's buffer rules).
            if blocked || out.is_empty() || out.len() == before {
                return w;
            }
        }
    }

    /// The last write before a close, bounded (never waits for a slow peer): `out` if given,
    /// TLS's close_notify (once the handshake is done), then a half-close and a read of what
    /// the peer already sent (so the close does not reset the connection, and lose the last
    /// frame, over unread input).
    pub(crate) fn close(&mut self, out: Option<&mut BytesMut>, scratch: &mut [u8]) {
        match self.tls.as_mut() {
            None => {
                if let Some(out) = out {
                    let _ = self.stream.write(out);
                }
            }
            // Mid-handshake there is no TLS session to speak in: the socket is just closed.
            Some(tls) if !tls.is_handshaking() => {
                if let Some(out) = out {
                    let _ = tls.writer().write(out);
                }
                tls.send_close_notify();
                let _ = tls.write_tls(&mut *self.stream);
            }
            Some(_) => {}
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self.stream.read(scratch);
    }
}

enum Flushed {
    All,
    Blocked,
    Broken,
}

/// Writes the TLS layer's pending records to the socket.
fn write_records(tls: &mut rustls::ServerConnection, stream: &mut TcpStream) -> Flushed {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(0) => return Flushed::Broken,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Flushed::Broken,
        }
    }
    Flushed::All
}
