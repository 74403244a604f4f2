//! The host's own HTTP client for plugins' outbound requests. wasi-http's default client
//! trusts only public roots and cannot be told otherwise; a BMC has a self-signed
//! certificate and an agent a pinned one, so the host connects itself, with the trust the
//! operator chose for the endpoint (see [`crate::endpoint_tls`]).

use bytes::Bytes;
use http_body_util::BodyExt as _;
use mint_tls::{ClientTrust, Presented};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// What a connection defaults to waiting when the guest sets no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One response, and the future that drives its connection to the end.
pub(crate) type Sent = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), Error>> + Send>,
);

/// Sends `request` over a new connection: plain for `http`, TLS under `trust` for `https`
/// (whose handshake records the key the server presented in `presented`).
pub(crate) async fn send(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    trust: &ClientTrust,
    presented: &mut Option<Arc<Presented>>,
) -> Result<Sent, Error> {
    let uri = request.uri().clone();
    let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let host = uri
        .host()
        .ok_or(Error::HttpRequestUriInvalid)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(DEFAULT_TIMEOUT);
    let first_byte = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(DEFAULT_TIMEOUT);
    let between_bytes = options
        .and_then(|o| o.between_bytes_timeout)
        .unwrap_or(DEFAULT_TIMEOUT)
        .max(Duration::from_nanos(1));

    let tcp = match tokio::time::timeout(
        connect_timeout,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(s) => s.map_err(Error::Connect)?,
        Err(_) => return Err(Error::ConnectionTimeout),
    };
    let io: Box<dyn Io> = if tls {
        let name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::from(ip),
            Err(_) => rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| Error::HttpRequestUriInvalid)?,
        };
        let (config, seen) = trust.watched();
        *presented = Some(seen);
        let connector = tokio_rustls::TlsConnector::from(config);
        match tokio::time::timeout(connect_timeout, connector.connect(name, tcp)).await {
            Ok(s) => Box::new(s.map_err(Error::Tls)?),
            Err(_) => return Err(Error::ConnectionTimeout),
        }
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(io)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;
    // The request line carries the path only; scheme and authority are for proxies.
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    if !request.headers().contains_key(http::header::HOST)
        && let Some(a) = uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        request.headers_mut().insert(http::header::HOST, v);
    }
    // The connection runs in its own task, so the response's body can be read while the
    // request's is still being written, and it ends when both are done.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = done_tx.send(conn.await);
    });
    let response = tokio::time::timeout(first_byte, sender.send_request(request))
        .await
        .map_err(|_| Error::ConnectionReadTimeout)??;
    let response = response.map(|incoming| {
        Timed {
            incoming,
            timer: Box::pin(tokio::time::sleep(between_bytes)),
            every: between_bytes,
        }
        .boxed_unsync()
    });
    let io = Box::new(async move {
        match done_rx.await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) if e.is_timeout() => Err(Error::HttpResponseTimeout),
            Ok(Err(e)) => Err(Error::from(e)),
        }
    });
    Ok((response, io))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A response body that fails when the server goes quiet for longer than `every`.
struct Timed {
    incoming: hyper::body::Incoming,
    timer: Pin<Box<tokio::time::Sleep>>,
    every: Duration,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.every;
                self.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(if e.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(e)
            }))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}
