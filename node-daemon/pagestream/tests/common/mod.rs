//! Shared pieces of the page-streaming integration tests: image contents,
//! writing a real page store, the cluster token, raw protocol peers, and a
//! page-server child process (optionally inside a network namespace) that
//! is killed when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use rand::{Rng, SeedableRng, rngs::StdRng};
use vmstream_pagestream::ServerStats;
use vmstream_pagestream::auth::{ClusterToken, nonce};
use vmstream_pagestream::framing::{read_frame, write_frame};
use vmstream_pagestream::wire::{
    Challenge, Command as Cmd, HANDSHAKE_VERSION, Header, Hello, Reason, Role,
};
use vmstream_vmm::image::{PageStore, PageStoreWriter};
use vmstream_vmm::memory::{GuestRam, PAGE_SIZE};

pub const TOKEN: &[u8] = b"test-cluster-token-0123456789abcdef";

pub fn token() -> ClusterToken {
    ClusterToken::new(TOKEN.to_vec()).unwrap()
}

pub fn write_token_file(dir: &Path) -> PathBuf {
    let p = dir.join("token");
    std::fs::write(&p, TOKEN).unwrap();
    p
}

/// Image contents: zero pages, random pages, duplicates, sparse pages.
pub fn image_bytes(pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; pages * PAGE_SIZE];
    let mut dup = vec![0u8; PAGE_SIZE];
    rng.fill(&mut dup[..]);
    for (i, page) in v.chunks_exact_mut(PAGE_SIZE).enumerate() {
        match i % 6 {
            0 | 4 => {}
            1 | 5 => rng.fill(page),
            2 => page.copy_from_slice(&dup),
            _ => page[rng.random_range(0..PAGE_SIZE)] = 0x5a,
        }
    }
    v
}

/// Writes `bytes` as a live-image page store in `dir` with the VMM's writer.
pub fn write_store(dir: &Path, bytes: &[u8]) -> PageStore {
    std::fs::create_dir_all(dir).unwrap();
    let ram = GuestRam::reserve(bytes.len()).unwrap();
    // SAFETY: fresh reservation of exactly bytes.len() writable bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ram.host_addr(), bytes.len()) };
    let mut w = PageStoreWriter::prepare(dir, ram.len()).unwrap();
    // SAFETY: readable for its length, not written concurrently.
    unsafe { w.write_from(ram.host_addr(), None, None) }.unwrap();
    w.finish().unwrap();
    PageStore::open(dir).unwrap()
}

/// Sends a Hello and reads the Challenge; returns it.
pub fn hello(s: &mut TcpStream, image: &str) -> Challenge {
    let h = Hello {
        min_version: 1,
        max_version: 1,
        role: Role::Fault,
        client_nonce: nonce(),
        image_id: image.into(),
    };
    write_frame(
        s,
        &Header::new(Cmd::Hello).with_version(HANDSHAKE_VERSION),
        &[&h.encode()],
    )
    .unwrap();
    let mut buf = Vec::new();
    let got = read_frame(s, &mut buf).unwrap();
    assert_eq!(
        got.command,
        Cmd::Challenge,
        "{:?}",
        reason_of(got.command, &buf)
    );
    Challenge::decode(&buf).unwrap()
}

/// Completes a handshake as a good client on a raw socket.
pub fn authenticate(addr: SocketAddr, image: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let ch = hello(&mut s, image);
    let tag = token().client_tag(&ch.server_nonce, image);
    write_frame(&mut s, &Header::new(Cmd::Auth), &[&tag]).unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_frame(&mut s, &mut buf).unwrap().command, Cmd::Accept);
    s
}

fn reason_of(c: Cmd, buf: &[u8]) -> Option<Reason> {
    Reason::decode(c, buf).ok()
}

/// Reads the next frame and expects a Reject or Error; returns its reason.
pub fn expect_refusal(s: &mut TcpStream) -> (Cmd, Reason) {
    let mut buf = Vec::new();
    let h = read_frame(s, &mut buf).expect("a refusal frame");
    assert!(
        matches!(h.command, Cmd::Reject | Cmd::Error),
        "expected a refusal, got {:?}",
        h.command
    );
    (h.command, Reason::decode(h.command, &buf).unwrap())
}

/// A `vmstream-pageserver` child process; killed on drop.
pub struct ServerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the server inside namespace `ns` (or here if `None`).
    pub fn start(ns: Option<&str>, listen: SocketAddr, token_file: &Path, args: &[String]) -> Self {
        let bin = env!("CARGO_BIN_EXE_vmstream-pageserver");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--token-file")
            .arg(token_file)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vmstream-pageserver");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            stdin,
            stdout,
            addr,
        }
    }

    pub fn stats(&mut self) -> ServerStats {
        writeln!(self.stdin, "stats").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        ServerStats {
            connections_accepted: v["connections_accepted"].as_u64().unwrap(),
            handshakes_completed: v["handshakes_completed"].as_u64().unwrap(),
            refusals: serde_json::from_value(v["refusals"].clone()).unwrap(),
            page_requests: v["page_requests"].as_u64().unwrap(),
            fault_page_requests: v["fault_page_requests"].as_u64().unwrap(),
            bulk_page_requests: v["bulk_page_requests"].as_u64().unwrap(),
            pages_sent: v["pages_sent"].as_u64().unwrap(),
            index_requests: v["index_requests"].as_u64().unwrap(),
            state_requests: v["state_requests"].as_u64().unwrap(),
        }
    }

    /// Kills the server at once (SIGKILL), as a crashing node would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
