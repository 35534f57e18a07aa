//! Peer authentication with a cluster secret: HMAC-SHA256 tags over the
//! handshake nonces and the image id. The server proves it knows the token
//! over the client's nonce (so a client never streams from an impostor), the
//! client proves it over the server's nonce (so only cluster members read
//! images). Tags are compared in constant time.

use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::wire::{MAC_LEN, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation between the two directions, so a tag made for one can
/// never be replayed as the other.
const SERVER_DOMAIN: &[u8] = b"vmstream-pagestream server proof v1\0";
const CLIENT_DOMAIN: &[u8] = b"";

/// Shortest accepted cluster token.
pub const MIN_TOKEN_LEN: usize = 16;

/// The cluster's shared secret. Its bytes are never printed.
#[derive(Clone)]
pub struct ClusterToken(Vec<u8>);

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterToken({} bytes)", self.0.len())
    }
}

/// Why a cluster token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the cluster token is {0} bytes, at least {MIN_TOKEN_LEN} are required")]
    TooShort(usize),
    #[error("cannot read the cluster token file {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClusterToken {
    /// A token from raw bytes (at least [`MIN_TOKEN_LEN`]).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, TokenError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// Reads a token file (trailing whitespace, e.g. a newline, is ignored).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let mut bytes = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        Self::new(bytes)
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// The server's proof: HMAC(token, domain || client nonce || image id).
    pub fn server_proof(&self, client_nonce: &[u8; NONCE_LEN], image_id: &str) -> [u8; MAC_LEN] {
        self.mac(&[SERVER_DOMAIN, client_nonce, image_id.as_bytes()])
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the server proof for this nonce and image.
    pub fn verify_server_proof(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        image_id: &str,
        proof: &[u8],
    ) -> bool {
        self.mac(&[SERVER_DOMAIN, client_nonce, image_id.as_bytes()])
            .verify_slice(proof)
            .is_ok()
    }

    /// The client's tag: HMAC(token, server nonce || image id).
    pub fn client_tag(&self, server_nonce: &[u8; NONCE_LEN], image_id: &str) -> [u8; MAC_LEN] {
        self.mac(&[CLIENT_DOMAIN, server_nonce, image_id.as_bytes()])
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the client tag for this nonce and image.
    pub fn verify_client_tag(
        &self,
        server_nonce: &[u8; NONCE_LEN],
        image_id: &str,
        tag: &[u8],
    ) -> bool {
        self.mac(&[CLIENT_DOMAIN, server_nonce, image_id.as_bytes()])
            .verify_slice(tag)
            .is_ok()
    }
}

/// A fresh random nonce (from the thread-local CSPRNG).
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(b: u8) -> ClusterToken {
        ClusterToken::new(vec![b; 32]).unwrap()
    }

    #[test]
    fn tags_verify_only_with_the_same_token_nonce_and_image() {
        let n = [5u8; NONCE_LEN];
        let tag = token(1).client_tag(&n, "ns/img");
        assert!(token(1).verify_client_tag(&n, "ns/img", &tag));
        assert!(!token(2).verify_client_tag(&n, "ns/img", &tag));
        assert!(!token(1).verify_client_tag(&[6; NONCE_LEN], "ns/img", &tag));
        assert!(!token(1).verify_client_tag(&n, "ns/other", &tag));
    }

    #[test]
    fn a_server_proof_is_not_a_client_tag() {
        let n = [7u8; NONCE_LEN];
        let proof = token(1).server_proof(&n, "i");
        assert!(token(1).verify_server_proof(&n, "i", &proof));
        assert!(!token(1).verify_client_tag(&n, "i", &proof));
    }

    #[test]
    fn short_tokens_are_refused_and_never_printed() {
        assert!(matches!(
            ClusterToken::new(b"short".to_vec()),
            Err(TokenError::TooShort(5))
        ));
        let t = ClusterToken::new(b"super-secret-token-bytes".to_vec()).unwrap();
        assert!(!format!("{t:?}").contains("secret"));
    }
}
