//! How a server connects and serves: [`ServerOptions`] for the whole server, [`QueueOptions`]
//! for each queue it serves, and their defaults.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use crate::connect::ConnectOptions;
use crate::destination::Binding;

/// How a [`Server`](crate::Server) connects and recovers; shared by all its queues.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The longest wait between two reconnection attempts. Default: 30 s.
    pub max_reconnect_delay: Duration,
    /// How long [`Server::shutdown`](crate::Server::shutdown) (and dropping a server) lets the requests in flight
    /// finish; the ones still running then go back to the queue, for another server. Once
    /// none is left, the broker has 5 s more to confirm that the workers stopped consuming,
    /// and 5 s to confirm the close. Default: 30 s.
    pub drain_timeout: Duration,
    /// Where to serve `/metrics` (Prometheus text exposition) and `/health` (200 only while
    /// serving) over HTTP; port 0 picks a free port ([`Server::metrics_addr`](crate::Server::metrics_addr) tells which).
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
    ///   server's user needs the configure permission on those queues (see the
    ///   least-privilege table of `docs/operations.md`); when the broker refuses one, the request is answered with
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
pub(crate) fn reply_to_allowed(reply_to: &str, patterns: &[String]) -> bool {
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
