//! The per-connection handshake of a migration session, authenticated with
//! the cluster token (HMAC-SHA256 from `vmstream_pagestream::auth`, bound to
//! the session id): the target proves it knows the token over the source's
//! nonce, the source over the target's. Both connections of a session (and
//! every reconnection) go through it.
//!
//! ```text
//! source                               target
//!   Hello{session, role, shape, nonce_s} ─►
//!                  ◄─ Challenge{nonce_t, proof(nonce_s)}   (or Abort)
//!   Auth{tag(nonce_t)} ─►
//!                  ◄─ Accept{flags, resolved pages}        (or Abort)
//! ```

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use vmstream_pagestream::ClusterToken;
use vmstream_pagestream::auth::nonce;
use vmstream_vmm::image::PageStore;

use crate::wire::{Command, Header, Hello, ReadFrameError, read_frame, write_frame};

/// Why a session step failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {what} failed")]
    Read {
        what: &'static str,
        #[source]
        source: ReadFrameError,
    },
    #[error("expected {expected}, got a {got:?} frame")]
    Unexpected {
        expected: &'static str,
        got: Command,
    },
    #[error("the peer aborted: {0}")]
    Aborted(String),
    #[error("the peer failed authentication ({0})")]
    Auth(&'static str),
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

impl SessionError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }

    pub(crate) fn read(what: &'static str) -> impl FnOnce(ReadFrameError) -> Self {
        move |source| Self::Read { what, source }
    }
}

fn label(session: u64) -> String {
    format!("vmstream-migration:{session:016x}")
}

/// Reads one frame, turning Abort into an error.
pub(crate) fn expect(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    command: Command,
    what: &'static str,
) -> Result<Header, SessionError> {
    let header = read_frame(stream, buf).map_err(SessionError::read(what))?;
    if header.command == Command::Abort {
        return Err(SessionError::Aborted(
            String::from_utf8_lossy(buf).into_owned(),
        ));
    }
    if header.command != command {
        return Err(SessionError::Unexpected {
            expected: what,
            got: header.command,
        });
    }
    Ok(header)
}

/// Source side: handshake on a fresh connection. Returns the Accept header
/// and payload.
pub fn client_handshake(
    stream: &mut TcpStream,
    token: &ClusterToken,
    session: u64,
    flags: u32,
    mut hello: Hello,
    timeout: Duration,
) -> Result<(Header, Vec<u8>), SessionError> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(SessionError::io("setting a read timeout"))?;
    let _ = stream.set_nodelay(true);
    hello.nonce = nonce();
    let h = Header::new(Command::Hello)
        .with_flags(flags)
        .with_request(session);
    write_frame(stream, &h, &[&hello.encode()]).map_err(SessionError::io("sending Hello"))?;
    let mut buf = Vec::new();
    expect(stream, &mut buf, Command::Challenge, "Challenge")?;
    if buf.len() != 64 {
        return Err(SessionError::Protocol(format!(
            "Challenge payload is {} bytes, not 64",
            buf.len()
        )));
    }
    let target_nonce: [u8; 32] = buf[..32].try_into().expect("32 bytes");
    if !token.verify_server_proof(&hello.nonce, &label(session), &buf[32..]) {
        return Err(SessionError::Auth(
            "the target's proof does not match the cluster token",
        ));
    }
    let tag = token.client_tag(&target_nonce, &label(session));
    write_frame(stream, &Header::new(Command::Auth), &[&tag])
        .map_err(SessionError::io("sending Auth"))?;
    let accept = expect(stream, &mut buf, Command::Accept, "Accept")?;
    Ok((accept, buf))
}

/// Target side: reads the Hello of a fresh connection.
pub fn read_hello(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<(Header, Hello), SessionError> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(SessionError::io("setting a read timeout"))?;
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let header = expect(stream, &mut buf, Command::Hello, "Hello")?;
    let hello = Hello::decode(&buf)
        .ok_or_else(|| SessionError::Protocol(format!("Hello payload of {} bytes", buf.len())))?;
    Ok((header, hello))
}

/// Target side: challenge and check the source's tag. The caller then
/// sends Accept or Abort.
pub fn server_authenticate(
    stream: &mut TcpStream,
    token: &ClusterToken,
    session: u64,
    hello: &Hello,
) -> Result<(), SessionError> {
    let target_nonce = nonce();
    let proof = token.server_proof(&hello.nonce, &label(session));
    write_frame(
        stream,
        &Header::new(Command::Challenge),
        &[&target_nonce, &proof],
    )
    .map_err(SessionError::io("sending Challenge"))?;
    let mut buf = Vec::new();
    expect(stream, &mut buf, Command::Auth, "Auth")?;
    if !token.verify_client_tag(&target_nonce, &label(session), &buf) {
        let _ = abort(stream, "authentication failed");
        return Err(SessionError::Auth(
            "the source's tag does not match the cluster token",
        ));
    }
    Ok(())
}

/// Sends Abort with a reason (best effort).
pub fn abort(stream: &mut TcpStream, reason: &str) -> io::Result<()> {
    let reason = &reason.as_bytes()[..reason.len().min(1000)];
    write_frame(stream, &Header::new(Command::Abort), &[reason])
}

/// A fingerprint of a live image both sides must hold: its size and its
/// non-zero page bitmap.
pub fn image_fingerprint(image: Option<&PageStore>) -> u64 {
    let Some(image) = image else { return 0 };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&image.memory_size().to_le_bytes());
    for w in image.present().to_words() {
        crc.update(&w.to_le_bytes());
    }
    (u64::from(crc.finalize()) << 32) | (image.nonzero_pages() as u64 & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn token(b: u8) -> ClusterToken {
        ClusterToken::new(vec![b; 32]).unwrap()
    }

    type Outcome = (
        Result<(), SessionError>,
        Result<(Header, Vec<u8>), SessionError>,
    );

    fn run(server_token: ClusterToken, client_token: ClusterToken) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let (h, hello) = read_hello(&mut s, Duration::from_secs(5)).unwrap();
            let r = server_authenticate(&mut s, &server_token, h.request_id, &hello);
            if r.is_ok() {
                write_frame(&mut s, &Header::new(Command::Accept).with_flags(4), &[]).unwrap();
            }
            r
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let hello = Hello {
            memory_bytes: 1 << 24,
            vcpus: 1,
            mode: 1,
            image_fingerprint: 0,
            nonce: [0; 32],
        };
        let client = client_handshake(&mut c, &client_token, 42, 0, hello, Duration::from_secs(5));
        (server.join().unwrap(), client)
    }

    #[test]
    fn same_token_is_accepted() {
        let (server, client) = run(token(1), token(1));
        server.unwrap();
        assert_eq!(client.unwrap().0.flags, 4);
    }

    #[test]
    fn different_tokens_are_refused_on_both_sides() {
        let (server, client) = run(token(1), token(2));
        // The client refuses the target's proof first, so the server never
        // gets a valid tag.
        assert!(matches!(client, Err(SessionError::Auth(_))));
        assert!(server.is_err());
    }
}
