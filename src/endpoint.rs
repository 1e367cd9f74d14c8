//! A server's HTTP endpoint: `/metrics` in the Prometheus text exposition format, and
//! `/health`, which answers 200 only while the server serves.
//!
//! A small blocking listener (tiny_http) on a thread of its own: no async runtime. It starts
//! before the server connects, so that `/health` tells "connecting" too, and stops with the
//! server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use log::{debug, warn};
use tiny_http::{Header, Response};

use crate::error::{Error, Result};
use crate::stats::{Health, ServerMetrics};
use crate::sync::lock;

/// A running endpoint; stopped when dropped.
pub(crate) struct Endpoint {
    listener: Arc<tiny_http::Server>,
    address: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Listens on `address` (port 0 picks a free port) and serves until dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the address cannot be listened on.
    pub(crate) fn start(
        address: SocketAddr,
        metrics: Arc<ServerMetrics>,
        health: Arc<Mutex<Health>>,
    ) -> Result<Endpoint> {
        let listener = tiny_http::Server::http(address)
            .map_err(|e| Error::Config(format!("cannot listen on {address} for metrics: {e}")))?;
        let address = listener.server_addr().to_ip().unwrap_or(address);
        let listener = Arc::new(listener);
        let serving = Arc::clone(&listener);
        let thread = thread::Builder::new()
            .name("rpc-metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = respond(request.url(), &metrics, &health);
                    if let Err(error) = request.respond(response) {
                        debug!("a metrics request could not be answered: {error}");
                    }
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the metrics thread: {e}")))?;
        debug!("metrics on http://{address}/metrics");
        Ok(Endpoint {
            listener,
            address,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.listener.unblock();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the metrics thread panicked");
        }
    }
}

fn respond(
    url: &str,
    metrics: &ServerMetrics,
    health: &Mutex<Health>,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let text = |body: String, status: u16, content_type: &str| {
        let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
        Response::from_string(body)
            .with_status_code(status)
            .with_header(header)
    };
    match url.split('?').next().unwrap_or_default() {
        "/metrics" => text(
            metrics.text(),
            200,
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/health" => {
            let health = lock(health).clone();
            let status = if health.is_serving() { 200 } else { 503 };
            let body = match &health {
                Health::Reconnecting { reason, .. } => format!("reconnecting: {reason}\n"),
                other => format!("{}\n", other.name()),
            };
            text(body, status, "text/plain; charset=utf-8")
        }
        _ => text(
            "not found: try /metrics or /health\n".into(),
            404,
            "text/plain",
        ),
    }
}
