//! The RPC server: pools of worker threads, each worker with its own channel, serving one or
//! more queues on one connection.
//!
//! A supervisor thread owns the connection. It declares each server queue (by default as the
//! tutorial does: not durable, not exclusive, not auto-deleted, so peers in other languages
//! can declare it too), opens one channel per worker, and hands each worker its channel. A
//! worker sets `qos(1)`, consumes its queue, and for each request calls its queue's
//! [`Handler`], publishes the reply to the request's `reply_to` with its `correlation_id`, and
//! only then acks the request. A request whose worker dies before the ack is redelivered by
//! the broker to another worker.
//!
//! A handler's error (or panic) becomes an error reply: the message travels in the
//! [`crate::ERROR_HEADER`] header and as the body, the request is acked, and the worker goes
//! on serving.
//!
//! When the connection is lost, the supervisor stops every worker, reconnects with exponential
//! backoff (bounded by [`ServerOptions::max_reconnect_delay`]), re-declares every queue and
//! starts fresh workers; it gives up only on errors that retrying cannot fix.
//! [`Server::shutdown`] (or a [`ShutdownHandle`]) stops taking requests, lets the in-flight ones
//! finish, reply and ack, and closes the connection.

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use amiquip::{
    AmqpValue, Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery,
    ExchangeDeclareOptions, ExchangeType, FieldTable, Publish, QueueDeclareOptions,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, select, unbounded};
use log::{debug, info, trace, warn};

use crate::connect::{self, Brokers, ConnectOptions, Connected, without_password};
use crate::deliveries::{self, DeliveryCounter};
use crate::destination::{Binding, ExchangeKind};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::headers::{HeaderValue, MAX_HEADER_DEPTH};
use crate::message::{HandlerError, Reply, Request};
use crate::stats::{Health, QueueMetrics, ServerMetrics, ServerStats};
use crate::sync::{deadline_after, lock};
use crate::wire;

/// Answers requests. An `Err` is sent back to the caller as an error reply.
///
/// Any `Fn(&Request) -> Result<R, HandlerError>` that can be shared across threads is a
/// handler, where `R` is a [`Reply`] or converts into one (`Vec<u8>`, `String`, `&str`):
///
/// ```
/// use amqp_rpc::{HandlerError, Reply, Request};
///
/// let echo = |request: &Request| -> Result<Vec<u8>, HandlerError> { Ok(request.body().to_vec()) };
/// let greet = |request: &Request| -> Result<Reply, HandlerError> {
///     let name = request.header_str("x-name").ok_or_else(|| HandlerError::bad_request("no x-name header"))?;
///     Ok(Reply::new(format!("hello, {name}")).with_content_type("text/plain"))
/// };
/// # fn is_handler(_: impl amqp_rpc::Handler) {}
/// # is_handler(echo);
/// # is_handler(greet);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`], which the caller receives as [`Error::Remote`].
    fn handle(&self, request: &Request) -> std::result::Result<Reply, HandlerError>;
}

impl<F, R> Handler for F
where
    F: Fn(&Request) -> std::result::Result<R, HandlerError> + Send + Sync + 'static,
    R: Into<Reply>,
{
    fn handle(&self, request: &Request) -> std::result::Result<Reply, HandlerError> {
        self(request).map(Into::into)
    }
}

/// How a [`Server`] connects and recovers; shared by all its queues.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The longest wait between two reconnection attempts. Default: 30 s.
    pub max_reconnect_delay: Duration,
    /// How long [`Server::shutdown`] (and dropping a server) lets the requests in flight
    /// finish; the ones still running then go back to the queue, for another server. Once
    /// none is left, the broker has 5 s more to confirm that the workers stopped consuming,
    /// and 5 s to confirm the close. Default: 30 s.
    pub drain_timeout: Duration,
    /// Where to serve `/metrics` (Prometheus text exposition) and `/health` (200 only while
    /// serving) over HTTP; port 0 picks a free port ([`Server::metrics_addr`] tells which).
    /// Default: `None`, no endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// TCP and AMQP connection settings.
    pub connect: ConnectOptions,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_reconnect_delay: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            metrics_addr: None,
            connect: ConnectOptions::default(),
        }
    }
}

/// How one queue is declared and served.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Worker threads, each with its own channel. Default: [`default_workers`], two per core and
    /// at least four.
    pub workers: usize,
    /// Unacknowledged requests a worker may hold (`basic.qos` prefetch count). Default: 1, so a
    /// slow request never holds others back in a busy worker's buffer.
    pub prefetch: u16,
    /// The kind of queue to declare. Default: [`QueueType::Classic`], as the tutorial.
    pub queue_type: QueueType,
    /// How many times a request may be delivered without being answered (its server died or
    /// stopped while handling it, or its channel closed before the ack) before it is answered
    /// with a `handler-failed` error ("delivered N times without being answered") and acked,
    /// instead of running again. Stops a request that kills every server that takes it (an
    /// abort in native code, running out of memory, a SIGKILL in the middle) from looping
    /// forever, on both queue types:
    ///
    /// - on a quorum queue the broker counts (`x-delivery-count`), and drops a request
    ///   returned more times than this (or dead-letters it with
    ///   [`QueueOptions::dead_letter_exchange`]): a server answers it at the last delivery
    ///   before that, so that its caller hears. The broker counts every return, and when a
    ///   server dies, the request it held may pass through its other, idle workers' channels
    ///   in the moment before they close, each counting (a server of two workers killed once
    ///   counted 2): one death can count up to a server's worker count, so give a quorum queue
    ///   a limit above that;
    /// - on a classic queue, which counts nothing, the servers count a redelivered request's
    ///   deliveries in a small queue of its own (`amqp-rpc.deliveries.<uuid>`, deleted once
    ///   it is answered, or after an hour unused), before its handler runs: the request stays
    ///   in its queue, untouched, until answered. Requests delivered once pay nothing. The
    ///   server's user needs the configure permission on those queues (see the README's
    ///   least-privilege table); when the broker refuses one, the request is answered with
    ///   the broker's reason.
    ///
    /// A delivery put back without running (racing a shutdown) counts as one that died.
    /// Default: `Some(5)`; `None` for no limit.
    pub delivery_limit: Option<u32>,
    /// For a quorum queue: the exchange that receives requests dropped by the delivery limit
    /// (and expired ones), with [`QueueOptions::dead_letter_routing_key`]. Default: `None`,
    /// they are dropped.
    pub dead_letter_exchange: Option<String>,
    /// The routing key for dead-lettered requests; `None` keeps their own. Default: `None`.
    pub dead_letter_routing_key: Option<String>,
    /// The largest request body served, in bytes; a larger one is answered with a
    /// `bad-request` error reply before the handler sees it. Default: 1 MiB.
    pub max_body: usize,
    /// The `reply_to` names the server answers: an exact name, or a prefix ending in `*`. A
    /// request naming another is acked, logged at warn and not answered: the server publishes
    /// with its own permissions, so an unchecked `reply_to` would let any caller make it write
    /// into any queue. Default: [`DEFAULT_REPLY_TO`], the queues a client can own: server-named
    /// ones (`amq.gen-*`, the tutorial's) and direct reply-to (`amq.rabbitmq.reply-to*`). Add
    /// patterns for peers that name their reply queues.
    pub reply_to: Vec<String>,
    /// Exchanges the queue is bound to, besides the default exchange (which routes by the
    /// queue's name): callers reach it through any of them with a matching routing key
    /// ([`crate::Destination::exchange`]). The server declares each exchange (durable, of the
    /// binding's kind: topic unless told otherwise) and binding at start and after each lost
    /// connection, as it does the queue. Default: none.
    pub bindings: Vec<Binding>,
}

