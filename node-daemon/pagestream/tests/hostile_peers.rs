//! Hostile and broken peers against a real page server on loopback: every
//! malformed, oversized, unauthenticated or version-mismatched input is
//! refused with a reason that names the problem and counted, and the server
//! keeps serving a good client afterwards. Also: a client refuses a server
//! that does not know the token, and never takes corrupted pages from a
//! holder (it retries at the next holder and reads correct data).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vmstream_pagestream::auth::nonce;
use vmstream_pagestream::framing::{read_frame, write_frame};
use vmstream_pagestream::wire::{Command, HEADER_LEN, Header, Hello, ReasonCode, Role};
use vmstream_pagestream::{ClusterToken, PageServer, RemoteConfig, RemotePages, ServerOptions};
use vmstream_vmm::memory::{PAGE_SIZE, PageSource};

const IMAGE: &str = "default/hostile";
const PAGES: usize = 64;

struct Fixture {
    _dir: tempfile::TempDir,
    server: PageServer,
    bytes: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes(PAGES, 11);
    let store = write_store(&dir.path().join("img"), &bytes);
    let server = PageServer::bind("127.0.0.1:0", token(), ServerOptions::default()).unwrap();
    server.add_image(IMAGE, Arc::new(store));
    Fixture {
        _dir: dir,
        server,
        bytes,
    }
}

/// A good client reads page 1 correctly through a full handshake.
fn good_client_works(f: &Fixture) {
    let mut s = authenticate(f.server.local_addr(), IMAGE);
    let h = Header::new(Command::ReadPages)
        .with_request(9)
        .with_range(1, 1);
    write_frame(&mut s, &h, &[]).unwrap();
    let mut buf = Vec::new();
    let a = read_frame(&mut s, &mut buf).unwrap();
    assert_eq!(a.command, Command::Pages);
    assert_eq!(a.request_id, 9);
    assert_eq!(&buf[..], &f.bytes[PAGE_SIZE..2 * PAGE_SIZE]);
}

