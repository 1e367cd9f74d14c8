//! The RPC server, as a program uses it: a [`ServerBuilder`] collects the queues to serve,
//! each with its [`Handler`] and [`QueueOptions`], and starts a [`Server`], which serves until
//! it is shut down (a [`ShutdownHandle`] asks from any thread).
//!
//! Behind it, a supervisor thread owns the connection (`supervisor.rs`: connecting,
//! declaring, reconnecting, draining), and for each queue a pool of workers, each with its own
//! channel and `qos(1)`, takes one request at a time (`worker.rs`: one request's path, from the
//! delivery to the ack). A request whose worker dies before the ack is redelivered by the
//! broker to another worker; a handler's error or panic becomes an error reply.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Sender, bounded};
use log::{info, warn};

use crate::connect::{Brokers, without_password};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::server_options::{QueueOptions, ServerOptions};
use crate::service::{Handler, Service};
use crate::stats::{Health, ServerMetrics, ServerStats};
use crate::supervisor::Supervisor;
use crate::sync::lock;
use crate::worker::Stop;

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