/// The default [`QueueOptions::reply_to`]: server-named queues and direct reply-to.
pub const DEFAULT_REPLY_TO: [&str; 2] = ["amq.gen-*", "amq.rabbitmq.reply-to*"];

/// True when `reply_to` is one of `patterns`: an exact name, or a prefix ending in `*`.
fn reply_to_allowed(reply_to: &str, patterns: &[String]) -> bool {
    patterns
        .iter()
        .any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => reply_to.starts_with(prefix),
            None => reply_to == pattern,
        })
}

/// The default [`QueueOptions::max_body`]: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            workers: default_workers(),
            prefetch: 1,
            queue_type: QueueType::default(),
            delivery_limit: Some(5),
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            max_body: DEFAULT_MAX_BODY,
            reply_to: DEFAULT_REPLY_TO.map(String::from).to_vec(),
            bindings: Vec::new(),
        }
    }
}

impl QueueOptions {
    /// The defaults, with `workers` worker threads.
    pub fn with_workers(workers: usize) -> QueueOptions {
        QueueOptions {
            workers,
            ..QueueOptions::default()
        }
    }
}

/// The kind of server queue; every server of one queue must declare it alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// A classic queue, declared as the tutorial does: not durable, not exclusive, no
    /// arguments, so the tutorial's peers in other languages can declare it too. It lives on
    /// one node: if that node is lost, so are the requests in it, and servers cannot consume
    /// until it is back.
    #[default]
    Classic,
    /// A durable quorum queue, replicated on a majority of a cluster's nodes: requests survive
    /// the loss of a minority of nodes, at the cost of a disk write and a replication round
    /// before each request is accepted. Supports [`QueueOptions::delivery_limit`].
    Quorum,
}

/// The default worker count: two per core, and never fewer than four.
///
/// With `qos(1)` a worker sits idle for a broker round trip between its ack and its next
/// delivery, so more workers than cores keep the cores busy: on 2 cores, 8 calling threads got
/// 5,800 calls/s from 2 workers and 8,300 from 4.
pub fn default_workers() -> usize {
    thread::available_parallelism().map_or(4, |cores| (2 * cores.get()).max(4))
}

/// Never sent: dropping every `Sender<Stop>` is the signal.
enum Stop {}

/// Asks a running [`Server`] to stop; cloneable and usable from any thread (a signal handler's
/// thread, say).
#[derive(Clone)]
pub struct ShutdownHandle {
    sender: Arc<Mutex<Option<Sender<Stop>>>>,
}

impl ShutdownHandle {
    /// Starts a graceful shutdown. Calling it again does nothing.
    pub fn shutdown(&self) {
        let mut sender = lock(&self.sender);
        if sender.take().is_some() {
            info!("shutting down: finishing in-flight requests");
        }
    }
}

/// Shows whether the shutdown has been asked for.
impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("shutting_down", &lock(&self.sender).is_none())
            .finish()
    }
}

/// One queue a server serves, with its handler.
struct Service {
    queue: String,
    options: QueueOptions,
    handler: Arc<dyn Handler>,
    /// Requests for which the broker refused something, closing the worker's channel (their
    /// reply, or counting their deliveries), by [`reply_key`], with the message to answer
    /// them with. When such a request comes back (it was never acked), it is answered with
    /// that error instead of running it again, so that it cannot loop.
    refused: Mutex<HashMap<String, String>>,
    metrics: QueueMetrics,
}

impl Service {
    /// Remembers that the broker refused something for the request `key`, which is answered
    /// with `message` when it comes back.
    fn refused(&self, key: String, message: String) {
        lock(&self.refused).insert(key, message);
    }
}

/// Collects the queues of a [`Server`] before starting it; made by [`Server::builder`].
///
/// ```no_run
/// use amqp_rpc::{QueueOptions, Request, Server, fib};
///
/// # fn main() -> amqp_rpc::Result<()> {
/// let server = Server::builder(amqp_rpc::DEFAULT_URL)
///     .serve("math.fib", QueueOptions::with_workers(4), |request: &Request| {
///         fib::handle_request(request.body(), fib::DEFAULT_MAX_N)
///     })
///     .serve("math.echo", QueueOptions::with_workers(1), |request: &Request| {
///         Ok(request.body().to_vec())
///     })
///     .start()?;
/// # server.shutdown()
/// # }
/// ```
pub struct ServerBuilder {
    urls: String,
    options: ServerOptions,
    services: Vec<Service>,
    metrics: Arc<ServerMetrics>,
}

/// Shows the brokers (without passwords), the options and the queues.
impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.split(',').map(without_password).collect();
        f.debug_struct("ServerBuilder")
            .field("brokers", &urls)
            .field("options", &self.options)
            .field("queues", &queue_names(&self.services))
            .finish_non_exhaustive()
    }
}