fn raw(f: &Fixture, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(f.server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    s
}

fn hello_frame() -> Vec<u8> {
    let h = Hello {
        min_version: 1,
        max_version: 1,
        role: Role::Fault,
        client_nonce: nonce(),
        image_id: IMAGE.into(),
    };
    Header::new(Command::Hello).encode_frame(&h.encode())
}

/// Sends `bytes` on a fresh connection, expects a refusal whose text
/// contains `needle` and the counter `kind` to go up; then checks a good
/// client still works.
fn refused(f: &Fixture, bytes: &[u8], half_close: bool, needle: &str, kind: &str) {
    let before = f.server.stats().refusals.get(kind).copied().unwrap_or(0);
    let mut s = raw(f, bytes);
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let (_, reason) = expect_refusal(&mut s);
    assert!(
        reason.text.contains(needle),
        "refusal {:?} does not name {needle:?}",
        reason.text
    );
    // The server closes the connection after a refusal of this kind.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let after = f.server.stats().refusals.get(kind).copied().unwrap_or(0);
    assert_eq!(after, before + 1, "refusal counter {kind}");
    good_client_works(f);
}

#[test]
fn malformed_frames_are_refused_and_named() {
    let f = fixture();
    good_client_works(&f);

    let mut bad_magic = hello_frame();
    bad_magic[..4].copy_from_slice(b"HTTP");
    refused(&f, &bad_magic, false, "bad magic", "bad_magic");

    let mut version = hello_frame();
    version[4] = 7;
    refused(
        &f,
        &version,
        false,
        "unsupported protocol version 7",
        "unsupported_version",
    );

    let mut unknown = hello_frame();
    unknown[6] = 77;
    refused(&f, &unknown, false, "unknown command 77", "unknown_command");

    let mut zero = hello_frame();
    zero[6] = 0;
    refused(&f, &zero, false, "reserved as invalid", "unknown_command");

    let mut oversized = hello_frame();
    oversized[32..36].copy_from_slice(&(64u32 << 20).to_le_bytes());
    refused(
        &f,
        &oversized,
        false,
        "payload_len is 67108864, over the limit 296",
        "oversized",
    );

    let mut crc = hello_frame();
    let last = crc.len() - 1;
    crc[last] ^= 0xff;
    refused(&f, &crc, false, "CRC mismatch", "crc_mismatch");

    refused(
        &f,
        &hello_frame()[..17],
        true,
        "truncated frame: need 40 bytes, have 17",
        "truncated",
    );

    let empty_batch = Header::new(Command::ReadPages)
        .with_range(0, 0)
        .encode_frame(&[]);
    refused(&f, &empty_batch, false, "page count 0", "malformed");
}

#[test]
fn handshake_violations_are_refused() {
    let f = fixture();
    // A request before any handshake.
    let early = Header::new(Command::ReadPages)
        .with_range(0, 1)
        .encode_frame(&[]);
    refused(
        &f,
        &early,
        false,
        "ReadPages frame before the handshake",
        "not_authenticated",
    );

    // No version in common.
    let h = Hello {
        min_version: 5,
        max_version: 9,
        role: Role::Bulk,
        client_nonce: nonce(),
        image_id: IMAGE.into(),
    };
    let frame = Header::new(Command::Hello).encode_frame(&h.encode());
    refused(
        &f,
        &frame,
        false,
        "no common protocol version",
        "version_mismatch",
    );

    // A wrong HMAC (a peer without the cluster token).
    let before = f
        .server
        .stats()
        .refusals
        .get("auth_failed")
        .copied()
        .unwrap_or(0);
    let mut s = TcpStream::connect(f.server.local_addr()).unwrap();
    let ch = hello(&mut s, IMAGE);
    let wrong = ClusterToken::new(b"not-the-cluster-token!!".to_vec()).unwrap();
    let tag = wrong.client_tag(&ch.server_nonce, IMAGE);
    write_frame(&mut s, &Header::new(Command::Auth), &[&tag]).unwrap();
    let (c, reason) = expect_refusal(&mut s);
    assert_eq!((c, reason.code), (Command::Reject, ReasonCode::AuthFailed));
    assert!(
        reason.text.contains("authentication failed"),
        "{}",
        reason.text
    );
    assert_eq!(f.server.stats().refusals["auth_failed"], before + 1);

    // A replayed tag for another nonce does not verify either.
    let mut s2 = TcpStream::connect(f.server.local_addr()).unwrap();
    let _ = hello(&mut s2, IMAGE);
    let old = token().client_tag(&ch.server_nonce, IMAGE);
    write_frame(&mut s2, &Header::new(Command::Auth), &[&old]).unwrap();
    assert_eq!(expect_refusal(&mut s2).1.code, ReasonCode::AuthFailed);

    // An image this server does not have (refused after authentication).
    let mut s = TcpStream::connect(f.server.local_addr()).unwrap();
    let ch = hello(&mut s, "other/image");
    let tag = token().client_tag(&ch.server_nonce, "other/image");
    write_frame(&mut s, &Header::new(Command::Auth), &[&tag]).unwrap();
    let (_, reason) = expect_refusal(&mut s);
    assert_eq!(reason.code, ReasonCode::UnknownImage);
    good_client_works(&f);
}

#[test]
fn bad_requests_after_the_handshake_get_errors_and_the_session_goes_on() {
    let f = fixture();
    let mut s = authenticate(f.server.local_addr(), IMAGE);
    let beyond = Header::new(Command::ReadPages)
        .with_request(5)
        .with_range(PAGES as u64 - 2, 4);
    write_frame(&mut s, &beyond, &[]).unwrap();
    let (c, reason) = expect_refusal(&mut s);
    assert_eq!((c, reason.code), (Command::Error, ReasonCode::OutOfRange));
    assert!(reason.text.contains("62..66 lie beyond"), "{}", reason.text);
    // Same connection, a good request.
    let ok = Header::new(Command::ReadPages)
        .with_request(6)
        .with_range(0, 6);
    write_frame(&mut s, &ok, &[]).unwrap();
    let mut buf = Vec::new();
    let h = read_frame(&mut s, &mut buf).unwrap();
    assert_eq!((h.command, h.request_id), (Command::Pages, 6));
    // Pages 0 and 4 are zero: only the other four are sent, in order.
    let expected: Vec<u8> = [1, 2, 3, 5]
        .iter()
        .flat_map(|&p| f.bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].to_vec())
        .collect();
    assert_eq!(buf, expected);
    // A server-to-client command sent to the server ends the session.
    let accept = Header::new(Command::Accept).encode_frame(&[0; 16]);
    s.write_all(&accept).unwrap();
    let (_, reason) = expect_refusal(&mut s);
    assert_eq!(reason.code, ReasonCode::Unexpected);
    assert_eq!(f.server.stats().refusals["out_of_range"], 1);
    good_client_works(&f);
}

fn quick_config(holders: Vec<SocketAddr>, token: ClusterToken) -> RemoteConfig {
    let mut c = RemoteConfig::new(IMAGE, holders, token);
    c.retry_budget = Duration::from_secs(2);
    c.backoff_initial = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(50);
    c
}

