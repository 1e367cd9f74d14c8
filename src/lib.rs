//! A blocking RPC client and server over RabbitMQ, in the shape of RabbitMQ's "RPC" tutorial.
//!
//! A service is a function from a [`Request`] (body, headers, properties) to a [`Reply`]; a
//! server serves one or more queues, each with its own function and workers, reached by the
//! queue's name or through exchanges; a client sends a [`Call`] to any of them
//! ([`Call::to`]) and blocks until the reply. With the `json` feature (on by default), bodies
//! can be typed:
//!
//! ```no_run
//! # #[cfg(feature = "json")]
//! # fn main() -> amqp_rpc::Result<()> {
//! use amqp_rpc::{
//!     Binding, Call, Client, Destination, HandlerError, QueueOptions, Request, Server, fib, json,
//! };
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { item: String, quantity: u32 }
//! #[derive(Serialize, Deserialize)]
//! struct Receipt { accepted: bool, for_tenant: String }
//!
//! let url = amqp_rpc::DEFAULT_URL;
//! let server = Server::builder(url)
//!     .serve("shop.order", QueueOptions::default(), json::handler(
//!         |order: Order, request: &Request| {
//!             let tenant = request.header_str("x-tenant")
//!                 .ok_or_else(|| HandlerError::bad_request("no x-tenant header"))?;
//!             Ok(Receipt { accepted: order.quantity > 0, for_tenant: tenant.to_string() })
//!         },
//!     ))
//!     // Also reached through the topic exchange "services", with routing key "math.fib".
//!     .serve("math.fib", QueueOptions {
//!         bindings: vec![Binding::topic("services", "math.fib")],
//!         ..QueueOptions::default()
//!     }, |request: &Request| fib::handle_request(request.body(), fib::DEFAULT_MAX_N))
//!     .start()?;
//!
//! // One client calls both: each call names where it goes.
//! let client = Client::connect(url)?;
//! let order = Order { item: "tea".into(), quantity: 2 };
//! let reply = client.send(&Call::json(&order)?.to("shop.order").with_header("x-tenant", "acme"))?;
//! let receipt: Receipt = reply.json()?;
//! assert!(receipt.accepted);
//! let fib = client.send(&Call::new("30").to(Destination::exchange("services", "math.fib")))?;
//! assert_eq!(fib.body(), b"832040");
//!
//! client.close()?;
//! server.shutdown()
//! # }
//! # #[cfg(not(feature = "json"))]
//! # fn main() {}
//! ```
//!
//! The tutorial's Fibonacci service is a byte handler, one line long, and speaks the
//! tutorial's wire format, so its peers in other languages interoperate:
//!
//! ```no_run
//! use amqp_rpc::{Client, Request, Server, fib};
//!
//! # fn main() -> amqp_rpc::Result<()> {
//! let url = amqp_rpc::DEFAULT_URL;
//! let server = Server::start(url, amqp_rpc::DEFAULT_QUEUE, |request: &Request| {
//!     fib::handle_request(request.body(), fib::DEFAULT_MAX_N)
//! })?;
//!
//! let client = Client::connect(url)?;
//! assert_eq!(client.fib(30)?.to_string(), "832040");
//! assert_eq!(client.call(b"10")?, b"55");
//!
//! client.close()?;
//! server.shutdown()
//! # }
//! ```
//!
//! # Why blocking
//!
//! For teams that do not want an async runtime: every call here blocks the calling thread,
//! like pika's `BlockingConnection`, and works from ordinary threads. The AMQP protocol work
//! happens on amiquip's I/O thread, one per connection.
//!
//! # Design
//!
//! - [`Client`]: `Send + Sync` and cheap to clone; all clones share one connection, one
//!   channel and one exclusive reply queue (or direct reply-to, [`ReplyRoute`]), whatever the
//!   number of calling threads. A call publishes the request with `reply_to` and a fresh uuid
//!   `correlation_id`; the waiting callers take turns reading the replies and handing each to
//!   the call that awaits it, dropping others. A call fails with [`Error::Timeout`] after its
//!   timeout (even when the broker has stopped answering), at once with [`Error::NoRoute`]
//!   when no server queue exists, and with [`Error::Blocked`] while the broker blocks
//!   publishers for a resource alarm. [`Client::send_many`] keeps many calls in flight from
//!   one thread. With [`ClientOptions::retry`], calls cut off by a lost connection are sent
//!   again after reconnecting.
//! - [`Server`]: a supervisor thread owns the connection and, for each queue, a pool of worker
//!   threads, each with its own channel and `qos(1)`. A worker calls its queue's [`Handler`],
//!   publishes the reply, then acks. Handler errors and panics become error replies. Lost
//!   connections are re-established with backoff, and every queue declared again. Each queue
//!   is classic (as the tutorial's) or quorum ([`QueueType`]), with a delivery limit for
//!   requests that keep killing servers.
//! - Connections are opened with `TCP_NODELAY`, without which each call waits about 40 ms on
//!   Nagle's algorithm. Every URL argument may list several brokers (a cluster's nodes)
//!   separated by commas: the first that answers is used, and after a loss the next.
//! - Statistics are always on and cost a few atomic operations per call: [`Client::stats`],
//!   [`Server::stats`], [`Server::health`], and a Prometheus `/metrics` and `/health` endpoint
//!   ([`ServerOptions::metrics_addr`]). W3C `traceparent`/`tracestate` headers travel from a
//!   call to its handler and back on the reply.
//! - Everything the broker delivers may come from a stranger: every frame is checked before
//!   amiquip parses it, without recursion. A message whose properties cannot be read as they
//!   came (headers nested deeper than [`MAX_HEADER_DEPTH`], a short string that is not UTF-8)
//!   is refused: a server answers it with a `bad-request` error reply, a client fails its call
//!   with [`Error::InvalidReply`]. No message kills, hangs or wedges a process, and amiquip's
//!   I/O thread needs no larger stack than the default, whatever the broker's frame size.
//! - [`fib`]: exact Fibonacci numbers by fast doubling, and the tutorial's handler.
//! - [`json`]: typed payloads (feature `json`).
//!
//! The wire format is the tutorial's: a request goes to the server queue with `reply_to` and
//! `correlation_id`, and its reply comes back with the same `correlation_id`. Headers and
//! properties are optional; requests carry their deadline in [`DEADLINE_HEADER`]; an error
//! reply carries its message in the [`ERROR_HEADER`] header and its kind in
//! [`ERROR_KIND_HEADER`].
//!
//! # Read on
//!
//! The repository's `docs/` folder has the rest, each fact in one place:
//! `docs/guide.md` (using the library: services, calls, threads, typed payloads, several
//! services, the examples), `docs/protocol.md` (the wire protocol, every field, for a peer in
//! another language), `docs/failures.md` (why a call fails, what the server does with each
//! fault, hostile messages), `docs/operations.md` (configuration, TLS and security, least
//! privilege, observability, clustering), `docs/performance.md` (how to measure, and the
//! figures), `docs/design.md` (how it works inside, and the tests) and `docs/amiquip.md` (what
//! this crate relies on in amiquip). `CHANGELOG.md` says what changed in each version.
//!
//! # Features
//!
//! - `json` (default): serde and serde_json, for [`json`], [`Call::json`], [`Reply::json`] and
//!   [`Client::call_json`].
//! - `cli` (default): the `client` and `server` binaries' own dependencies (clap, env_logger,
//!   signal-hook). A library user can turn it off with `default-features = false`.
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]