/// The names of the queues that `services` serve.
fn queue_names<S: std::borrow::Borrow<Service>>(services: &[S]) -> Vec<&str> {
    services
        .iter()
        .map(|service| service.borrow().queue.as_str())
        .collect()
}

impl ServerBuilder {
    /// Sets the connection and recovery options (default: [`ServerOptions::default`]).
    pub fn options(mut self, options: ServerOptions) -> ServerBuilder {
        self.options = options;
        self
    }

    /// Serves `queue` with `handler`, as `options` say.
    pub fn serve(
        mut self,
        queue: impl Into<String>,
        options: QueueOptions,
        handler: impl Handler,
    ) -> ServerBuilder {
        let queue = queue.into();
        self.services.push(Service {
            metrics: self.metrics.queue(&queue),
            queue,
            options,
            handler: Arc::new(handler),
            refused: Mutex::default(),
        });
        self
    }

    /// Connects, declares every queue and starts every worker, returning once all of them
    /// consume. The URL may list several brokers (the nodes of a cluster) separated by commas:
    /// the server connects to the first that answers and, after losing its connection, to
    /// whichever answers next.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for bad options (no queue, a queue served twice, zero workers or
    /// prefetch), a bad URL or refused credentials; [`Error::Connect`] when the broker cannot
    /// be reached; [`Error::Refused`] when it refuses a queue, an exchange or a binding
    /// (declared elsewhere with other arguments, or outside the user's permissions: its reason
    /// says which). Once started, the server reconnects on its own instead.
    pub fn start(self) -> Result<Server> {
        validate(&self.services)?;
        let brokers = Arc::new(Brokers::parse(&self.urls)?);
        let (stop_sender, stop) = bounded::<Stop>(0);
        let shutdown = ShutdownHandle {
            sender: Arc::new(Mutex::new(Some(stop_sender))),
        };
        let health = Arc::new(Mutex::new(Health::Connecting));
        let endpoint = self
            .options
            .metrics_addr
            .map(|address| Endpoint::start(address, Arc::clone(&self.metrics), Arc::clone(&health)))
            .transpose()?;
        let services: Vec<Arc<Service>> = self.services.into_iter().map(Arc::new).collect();
        let (started_sender, started) = bounded(1);
        let supervisor = Supervisor {
            brokers,
            options: self.options,
            services: services.clone(),
            stop,
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&health),
        };
        let supervisor = thread::Builder::new()
            .name("rpc-supervisor".into())
            .spawn(move || supervisor.run(started_sender))
            .map_err(|e| Error::Internal(format!("cannot start the supervisor thread: {e}")))?;
        match started.recv() {
            Ok(Ok(())) => Ok(Server {
                shutdown,
                supervisor: Some(supervisor),
                services,
                metrics: self.metrics,
                health,
                endpoint,
            }),
            Ok(Err(error)) => {
                let _ = supervisor.join();
                Err(error)
            }
            Err(_) => Err(supervisor_outcome(supervisor)
                .err()
                .unwrap_or_else(|| Error::Internal("the server stopped before it started".into()))),
        }
    }
}

fn validate(services: &[Service]) -> Result<()> {
    if services.is_empty() {
        return Err(Error::Config("the server has no queue to serve".into()));
    }
    let mut seen = HashSet::new();
    for service in services {
        let queue = &service.queue;
        if !seen.insert(queue.as_str()) {
            return Err(Error::Config(format!("queue '{queue}' is served twice")));
        }
        if service.options.workers == 0 {
            return Err(Error::Config(format!(
                "queue '{queue}' needs at least one worker"
            )));
        }
        if service.options.prefetch == 0 {
            return Err(Error::Config(format!(
                "queue '{queue}': the prefetch count must be at least 1"
            )));
        }
    }
    Ok(())
}

/// A running server. Dropping it shuts it down gracefully and waits.
pub struct Server {
    shutdown: ShutdownHandle,
    supervisor: Option<JoinHandle<Result<()>>>,
    services: Vec<Arc<Service>>,
    metrics: Arc<ServerMetrics>,
    health: Arc<Mutex<Health>>,
    /// Stopped (dropped) after the supervisor.
    endpoint: Option<Endpoint>,
}

/// Shows the queues served, the server's state and its metrics endpoint.
impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("queues", &queue_names(&self.services))
            .field("health", &self.health())
            .field("metrics_addr", &self.metrics_addr())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Serves one `queue` with `handler`, with default options: a shorthand for
    /// `Server::builder(url).serve(queue, QueueOptions::default(), handler).start()`.
    ///
    /// # Errors
    ///
    /// Those of [`ServerBuilder::start`].
    pub fn start(url: &str, queue: &str, handler: impl Handler) -> Result<Server> {
        Server::builder(url)
            .serve(queue, QueueOptions::default(), handler)
            .start()
    }

    /// A builder for a server of several queues, or with options.
    pub fn builder(url: &str) -> ServerBuilder {
        ServerBuilder {
            urls: url.to_string(),
            options: ServerOptions::default(),
            services: Vec::new(),
            metrics: Arc::new(ServerMetrics::new()),
        }
    }

    /// What the server did since it started, per queue, and its state. Counting costs a few
    /// atomic operations per request and is always on.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            queues: self
                .services
                .iter()
                .map(|service| service.metrics.snapshot())
                .collect(),
            reconnections: self.metrics.reconnections.get(),
            health: self.health(),
        }
    }

    /// The server's state: connecting, serving, reconnecting (since when, and why), draining.
    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    /// The server's metrics in the Prometheus text exposition format, as `/metrics` serves
    /// them.
    pub fn metrics_text(&self) -> String {
        self.metrics.text()
    }

    /// The address of the `/metrics` and `/health` endpoint, when
    /// [`ServerOptions::metrics_addr`] asked for one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().map(Endpoint::address)
    }

    /// A handle that stops this server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Blocks until the server stops (after a [`ShutdownHandle::shutdown`]).
    ///
    /// # Errors
    ///
    /// An error that ended the server: one that reconnecting cannot fix.
    pub fn wait(mut self) -> Result<()> {
        let outcome = match self.supervisor.take() {
            Some(supervisor) => supervisor_outcome(supervisor),
            None => Ok(()),
        };
        // The endpoint stops with the server.
        self.endpoint.take();
        outcome
    }

    /// Stops taking requests, lets in-flight requests finish, reply and ack, and closes the
    /// connection.
    ///
    /// # Errors
    ///
    /// As [`Server::wait`].
    pub fn shutdown(self) -> Result<()> {
        self.shutdown.shutdown();
        self.wait()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(supervisor) = self.supervisor.take()
            && let Err(error) = supervisor_outcome(supervisor)
        {
            warn!("server stopped with an error: {error}");
        }
    }
}

