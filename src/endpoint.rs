//! A server's HTTP endpoint: `/metrics` in the Prometheus text exposition format, and
//! `/health`, which answers 200 only while the server serves.
//!
//! One thread serves every connection, with mio's poll (the one amiquip is built on): no async
//! runtime, and no thread per connection. It was tiny_http, which starts a thread for each
//! connection: 2,000 idle connections, each having sent half a request, made a server hold
//! 2,000 threads and 41 MB instead of 8, with nothing to bound them. Here what a stranger can
//! hold is bounded:
//!
//! - at most [`MAX_CONNECTIONS`] connections are open; a connection past them closes the
//!   oldest, so that holding connections open blocks nobody: a scraper's fresh connection
//!   is answered within milliseconds of its request, long before
//!   [`MAX_CONNECTIONS`] newer ones could push it out;
//! - a connection gets [`EXCHANGE_TIMEOUT`] from its accept to send its request and read the
//!   answer, then is closed;
//! - a request's head is read up to [`MAX_REQUEST_HEAD`] bytes; what is bigger is answered
//!   431 and closed.
//!
//! Every answer closes its connection (`Connection: close`), which Prometheus and
//! load balancers' health checks expect. It starts before the server connects, so that
//! `/health` tells "connecting" too, and stops with the server.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Poll, PollOpt, Ready, Registration, SetReadiness, Token};

use crate::error::{Error, Result};
use crate::stats::{Health, ServerMetrics};
use crate::sync::lock;

/// The most connections open at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take, from its accept, to send its request and read the answer.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head (request line and headers) read.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);
/// The first token of a connection; later ones count up.
const FIRST_CONNECTION: usize = 2;

/// A running endpoint; stopped when dropped.
pub(crate) struct Endpoint {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    wake: SetReadiness,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Listens on `address` (port 0 picks a free port) and serves until dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the address cannot be listened on, [`Error::Internal`] when the
    /// thread or its poll cannot start.
    pub(crate) fn start(
        address: SocketAddr,
        metrics: Arc<ServerMetrics>,
        health: Arc<Mutex<Health>>,
    ) -> Result<Endpoint> {
        let cannot_listen =
            |e: io::Error| Error::Config(format!("cannot listen on {address} for metrics: {e}"));
        let listener = std::net::TcpListener::bind(address).map_err(cannot_listen)?;
        let address = listener.local_addr().map_err(cannot_listen)?;
        let listener = TcpListener::from_std(listener).map_err(cannot_listen)?;
        let internal =
            |e: io::Error| Error::Internal(format!("cannot start the metrics poll: {e}"));
        let poll = Poll::new().map_err(internal)?;
        poll.register(&listener, LISTENER, Ready::readable(), PollOpt::edge())
            .map_err(internal)?;
        let (registration, wake) = Registration::new2();
        poll.register(&registration, WAKE, Ready::readable(), PollOpt::edge())
            .map_err(internal)?;
        let stop = Arc::new(AtomicBool::new(false));
        let serving = Serving {
            poll,
            listener,
            _registration: registration,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION,
            stop: Arc::clone(&stop),
            metrics,
            health,
        };
        let thread = thread::Builder::new()
            .name("rpc-metrics".into())
            .spawn(move || serving.run())
            .map_err(|e| Error::Internal(format!("cannot start the metrics thread: {e}")))?;
        debug!("metrics on http://{address}/metrics");
        Ok(Endpoint {
            address,
            stop,
            wake,
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
        self.stop.store(true, Ordering::SeqCst);
        if let Err(error) = self.wake.set_readiness(Ready::readable()) {
            warn!("cannot wake the metrics thread to stop it: {error}");
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the metrics thread panicked");
        }
    }
}

/// The endpoint's thread: its poll, its listener and its connections.
struct Serving {
    poll: Poll,
    listener: TcpListener,
    /// Kept registered: [`Endpoint`]'s drop wakes the poll through it.
    _registration: Registration,
    connections: HashMap<Token, Connection>,
    next_token: usize,
    stop: Arc<AtomicBool>,
    metrics: Arc<ServerMetrics>,
    health: Arc<Mutex<Health>>,
}

/// One HTTP connection: what it has sent, what it is sent back, and when it is closed anyway.
struct Connection {
    stream: TcpStream,
    accepted: Instant,
    request: Vec<u8>,
    /// The answer, once the request head has come, and how much of it is written.
    response: Option<(Vec<u8>, usize)>,
}

impl Serving {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = self
                .connections
                .values()
                .map(|connection| connection.accepted + EXCHANGE_TIMEOUT)
                .min()
                .map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if let Err(error) = self.poll.poll(&mut events, timeout)
                && error.kind() != io::ErrorKind::Interrupted
            {
                warn!("the metrics endpoint stops: its poll failed: {error}");
                return;
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKE => {}
                    token => self.serve(token),
                }
            }
            let now = Instant::now();
            self.connections
                .retain(|_, connection| now < connection.accepted + EXCHANGE_TIMEOUT);
        }
    }

    /// Accepts every connection waiting, closing the oldest ones past [`MAX_CONNECTIONS`].
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    // Out of file descriptors, say: the connections waiting stay in the
                    // backlog, and the oldest open one makes room for them.
                    debug!("cannot accept a metrics connection: {error}");
                    self.close_oldest();
                    return;
                }
            };
            if self.connections.len() >= MAX_CONNECTIONS {
                self.close_oldest();
            }
            let token = Token(self.next_token);
            self.next_token += 1;
            let registered = self.poll.register(
                &stream,
                token,
                Ready::readable() | Ready::writable(),
                PollOpt::edge(),
            );
            if let Err(error) = registered {
                debug!("cannot watch a metrics connection: {error}");
                continue;
            }
            self.connections.insert(
                token,
                Connection {
                    stream,
                    accepted: Instant::now(),
                    request: Vec::new(),
                    response: None,
                },
            );
            // A request may have come with the connection: its edge may have passed.
            self.serve(token);
        }
    }

    fn close_oldest(&mut self) {
        let oldest = self
            .connections
            .iter()
            .min_by_key(|(_, connection)| connection.accepted)
            .map(|(token, _)| *token);
        if let Some(token) = oldest {
            self.connections.remove(&token);
        }
    }

    /// Reads what connection `token` sent, answers once its request head is there, and closes
    /// it once the answer is written or the connection has failed.
    fn serve(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        let done = match connection.advance(&self.metrics, &self.health) {
            Ok(done) => done,
            Err(error) => {
                debug!("a metrics connection failed: {error}");
                true
            }
        };
        if done {
            let _ = connection.stream.shutdown(Shutdown::Write);
            self.connections.remove(&token);
        }
    }
}