#[test]
fn a_client_refuses_a_server_without_the_token() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let wrong = ClusterToken::new(b"another-cluster-entirely".to_vec()).unwrap();
    let err = RemotePages::open(quick_config(vec![f.server.local_addr()], wrong), dir.path())
        .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        chain.contains("could not prove it knows the cluster token"),
        "{chain}"
    );
}

/// A proxy that forwards to `target` but flips one byte of the server's
/// stream at `offset` on every connection.
fn corrupting_proxy(target: SocketAddr, offset: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut client) = c else { return };
            let mut server = TcpStream::connect(target).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut seen = 0usize;
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if (seen..seen + n).contains(&offset) {
                        buf[offset - seen] ^= 0x01;
                    }
                    seen += n;
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn corrupted_pages_are_never_taken_and_the_next_holder_serves() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // Open the cache from the good server (the index), then stream from a
    // corrupting holder listed first and the good one second.
    let good = f.server.local_addr();
    drop(RemotePages::open(quick_config(vec![good], token()), dir.path()).unwrap());
    // Challenge (108) + Accept (56) bytes, then the first Pages frame:
    // flip a byte inside its payload.
    let evil = corrupting_proxy(good, 108 + 56 + HEADER_LEN + 100);
    let remote = RemotePages::open(quick_config(vec![evil, good], token()), dir.path()).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..PAGES {
        remote.read_pages(p, 1, &mut buf).unwrap();
        assert_eq!(buf, f.bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p}");
    }
    let stats = remote.stats();
    assert!(
        stats.fault_failures >= 1,
        "the corruption was not noticed: {stats:?}"
    );
}

#[test]
fn state_requests_are_answered_refused_or_closed_as_they_deserve() {
    use vmstream_pagestream::direct::{Connection, fetch_state_file};
    use vmstream_pagestream::wire::MAX_STATE_LEN;
    use vmstream_pagestream::{ImageDir, ServedImage};

    let f = fixture();
    // The fixture's bare page store has no state file: an Error naming
    // it, and the session goes on.
    let mut s = authenticate(f.server.local_addr(), IMAGE);
    let ask = Header::new(Command::StateRequest).with_request(3);
    write_frame(&mut s, &ask, &[]).unwrap();
    let (c, reason) = expect_refusal(&mut s);
    assert_eq!((c, reason.code), (Command::Error, ReasonCode::NotHeld));
    assert!(reason.text.contains("state file"), "{}", reason.text);
    let ok = Header::new(Command::ReadPages)
        .with_request(4)
        .with_range(1, 1);
    write_frame(&mut s, &ok, &[]).unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        read_frame(&mut s, &mut buf).unwrap().command,
        Command::Pages
    );

    // A StateRequest carrying a page range is malformed: refused, closed.
    let mut ranged = Header::new(Command::StateRequest)
        .with_request(5)
        .encode_frame(&[]);
    ranged[28] = 1; // page_count
    let crc = crc32fast::hash(&ranged[..36]);
    ranged[36..40].copy_from_slice(&crc.to_le_bytes());
    s.write_all(&ranged).unwrap();
    let (c, reason) = expect_refusal(&mut s);
    assert_eq!(c, Command::Error);
    assert!(reason.text.contains("page range"), "{}", reason.text);
    // A State frame over the limit is refused from its header alone.
    let mut huge = Header::new(Command::State).encode_frame(&[]);
    huge[32..36].copy_from_slice(&(MAX_STATE_LEN + 1).to_le_bytes());
    assert!(vmstream_pagestream::wire::Header::decode(&huge).is_err());
    good_client_works(&f);

    // An image directory with a state file: the bytes arrive whole, from
    // the first holder that has them (a dead one is skipped).
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), &image_bytes(PAGES, 12));
    let state: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join(vmstream_vmm::image::STATE_FILE), &state).unwrap();
    let image = ImageDir::open(dir.path()).unwrap();
    assert_eq!(image.state_file().unwrap().unwrap(), state);
    f.server.add_image("default/with-state", Arc::new(image));
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = quick_config(vec![dead, f.server.local_addr()], token());
    config.image_id = "default/with-state".into();
    assert_eq!(fetch_state_file(&config).unwrap(), state);
    let mut conn = Connection::open(f.server.local_addr(), Role::Fault, &config).unwrap();
    assert_eq!(conn.state_file().unwrap(), state);
    assert!(f.server.stats().state_requests >= 2);
    // A client with the wrong token gets nothing.
    let mut wrong = config.clone();
    wrong.token = ClusterToken::new(b"another-cluster-token".to_vec()).unwrap();
    assert!(fetch_state_file(&wrong).is_err());
}