fn supervisor_outcome(supervisor: JoinHandle<Result<()>>) -> Result<()> {
    supervisor
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("the server's supervisor panicked".into())))
}

/// Owns the connection: (re)connects, starts workers, watches them, and shuts down.
struct Supervisor {
    brokers: Arc<Brokers>,
    options: ServerOptions,
    services: Vec<Arc<Service>>,
    stop: Receiver<Stop>,
    metrics: Arc<ServerMetrics>,
    health: Arc<Mutex<Health>>,
}

/// How one connection's session ended.
enum SessionEnd {
    /// Shutdown was asked for and completed.
    Stopped,
    /// The connection (or a channel on it) failed; reconnecting may help.
    Lost(Error),
}

impl Supervisor {
    fn run(self, started: Sender<Result<()>>) -> Result<()> {
        let outcome = self.supervise(started);
        self.set_health(Health::Stopped);
        outcome
    }

    /// Shows the server's state to [`Server::health`] and to the metrics.
    fn set_health(&self, health: Health) {
        self.metrics.set_health(&health);
        *lock(&self.health) = health;
    }

    fn supervise(&self, started: Sender<Result<()>>) -> Result<()> {
        let mut started = Some(started);
        let min_delay = Duration::from_millis(100);
        let mut delay = min_delay;
        loop {
            let session_start = Instant::now();
            let end = self.serve_one_connection(&mut started);
            match end {
                Ok(SessionEnd::Stopped) => return Ok(()),
                Ok(SessionEnd::Lost(error)) | Err(error) => {
                    if let Some(started) = started.take() {
                        // Never served: a bad URL or queue is reported, not retried forever.
                        let _ = started.send(Err(error));
                        return Ok(());
                    }
                    if !is_retryable(&error) {
                        warn!("server giving up: {error}");
                        return Err(error);
                    }
                    // A connection that served for a while earns a fresh backoff.
                    if session_start.elapsed() > self.options.max_reconnect_delay {
                        delay = min_delay;
                    }
                    warn!(
                        "{}; reconnecting in {:.1} s",
                        error.chain(),
                        delay.as_secs_f64()
                    );
                    let since = match &*lock(&self.health) {
                        Health::Reconnecting { since, .. } => *since,
                        _ => SystemTime::now(),
                    };
                    self.set_health(Health::Reconnecting {
                        since,
                        reason: error.chain(),
                    });
                    select! {
                        recv(self.stop) -> _ => return Ok(()),
                        default(delay) => {}
                    }
                    delay = (delay * 2).min(self.options.max_reconnect_delay);
                }
            }
        }
    }

    /// Connects, on a thread of its own so that a shutdown is honoured while connecting;
    /// `None` when shutdown was asked for first (the attempt is left to finish, and its
    /// connection, if any, is closed when dropped).
    fn connect(&self) -> Result<Option<Connected>> {
        let (sender, result) = bounded(1);
        let (brokers, options) = (Arc::clone(&self.brokers), self.options.connect.clone());
        thread::Builder::new()
            .name("rpc-connect".into())
            .spawn(move || {
                let _ = sender.send(brokers.connect(&options));
            })
            .map_err(|e| Error::Internal(format!("cannot start the connecting thread: {e}")))?;
        select! {
            recv(result) -> connected => match connected {
                Ok(connection) => connection.map(Some),
                Err(_) => Err(Error::Internal("the connecting thread panicked".into())),
            },
            recv(self.stop) -> _ => Ok(None),
        }
    }

    /// Connects, serves until shutdown or a failure, and closes the connection.
    fn serve_one_connection(&self, started: &mut Option<Sender<Result<()>>>) -> Result<SessionEnd> {
        let Some(Connected {
            connection,
            socket,
            user,
            addr,
        }) = self.connect()?
        else {
            return Ok(SessionEnd::Stopped);
        };
        // The handshake is done; declaring the queues and starting the workers wait for the
        // broker's answers, which amiquip does without a bound: a connect timeout more, then
        // the connection is cut.
        let set_up_by = Instant::now() + self.options.connect.connect_timeout;
        let timed_out = || {
            connect::unanswered(
                addr.clone(),
                "the server declared its queues and started its workers",
            )
        };
        let services = self.services.clone();
        let ((mut connection, opened), cut) =
            connect::bounded("rpc-set-up", set_up_by, &socket, move || {
                let mut connection = connection;
                let opened = open_worker_channels(&mut connection, &services);
                (connection, opened)
            })?;
        let channels = match opened {
            // Cut, it may still have ended well, just too late: the connection is gone.
            _ if cut => return Err(timed_out()),
            Ok(channels) => channels,
            Err(error) => {
                let _ = connect::close(connection, &socket);
                return Err(error);
            }
        };
        let mut pool = Pool::new(self.stop.clone(), user);
        for (service, channel) in channels {
            if let Err(error) = pool.spawn(service, channel) {
                let _ = connect::close(connection, &socket);
                pool.join();
                return Err(error);
            }
        }
        let total = pool.live.len();

        // A worker that ends with Ok saw the stop signal; one that ends with Err failed.
        let mut failure = None;
        let mut ready_workers = 0;
        while ready_workers < total && failure.is_none() {
            select! {
                recv(pool.ready) -> _ => ready_workers += 1,
                recv(pool.ended) -> ended => failure = Some(pool.failure(ended)),
                recv(crossbeam_channel::at(set_up_by)) -> _ => {
                    // Ends the workers' waits for the broker to confirm their consumers.
                    let _ = socket.shutdown(Shutdown::Both);
                    failure = Some(timed_out());
                }
            }
        }
        if failure.is_none() {
            for service in &self.services {
                info!(
                    "serving queue '{}' with {} workers",
                    service.queue, service.options.workers
                );
            }
            if started.is_none() {
                self.metrics.reconnections.inc();
            }
            self.set_health(Health::Serving {
                since: SystemTime::now(),
            });
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
            }
            failure = self.watch(&mut connection, &mut pool);
        }

