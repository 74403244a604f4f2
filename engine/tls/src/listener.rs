//! A listener axum serves from: plain TCP, or TLS whose handshakes run in their own tasks
//! (bounded in number and in time), so a client that connects and says nothing holds
//! neither the accept loop nor anyone else's connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin as StdPin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The most TLS handshakes in progress at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections as a server sees them: plain or TLS.
pub enum Incoming {
    /// Plain TCP.
    Plain(TcpListener),
    /// TLS: finished handshakes arrive here.
    Tls {
        /// The bound address.
        local: SocketAddr,
        /// Completed handshakes.
        ready:
            tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
        /// The accept loop, stopped when this is dropped.
        task: tokio::task::JoinHandle<()>,
    },
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Incoming::Tls { task, .. } = self {
            task.abort();
        }
    }
}

impl Incoming {
    /// Serves plain TCP from `tcp`.
    pub fn plain(tcp: TcpListener) -> Incoming {
        Incoming::Plain(tcp)
    }

    /// Serves TLS from `tcp` with `acceptor`.
    pub fn tls(tcp: TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> io::Result<Incoming> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, mostly: wait rather than spin.
                        tracing::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Incoming::Tls { local, ready, task })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Incoming::Tls { .. })
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        match self {
            Incoming::Plain(tcp) => loop {
                match TcpListener::accept(tcp).await {
                    Ok((s, a)) => {
                        let _ = s.set_nodelay(true);
                        return (Stream::Plain(s), a);
                    }
                    Err(e) => {
                        tracing::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            Incoming::Tls { ready, .. } => match ready.recv().await {
                Some((s, a)) => (Stream::Tls(Box::new(s)), a),
                // The accept loop only ends when this is dropped.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Incoming::Plain(tcp) => tcp.local_addr(),
            Incoming::Tls { local, .. } => Ok(*local),
        }
    }
}

/// One accepted connection.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => StdPin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => StdPin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => StdPin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => StdPin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => StdPin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => StdPin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    // Passed on, so hyper writes a response's head and body in one call, not one each.
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => StdPin::new(s).poll_flush(cx),
            Stream::Tls(s) => StdPin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => StdPin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => StdPin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
