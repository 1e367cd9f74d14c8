//! A server's supervisor: the thread that owns the connection. It connects (to the first
//! broker of a list that answers), declares every queue, exchange and binding, opens a channel
//! for each worker and starts it, watches the workers (replacing one whose channel alone the
//! broker closed), and reconnects with exponential backoff when the connection is lost; on
//! shutdown it drains the workers within bounds and closes the connection.

use std::collections::HashSet;
use std::net::{Shutdown, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use amiquip::{
    AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable,
    QueueDeclareOptions,
};
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use log::{debug, info, warn};

use crate::connect::{self, Brokers, Connected};
use crate::deliveries::DeliveryCounter;
use crate::destination::ExchangeKind;
use crate::error::{Error, Result};
use crate::server_options::{QueueOptions, QueueType, ServerOptions};
use crate::service::Service;
use crate::stats::{Health, ServerMetrics};
use crate::sync::{deadline_after, lock};
use crate::worker::{Stop, Worker, is_stopped, panic_message};

/// Owns the connection: (re)connects, starts workers, watches them, and shuts down.
pub(crate) struct Supervisor {
    pub(crate) brokers: Arc<Brokers>,
    pub(crate) options: ServerOptions,
    pub(crate) services: Vec<Arc<Service>>,
    pub(crate) stop: Receiver<Stop>,
    pub(crate) metrics: Arc<ServerMetrics>,
    pub(crate) health: Arc<Mutex<Health>>,
}

/// How one connection's session ended.
enum SessionEnd {
    /// Shutdown was asked for and completed.
    Stopped,
    /// The connection (or a channel on it) failed; reconnecting may help.
    Lost(Error),
}

impl Supervisor {
    pub(crate) fn run(self, started: Sender<Result<()>>) -> Result<()> {
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