        match failure {
            None => {
                self.set_health(Health::Draining);
                self.drain(connection, &socket, pool);
                Ok(SessionEnd::Stopped)
            }
            Some(error) => {
                // Closing the connection ends the other workers; their unacked requests go back
                // to the queue.
                let _ = connect::close(connection, &socket);
                pool.join();
                if is_stopped(&self.stop) {
                    return Ok(SessionEnd::Stopped);
                }
                Ok(SessionEnd::Lost(error))
            }
        }
    }

    /// Watches the workers until shutdown (`None`) or a failure of the connection (`Some`). A
    /// worker whose channel alone failed (the broker refused something on it) is replaced on
    /// a fresh channel, and the others serve on.
    fn watch(&self, connection: &mut Connection, pool: &mut Pool) -> Option<Error> {
        loop {
            select! {
                recv(pool.ended) -> ended => {
                    let Ok(Ended { worker, service, outcome }) = ended else {
                        return Some(Error::Internal("every worker is gone".into()));
                    };
                    pool.live.remove(&worker);
                    let error = match outcome {
                        Err(error) if error.is_refused() => error,
                        Err(error) => return Some(error),
                        // Only the stop signal ends a worker well; it is seen below.
                        Ok(()) => continue,
                    };
                    warn!(
                        "a worker of queue '{}' lost its channel ({}); starting another",
                        service.queue,
                        error.chain()
                    );
                    let replaced = WorkerChannels::open(connection, &service)
                        .and_then(|channels| pool.spawn(service, channels));
                    if let Err(error) = replaced {
                        return Some(error);
                    }
                }
                recv(self.stop) -> _ => return None,
            }
        }
    }

    /// Shutdown: each worker finishes its request, replies, acks, cancels and returns, within
    /// [`ServerOptions::drain_timeout`], and within [`CONFIRM_WAIT`] of the last worker's
    /// request: past that, only the broker's confirmations are awaited, which a broker that
    /// blocks the connection or has stopped answering would not send. Requests still running
    /// then stay unacked: closing the connection sends them back to the queue, for another
    /// server.
    fn drain(&self, connection: Connection, socket: &TcpStream, mut pool: Pool) {
        let mut give_up = deadline_after(Instant::now(), self.options.drain_timeout);
        // Workers that have no request left, ended or not.
        let mut done_serving = HashSet::new();
        let mut unconfirmed = false;
        while !pool.live.is_empty() {
            select! {
                recv(pool.done_serving) -> worker => done_serving.extend(worker),
                recv(pool.ended) -> ended => {
                    if let Ok(Ended { worker, outcome, .. }) = ended {
                        pool.live.remove(&worker);
                        if let Err(error) = outcome {
                            warn!("a worker failed while stopping: {}", error.chain());
                        }
                    }
                }
                recv(crossbeam_channel::at(give_up)) -> _ => break,
            }
            if !unconfirmed && pool.live.is_subset(&done_serving) {
                let confirm_by = Instant::now() + CONFIRM_WAIT;
                unconfirmed = confirm_by < give_up;
                give_up = give_up.min(confirm_by);
            }
        }
        let running = pool.live.len();
        if running > 0 && unconfirmed {
            warn!(
                "the broker has not confirmed the cancels of {running} workers within {} s of \
                 the last request (does a resource alarm block it, or has it stopped \
                 answering?): closing the connection",
                CONFIRM_WAIT.as_secs()
            );
        } else if running > 0 {
            warn!(
                "{running} workers still busy after the drain timeout of {:.1} s (a request \
                 still running, or a broker that blocks the connection): closing the \
                 connection sends their unacked requests back to the queue",
                self.options.drain_timeout.as_secs_f64()
            );
        }
        let finished = running == 0;
        if let Err(error) = connect::close(connection, socket) {
            warn!("closing the connection failed: {error}");
        }
        if finished {
            pool.join();
        }
        // Otherwise the workers still running are left to end on their own: their replies,
        // acks and cancels fail on the closed connection.
    }
}

/// How long a draining server waits, once no worker has a request left, for the broker to
/// confirm the workers' cancels and their channels' closes (milliseconds, normally).
const CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// The worker threads of one connection.
struct Pool {
    stop: Receiver<Stop>,
    /// The connection's user, which replies carry as `user_id`, when known.
    user: Option<String>,
    ready_sender: Sender<()>,
    /// One message per worker that has started consuming.
    ready: Receiver<()>,
    done_serving_sender: Sender<usize>,
    /// The number of each worker that takes no more requests and has none left (it has seen
    /// the stop signal, or failed): it only waits for the broker to confirm its cancel and
    /// its channel's close.
    done_serving: Receiver<usize>,
    ended_sender: Sender<Ended>,
    /// One message per worker that has ended, with how.
    ended: Receiver<Ended>,
    handles: Vec<JoinHandle<()>>,
    /// The numbers of the workers started and not yet seen to end.
    live: HashSet<usize>,
}

/// What a worker sends when it ends: its number, its service, and how it ended.
struct Ended {
    worker: usize,
    service: Arc<Service>,
    outcome: Result<()>,
}

impl Pool {
    fn new(stop: Receiver<Stop>, user: Option<String>) -> Pool {
        let (ready_sender, ready) = unbounded();
        let (done_serving_sender, done_serving) = unbounded();
        let (ended_sender, ended) = unbounded();
        Pool {
            stop,
            user,
            ready_sender,
            ready,
            done_serving_sender,
            done_serving,
            ended_sender,
            ended,
            handles: Vec::new(),
            live: HashSet::new(),
        }
    }

    /// Starts a worker of `service` on `channel`.
    fn spawn(&mut self, service: Arc<Service>, channels: WorkerChannels) -> Result<()> {
        let number = self.handles.len();
        let worker = Worker {
            number,
            channel: channels.channel,
            counter: channels.counter,
            service: Arc::clone(&service),
            stop: self.stop.clone(),
            user: self.user.clone(),
        };
        let (ready, done_serving, ended) = (
            self.ready_sender.clone(),
            self.done_serving_sender.clone(),
            self.ended_sender.clone(),
        );
        let handle = thread::Builder::new()
            .name(format!("rpc-worker-{number}"))
            .spawn(move || {
                // A panic outside the handler (which has its own guard) still reports an end.
                let outcome = catch_unwind(AssertUnwindSafe(|| worker.run(ready, done_serving)))
                    .unwrap_or_else(|panic| {
                        Err(Error::Internal(format!(
                            "a worker panicked: {}",
                            panic_message(&*panic)
                        )))
                    });
                let _ = ended.send(Ended {
                    worker: number,
                    service,
                    outcome,
                });
            })
            .map_err(|e| Error::Internal(format!("cannot start a worker thread: {e}")))?;
        self.handles.push(handle);
        self.live.insert(number);
        Ok(())
    }