mod broker_url;
mod client;
mod client_options;
mod connect;
mod consumer;
mod deliveries;
mod destination;
mod endpoint;
mod error;
pub mod fib;
mod headers;
mod inbound;
#[cfg(feature = "json")]
pub mod json;
mod message;
mod probe;
mod server;
mod server_options;
mod service;
mod session;
mod stats;
mod supervisor;
mod sync;
mod wire;
mod worker;

/// The code blocks of the README and of `docs/`, compiled (and those not marked `no_run`, run)
/// as doctests, so that they cannot drift from the code.
#[cfg(doctest)]
mod markdown {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/guide.md")]
    struct Guide;
    #[doc = include_str!("../docs/protocol.md")]
    struct Protocol;
    #[doc = include_str!("../docs/failures.md")]
    struct Failures;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/performance.md")]
    struct Performance;
    #[doc = include_str!("../docs/design.md")]
    struct Design;
    #[doc = include_str!("../docs/amiquip.md")]
    struct Amiquip;
}

pub use client::Client;
pub use client_options::{ClientOptions, DEFAULT_MAX_REPLY, ReplyRoute};
pub use connect::{AMIQUIP_HANDSHAKE_LOG_TARGET, ConnectOptions, DEFAULT_URL, TlsOptions};
pub use destination::{Binding, Destination, ExchangeKind};
pub use error::{Error, QueueState, Result};
pub use headers::{HeaderValue, Headers, MAX_HEADER_DEPTH, TRACEPARENT_HEADER, TRACESTATE_HEADER};
pub use message::{Call, FailureKind, HandlerError, Reply, Request};
pub use server::{Server, ServerBuilder, ShutdownHandle};
pub use server_options::{
    DEFAULT_MAX_BODY, DEFAULT_REPLY_TO, QueueOptions, QueueType, ServerOptions, default_workers,
};
pub use service::Handler;
pub use stats::{
    ClientStats, ErrorCounts, Health, KindCounts, Latency, QueueStats, ReplyCounts, ServerStats,
};
pub use wire::{
    DEADLINE_HEADER, DEFAULT_QUEUE, ERROR_HEADER, ERROR_KIND_HEADER, JSON_CONTENT_TYPE,
};
