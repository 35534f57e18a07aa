//! The source's connections to the target: both connections of a session
//! (control+bulk and fault), handshaken, and the resolved-pages bitmap a
//! resumed session's Accept carries.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use vmstream_pagestream::ClusterToken;
use vmstream_vmm::memory::PAGE_SIZE;

use crate::session::{SessionError, client_handshake};
use crate::wire::{self, FLAG_FAULT_CONNECTION, FLAG_RESUME, Header, Hello};

pub(crate) struct Link {
    pub control: TcpStream,
    pub fault: TcpStream,
    /// The control connection's Accept flags (`FLAG_TARGET_RUNNING`).
    pub accept_flags: u32,
    /// On a resumed session: the pages the target already resolved.
    pub resolved: Option<Vec<u64>>,
}

pub(crate) struct Connector<'a> {
    pub target: SocketAddr,
    pub token: &'a ClusterToken,
    /// Each connection attempt.
    pub connect_timeout: Duration,
    /// Each handshake.
    pub handshake_timeout: Duration,
    pub session: u64,
    pub hello: Hello,
}

impl Connector<'_> {
    fn open(&self, flags: u32) -> Result<(TcpStream, Header, Vec<u8>), SessionError> {
        let mut stream = TcpStream::connect_timeout(&self.target, self.connect_timeout)
            .map_err(SessionError::io("connecting to the target"))?;
        let (header, payload) = client_handshake(
            &mut stream,
            self.token,
            self.session,
            flags,
            self.hello,
            self.handshake_timeout,
        )?;
        Ok((stream, header, payload))
    }

    pub(crate) fn connect(&self, resume: bool) -> Result<Link, SessionError> {
        let extra = if resume { FLAG_RESUME } else { 0 };
        let (control, accept, payload) = self.open(extra)?;
        let resolved = if resume {
            let words = self.hello.memory_bytes as usize / PAGE_SIZE;
            let words = words.div_ceil(64);
            let pairs = wire::parse_sparse_bitmap(&payload, words).ok_or_else(|| {
                SessionError::Protocol("malformed resolved-pages bitmap in Accept".into())
            })?;
            let mut dense = vec![0u64; words];
            for (i, w) in pairs {
                dense[i] = w;
            }
            Some(dense)
        } else {
            None
        };
        let (fault, _, _) = self.open(extra | FLAG_FAULT_CONNECTION)?;
        Ok(Link {
            control,
            fault,
            accept_flags: accept.flags,
            resolved,
        })
    }
}