    /// The error a worker that ended before serving reports.
    fn failure(
        &mut self,
        ended: std::result::Result<Ended, crossbeam_channel::RecvError>,
    ) -> Error {
        match ended {
            Ok(Ended {
                worker,
                outcome: Err(error),
                ..
            }) => {
                self.live.remove(&worker);
                error
            }
            Ok(Ended { worker, .. }) => {
                self.live.remove(&worker);
                Error::Internal("a worker stopped before serving".into())
            }
            Err(_) => Error::Internal("a worker stopped before serving".into()),
        }
    }

    fn join(self) {
        for handle in self.handles {
            if handle.join().is_err() {
                warn!("a worker thread panicked outside its handler");
            }
        }
    }
}

/// True once shutdown has been asked for (every sender dropped).
fn is_stopped(stop: &Receiver<Stop>) -> bool {
    matches!(
        stop.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

/// Declares a service's queue, on a channel of its own.
/// Declares every service's queue, then opens a channel for each of their workers.
fn open_worker_channels(
    connection: &mut Connection,
    services: &[Arc<Service>],
) -> Result<Vec<(Arc<Service>, WorkerChannels)>> {
    for service in services {
        declare_queue(connection, service)?;
    }
    let mut channels = Vec::new();
    for service in services {
        for _ in 0..service.options.workers {
            channels.push((
                Arc::clone(service),
                WorkerChannels::open(connection, service)?,
            ));
        }
    }
    Ok(channels)
}

/// The channels of one worker: the one it serves on, and for a classic queue with a delivery
/// limit, the one it counts deliveries on (see `deliveries.rs`).
struct WorkerChannels {
    channel: Channel,
    counter: Option<DeliveryCounter>,
}

impl WorkerChannels {
    fn open(connection: &mut Connection, service: &Service) -> Result<WorkerChannels> {
        let channel = connection.open_channel(None)?;
        let counts = service.options.queue_type == QueueType::Classic
            && service.options.delivery_limit.is_some();
        let counter = counts
            .then(|| DeliveryCounter::open(connection))
            .transpose()?;
        Ok(WorkerChannels { channel, counter })
    }
}

fn declare_queue(connection: &mut Connection, service: &Service) -> Result<()> {
    let channel = connection.open_channel(None)?;
    channel.queue_declare(
        service.queue.as_str(),
        queue_declare_options(&service.options),
    )?;
    debug!(
        "declared {:?} queue '{}'",
        service.options.queue_type, service.queue
    );
    for binding in &service.options.bindings {
        // Durable, as nameko and most services declare their exchanges: every declaration of
        // one must agree, or the broker refuses it.
        channel.exchange_declare(
            exchange_type(binding.kind),
            binding.exchange.as_str(),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
        )?;
        channel.queue_bind(
            service.queue.as_str(),
            binding.exchange.as_str(),
            binding.routing_key.as_str(),
            FieldTable::new(),
        )?;
        debug!(
            "bound queue '{}' to {} exchange '{}' for '{}'",
            service.queue,
            binding.kind.as_str(),
            binding.exchange,
            binding.routing_key
        );
    }
    channel.close()?;
    Ok(())
}

fn exchange_type(kind: ExchangeKind) -> ExchangeType {
    match kind {
        ExchangeKind::Topic => ExchangeType::Topic,
        ExchangeKind::Direct => ExchangeType::Direct,
        ExchangeKind::Fanout => ExchangeType::Fanout,
        ExchangeKind::Headers => ExchangeType::Headers,
    }
}

/// How the server queue is declared; see [`QueueType`].
fn queue_declare_options(options: &QueueOptions) -> QueueDeclareOptions {
    match options.queue_type {
        QueueType::Classic => QueueDeclareOptions::default(),
        QueueType::Quorum => {
            let mut arguments = FieldTable::new();
            let text = |value: &str| AmqpValue::LongString(value.to_string());
            arguments.insert("x-queue-type".into(), text("quorum"));
            if let Some(limit) = options.delivery_limit {
                arguments.insert(
                    "x-delivery-limit".into(),
                    AmqpValue::LongLongInt(limit.into()),
                );
            }
            if let Some(exchange) = &options.dead_letter_exchange {
                arguments.insert("x-dead-letter-exchange".into(), text(exchange));
            }
            if let Some(routing_key) = &options.dead_letter_routing_key {
                arguments.insert("x-dead-letter-routing-key".into(), text(routing_key));
            }
            QueueDeclareOptions {
                durable: true,
                arguments,
                ..QueueDeclareOptions::default()
            }
        }
    }
}

/// Whether a server that has served before tries again after `error`. Everything the broker
/// says can change while it restarts or is reconfigured (a lost connection, a refused
/// connection, a queue declared elsewhere with other arguments), so only our own bad settings
/// end the server.
fn is_retryable(error: &Error) -> bool {
    !error.is_config()
}

/// How often a worker between requests looks whether shutdown has been asked for; a busy
/// worker looks before each request. Shutdown stops taking requests at most this late.
const STOP_POLL: Duration = Duration::from_millis(50);

/// How long a worker goes without a request before it stops polling (see [`STOP_POLL`]) and
/// sleeps until a request or the stop signal comes. Polling, each of 4 idle workers woke about
/// 90 times a second (8 of crossbeam's yields and a park per poll), and an idle server used
/// 0.6% of a core; with more workers (two per core by default) it grows with the machine.
const SLEEP_AFTER: Duration = Duration::from_millis(100);

/// One worker thread's state: its channel, and the queue it serves.
struct Worker {
    /// Its number in the pool, which its thread's name shows.
    number: usize,
    channel: Channel,
    /// Where it counts the deliveries of requests that come back, for a classic queue with a
    /// delivery limit.
    counter: Option<DeliveryCounter>,
    service: Arc<Service>,
    stop: Receiver<Stop>,
    /// The connection's user, which replies carry as `user_id` for the broker to verify, when
    /// known.
    user: Option<String>,
}

impl Worker {
    /// Serves until shutdown (`Ok`) or until the channel or connection fails (`Err`). Sends
    /// to `ready` once it consumes, and to `done_serving` once it takes no more requests and
    /// has none left.
    fn run(self, ready: Sender<()>, done_serving: Sender<usize>) -> Result<()> {
        let queue = self.service.queue.as_str();
        self.channel.qos(0, self.service.options.prefetch, false)?;
        let consumer = self
            .channel
            .basic_consume(queue, ConsumerOptions::default())?;
        let deliveries = consumer.receiver().clone();
        let _ = ready.send(());
        // The last request answered: when the broker then closes the channel, it refused that
        // reply (publishing returns before the broker has seen the message).
        let mut last_answered = None;
        let mut last_request = Instant::now();
        let failure = loop {
            // The worker waits on its deliveries alone and looks at the stop signal before
            // each request and after each STOP_POLL of idleness, rather than `select!` over the
            // deliveries and the stop signal, which made sequential round trips slower.
            // bench/raw_echo's client calling one after another, 4 workers, 2 cores, medians of
            // interleaved rounds: 3,074 calls/s through `select!`, 3,306 this way (15 rounds
            // of 5,000 calls; two shorter runs gave +9% and +4%). With 8 calling threads or 32
            // calls in flight the two were within noise, in rate and in server CPU per call.
            // `recv_timeout` yields the processor four times before it sleeps (crossbeam's
            // backoff; 17% of the server's perf samples with 8 threads), which `select!` does
            // not; yet on a second machine `select!` over the deliveries alone was again slower
            // sequentially (0.92x, 7 rounds) and equal with 8 threads (1.01x). Once idle for
            // SLEEP_AFTER, where speed no longer matters, it waits on both without polling.
            if is_stopped(&self.stop) {
                break None;
            }
            let message = if last_request.elapsed() < SLEEP_AFTER {
                match deliveries.recv_timeout(STOP_POLL) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        break Some(Error::lost(amiquip::Error::EventLoopDropped));
                    }
                }
            } else {
                trace!("worker of queue '{queue}' idle: sleeping until a request comes");
                select! {
                    recv(deliveries) -> message => match message {
                        Ok(message) => message,
                        Err(_) => break Some(Error::lost(amiquip::Error::EventLoopDropped)),
                    },
                    // Nothing is ever sent: this ends when every sender is dropped, the stop
                    // signal.
                    recv(self.stop) -> _ => break None,
                }
            };
            last_request = Instant::now();
            match message {
                ConsumerMessage::Delivery(delivery) => match self.serve(delivery) {
                    Ok(key) => last_answered = key,
                    Err(error) => break Some(error),
                },
                ConsumerMessage::ServerCancelled => {
                    break Some(Error::ConsumerCancelled {
                        queue: queue.to_string(),
                    });
                }
                ConsumerMessage::ServerClosedChannel(error) => {
                    let error = Error::from_amqp(error);
                    if let (Error::Refused { text, .. }, Some(key)) = (&error, last_answered.take())
                    {
                        self.service.refused(key, refused_reply(text));
                    }
                    break Some(error);
                }
                ConsumerMessage::ServerClosedConnection(error) => {
                    break Some(Error::from_amqp(error));
                }
                _ => break Some(Error::lost(amiquip::Error::EventLoopDropped)),
            }
        };
        // No request is left: the drain need only wait for the broker's confirmations now.
        let _ = done_serving.send(self.number);
        // After a failure the cancel usually fails at once, on a dead connection; that is
        // fine, the supervisor closes it anyway. Deliveries that raced the cancel go back to
        // the queue, for another worker or server.
        let cancelled =
            crate::consumer::cancel(&consumer, &deliveries, Duration::from_secs(5), |delivery| {
                consumer.nack(delivery, true)
            });
        drop(consumer);
        match failure {
            Some(error) => Err(error),
            None => {
                cancelled?;
                self.channel.close()?;
                Ok(())
            }
        }
    }

    /// Answers one request, then acks it; returns its [`reply_key`] when a reply was sent.
    fn serve(&self, mut delivery: Delivery) -> Result<Option<String>> {
        // The body and properties move into the request; the rest of the delivery is kept for
        // the ack.
        let request = wire::request_from(
            std::mem::take(&mut delivery.body),
            std::mem::take(&mut delivery.properties),
            delivery.redelivered,
            &self.service.queue,
        );
        let queue = &self.service.queue;
        let metrics = &self.service.metrics;
        metrics.requests.inc();
        if request.is_redelivered() {
            metrics.redeliveries.inc();
        }
        let trace = request
            .trace_id()
            .map(|id| format!(", trace {id}"))
            .unwrap_or_default();
        debug!("request {:?} on '{queue}'{trace}", request.correlation_id());
        let Some(reply_to) = request.reply_to() else {
            match &request.undecodable {
                Some(why) => warn!(
                    "dropping a request on '{queue}' whose properties could not be decoded, \
                     leaving no reply_to to answer: {why}"
                ),
                None => warn!(
                    "dropping a request without reply_to (correlation id {:?}): nobody to \
                     answer",
                    request.correlation_id()
                ),
            }
            delivery.ack(&self.channel)?;
            return Ok(None);
        };
        if !reply_to_allowed(reply_to, &self.service.options.reply_to) {
            metrics.refused_reply_to.inc();
            warn!(
                "not answering request {:?} on '{queue}'{trace}: reply_to {reply_to:?} is not a \
                 queue a client could own (QueueOptions::reply_to lists the names answered)",
                request.correlation_id()
            );
            delivery.ack(&self.channel)?;
            return Ok(None);
        }
        if request.is_past_deadline() {
            metrics.skipped_past_deadline.inc();
            debug!(
                "skipping request {:?} on '{queue}': its deadline has passed, nobody waits",
                request.correlation_id()
            );
            delivery.ack(&self.channel)?;
            return Ok(None);
        }
        let key = reply_key(&request);
        let refused_before = request
            .is_redelivered()
            .then(|| lock(&self.service.refused).remove(&key))
            .flatten();
        let (outcome, counted) = match (&request.undecodable, refused_before) {
            // The log line of the error reply below says what happened, with what is known.
            (Some(why), _) => (
                Err(HandlerError::bad_request(format!(
                    "the request's properties could not be decoded: {why}"
                ))),
                None,
            ),
            (None, Some(message)) => (Err(HandlerError::failed(message)), None),
            (None, None) => self.answer_within_delivery_limit(&request, &key)?,
        };
        let correlation_id = request.correlation_id();
        let kind = outcome.as_ref().err().map(HandlerError::kind);
        let (body, properties) = match outcome {
            Ok(reply) => {
                let properties = wire::reply_properties(&reply, &request);
                (reply.into_body(), properties)
            }
            Err(error) => {
                warn!("answering request {correlation_id:?} on '{queue}' with an error: {error}");
                let properties = wire::error_properties(&error, &request);
                (error.message().as_bytes().to_vec(), properties)
            }
        };
        let published = self.channel.basic_publish(
            "",
            Publish {
                body: &body,
                routing_key: reply_to.to_string(),
                mandatory: false,
                immediate: false,
                properties: match &self.user {
                    Some(user) => properties.with_user_id(user.clone()),
                    None => properties,
                },
            },
        );
        // A publish only hands the reply to amiquip: the broker's refusal (a reply too large for
        // it, say) comes later, as the channel closing (see `run`), or as the ack failing when
        // the close came first (a worker slow to ack, on a loaded machine). Either way the
        // request comes back unacked; remembered, it is then answered with an error instead of
        // running again.
        let sent = published
            .and_then(|()| delivery.ack(&self.channel))
            .map_err(Error::from);
        if let Err(Error::Refused { text, .. }) = &sent {
            self.service.refused(key.clone(), refused_reply(text));
        }
        sent?;
        metrics.count_reply(kind);
        trace!("replied to {correlation_id:?}");
        if let (Some(counter), Some(counted)) = (&self.counter, counted) {
            // Answered: its count is done with. The queue would expire anyway.
            counter.forget(&counted)?;
        }
        Ok(Some(key))
    }

    /// The handler's answer to `request`, unless the request has been delivered as many
    /// times as [`QueueOptions::delivery_limit`] allows without being answered: then a
    /// `handler-failed` error, without running the handler. With the queue of a classic
    /// queue's count, when it was counted there.
    ///
    /// # Errors
    ///
    /// When counting fails: the broker refused it (then the request is answered with the
    /// reason when it comes back), or the connection is gone.
    fn answer_within_delivery_limit(
        &self,
        request: &Request,
        key: &str,
    ) -> Result<(std::result::Result<Reply, HandlerError>, Option<String>)> {
        let Some(limit) = self.service.options.delivery_limit else {
            return Ok((self.answer(request), None));
        };
        let (before, counted) = match (self.service.options.queue_type, &self.counter) {
            (QueueType::Quorum, _) => (quorum_deliveries_before(request), None),
            // First delivered: nothing to count, nothing to pay.
            (QueueType::Classic, _) if !request.is_redelivered() => (0, None),
            (QueueType::Classic, None) => return Ok((self.answer(request), None)),
            (QueueType::Classic, Some(counter)) => {
                let name = deliveries::counter_name(&self.service.queue, key);
                match counter.count(&name) {
                    // This delivery is counted too; every delivery before a redelivery is
                    // counted, but the first, which is not redelivered.
                    Ok(deliveries) => (deliveries, Some(name)),
                    Err(error) => {
                        if let Error::Refused { text, .. } = &error {
                            self.service.refused(
                                key.to_string(),
                                format!(
                                    "the broker refused to count the deliveries of this \
                                     request, which its queue's delivery limit needs: {text}"
                                ),
                            );
                        }
                        return Err(error);
                    }
                }
            }
        };
        if before < limit {
            return Ok((self.answer(request), counted));
        }
        self.service.metrics.over_delivery_limit.inc();
        let refusal = HandlerError::failed(format!(
            "this request was delivered {before} times without being answered (its servers \
             stopped or died while handling it), as many as its queue's delivery limit \
             allows: it is not run again"
        ));
        Ok((Err(refusal), counted))
    }

    /// The handler's answer, unless the body is over the queue's limit; a panic becomes a
    /// handler failure.
    fn answer(&self, request: &Request) -> std::result::Result<Reply, HandlerError> {
        let limit = self.service.options.max_body;
        if request.body().len() > limit {
            return Err(HandlerError::bad_request(format!(
                "the request body of {} bytes is over this server's limit of {limit} bytes",
                request.body().len()
            )));
        }
        let metrics = &self.service.metrics;
        metrics.busy.inc();
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.service.handler.handle(request)))
            .unwrap_or_else(|panic| {
                Err(HandlerError::failed(format!(
                    "the handler panicked: {}",
                    panic_message(&*panic)
                )))
            });
        metrics.handler_time.record(started.elapsed());
        metrics.busy.dec();
        let depth = outcome.as_ref().map_or(0, |reply| reply.headers.depth());
        if depth > MAX_HEADER_DEPTH {
            return Err(HandlerError::failed(format!(
                "the handler's reply has headers nested {depth} deep, deeper than the \
                 {MAX_HEADER_DEPTH} that clients accept"
            )));
        }
        outcome
    }
}

/// The message of a request whose reply the broker refused, for when it comes back.
fn refused_reply(text: &str) -> String {
    format!("the broker refused the reply to this request: {text}")
}

/// How many times the broker delivered a request of a quorum queue before, unanswered: its
/// `x-delivery-count` header, which the broker sets when it delivers a request again.
fn quorum_deliveries_before(request: &Request) -> u32 {
    request
        .header(DELIVERY_COUNT_HEADER)
        .and_then(HeaderValue::as_int)
        .map_or(0, |count| u32::try_from(count).unwrap_or(u32::MAX))
}

/// The header in which a quorum queue counts a message's earlier deliveries.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// What identifies a request across redeliveries, for [`Service::refused`] and
/// [`deliveries::counter_name`]: where its reply goes, and its correlation id.
fn reply_key(request: &Request) -> String {
    format!(
        "{}\n{}",
        request.reply_to().unwrap_or_default(),
        request.correlation_id().unwrap_or_default()
    )
}

/// The text of a panic's payload, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}
