//! Streaming an artifact over HTTP(S) into a file while hashing it: the
//! hyper-util client kube already builds, TLS by rustls (ring) with the
//! node's native root certificates, HTTP/1.1, up to [`MAX_REDIRECTS`]
//! redirects, a connect timeout and a timeout per body chunk (a stalled
//! server fails the fetch instead of hanging it).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{FetchError, hex};

/// Most redirects followed for one artifact.
pub const MAX_REDIRECTS: usize = 5;
/// Longest wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the response head or for the next chunk of the body.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An HTTP(S) client for artifact downloads.
#[derive(Clone)]
pub struct HttpGet {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Default for HttpGet {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpGet {
    /// A client trusting the node's native root certificates. A node
    /// without any still fetches `http://` artifacts; `https://` ones then
    /// fail as unreachable (unknown issuer).
    pub fn new() -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_provider_and_native_roots(Arc::clone(&provider)) {
            Ok(builder) => builder,
            Err(e) => {
                tracing::warn!(error = %e, "no native root certificates: https artifacts cannot be verified");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = builder.https_or_http().enable_http1().wrap_connector(http);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Streams `url` into `into` (created or truncated), refusing more than
    /// `max_bytes`; returns the content's SHA-256 (hex) and size.
    pub async fn download(
        &self,
        url: &str,
        into: &Path,
        max_bytes: u64,
    ) -> Result<(String, u64), FetchError> {
        let unreachable = |cause: String| FetchError::Unreachable {
            url: url.to_owned(),
            cause,
        };
        let mut uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| unreachable(e.to_string()))?;
        let mut redirects = 0;
        let response = loop {
            let response = tokio::time::timeout(IDLE_TIMEOUT, self.client.get(uri.clone()))
                .await
                .map_err(|_| unreachable(format!("no response within {IDLE_TIMEOUT:?}")))?
                .map_err(|e| unreachable(crate::error_chain::chain(&e)))?;
            let status = response.status();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(unreachable(format!("more than {MAX_REDIRECTS} redirects")));
                }
                uri = redirect_target(&uri, &response).map_err(unreachable)?;
                continue;
            }
            if !status.is_success() {
                return Err(unreachable(format!("the server answered {status}")));
            }
            break response;
        };
        let too_large = || FetchError::TooLarge {
            artifact: url.to_owned(),
            limit: max_bytes,
        };
        let announced = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > max_bytes) {
            return Err(too_large());
        }
        let mut file = tokio::fs::File::create(into)
            .await
            .map_err(FetchError::cache("create", into))?;
        let mut body = response.into_body();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
                .await
                .map_err(|_| unreachable(format!("the body stalled for {IDLE_TIMEOUT:?}")))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| unreachable(crate::error_chain::chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            size += data.len() as u64;
            if size > max_bytes {
                return Err(too_large());
            }
            hasher.update(&data);
            file.write_all(&data)
                .await
                .map_err(FetchError::cache("write", into))?;
        }
        if announced.is_some_and(|n| n != size) {
            return Err(unreachable(format!(
                "the body ended after {size} of {} bytes",
                announced.unwrap_or_default()
            )));
        }
        file.sync_all()
            .await
            .map_err(FetchError::cache("sync", into))?;
        Ok((hex(&hasher.finalize()), size))
    }
}

/// Where a redirect points, resolved against the request's URI.
fn redirect_target<B>(from: &Uri, response: &hyper::Response<B>) -> Result<Uri, String> {
    let location = response
        .headers()
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("redirect {} without a Location", response.status()))?;
    let target: Uri = location
        .parse()
        .map_err(|e| format!("redirect to {location:?}: {e}"))?;
    if target.scheme().is_some() {
        return match target.scheme_str() {
            Some("http" | "https") => Ok(target),
            _ => Err(format!("redirect to {location:?}: not http or https")),
        };
    }
    let mut parts = target.into_parts();
    parts.scheme = from.scheme().cloned();
    parts.authority = from.authority().cloned();
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some("/".parse().expect("/ is a path"));
    }
    Uri::from_parts(parts).map_err(|e| format!("redirect to {location:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(location: &str) -> hyper::Response<()> {
        hyper::Response::builder()
            .status(StatusCode::FOUND)
            .header(hyper::header::LOCATION, location)
            .body(())
            .unwrap()
    }

    #[test]
    fn redirects_resolve_against_the_request() {
        let from: Uri = "http://h:8080/a/b?x=1".parse().unwrap();
        assert_eq!(
            redirect_target(&from, &redirect("/c/d")).unwrap(),
            "http://h:8080/c/d".parse::<Uri>().unwrap()
        );
        assert_eq!(
            redirect_target(&from, &redirect("https://cdn.example.com/k")).unwrap(),
            "https://cdn.example.com/k".parse::<Uri>().unwrap()
        );
        assert!(redirect_target(&from, &redirect("ftp://h/k")).is_err());
    }
}
