//! The listener and the accept loop: HTTP/1.1 connections served by hyper with the API's
//! router, a cap on open connections, a deadline for a request's head, and a graceful stop.
//!
//! A client that connects and sends nothing (or a header a byte a minute) is dropped after
//! [`HEADER_READ_TIMEOUT`]; at most `[api] max_connections` are served at once, and further
//! clients wait in the kernel's backlog until one ends. When shutdown is signalled the loop
//! stops accepting, tells every connection to finish its request in flight and close, and
//! returns once they have.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::Listen;

/// How long a client may take to send a request's head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound listener, TCP or Unix.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file, removed when the daemon stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `listen` (port 0 picks a free port); a stale socket file is replaced.
    pub async fn bind(listen: &Listen) -> anyhow::Result<Self> {
        match listen {
            Listen::Tcp(addr) => Ok(Self::Tcp(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?,
            )),
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                Ok(Self::Unix(l, path.clone()))
            }
        }
    }

    /// What clients connect to: `http://127.0.0.1:8480` or `unix:/run/outpost.sock`.
    pub fn address(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "http://?".into(), |a: SocketAddr| format!("http://{a}")),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    async fn accept(
        &self,
    ) -> std::io::Result<Either<tokio::net::TcpStream, tokio::net::UnixStream>> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, _)| Either::Left(s)),
            Self::Unix(l, _) => l.accept().await.map(|(s, _)| Either::Right(s)),
        }
    }

    /// Removes the socket file of a Unix listener.
    pub fn cleanup(&self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A socket file left by a previous run is removed; any other file there is an error.
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the old socket {}", path.display())),
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// The HTTP server task.
pub struct Server {
    pub listener: Listener,
    pub app: axum::Router,
    pub max_connections: usize,
}

impl Server {
    /// Serves until `shutdown`, then waits for the connections' requests in flight.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections.max(1)));
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let service = TowerToHyperService::new(self.app);
        loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                s = slots.clone().acquire_owned() => s,
            };
            let Ok(slot) = slot else { break };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                s = self.listener.accept() => s,
            };
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let conn = http.serve_connection(TokioIo::new(stream), service.clone());
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "Connection ended with an error.");
                }
                drop(slot);
            });
        }
        // No new connections from here; those open finish their request and close.
        self.listener.cleanup();
        drop(self.listener);
        graceful.shutdown().await;
    }
}