impl Connection {
    /// Reads and writes as far as the socket lets; true once the exchange is over.
    fn advance(&mut self, metrics: &ServerMetrics, health: &Mutex<Health>) -> io::Result<bool> {
        if self.response.is_none() {
            let mut chunk = [0u8; 1024];
            loop {
                match self.stream.read(&mut chunk) {
                    Ok(0) => return Ok(true),
                    Ok(count) => self.request.extend_from_slice(&chunk[..count]),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(error),
                }
                if let Some(head) = request_head(&self.request) {
                    self.response = Some((answer(head, metrics, health), 0));
                    break;
                }
                if self.request.len() > MAX_REQUEST_HEAD {
                    self.response = Some((
                        response(431, "text/plain", "request head too large\n", true),
                        0,
                    ));
                    break;
                }
            }
        }
        let Some((response, written)) = &mut self.response else {
            return Ok(false);
        };
        while *written < response.len() {
            match self.stream.write(&response[*written..]) {
                Ok(0) => return Ok(true),
                Ok(count) => *written += count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }
}

/// The request head (up to the blank line that ends it), once it has all come.
fn request_head(request: &[u8]) -> Option<&[u8]> {
    let end = request
        .windows(4)
        .position(|window| window == b"\r\n\r\n")?;
    Some(&request[..end])
}

/// The whole response to the request whose head is `head`.
fn answer(head: &[u8], metrics: &ServerMetrics, health: &Mutex<Health>) -> Vec<u8> {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let with_body = match method {
        b"GET" => true,
        b"HEAD" => false,
        _ => return response(405, "text/plain", "only GET and HEAD are served\n", true),
    };
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" => response(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &metrics.text(),
            with_body,
        ),
        b"/health" => {
            let health = lock(health).clone();
            let status = if health.is_serving() { 200 } else { 503 };
            let body = match &health {
                Health::Reconnecting { reason, .. } => format!("reconnecting: {reason}\n"),
                other => format!("{}\n", other.name()),
            };
            response(status, "text/plain; charset=utf-8", &body, with_body)
        }
        _ => response(
            404,
            "text/plain",
            "not found: try /metrics or /health\n",
            with_body,
        ),
    }
}

/// An HTTP/1.1 response that closes the connection; `with_body` false for HEAD.
fn response(status: u16, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        text.push_str(body);
    }
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_ends_at_its_blank_line() {
        assert_eq!(request_head(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"),
            Some(&b"GET / HTTP/1.1\r\nHost: x"[..])
        );
    }

    #[test]
    fn responses_close_and_say_their_length() {
        let text = String::from_utf8(response(503, "text/plain", "draining\n", true)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 9\r\nConnection: close\r\n\r\ndraining\n"));
        let head = String::from_utf8(response(200, "text/plain", "ok\n", false)).unwrap();
        assert!(
            head.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{head}"
        );
    }
}
