//! A blocking RPC client and server over RabbitMQ, in the shape of RabbitMQ's "RPC" tutorial.
//!
//! ```no_run
//! use amqp_rpc::{Client, Server, ServerOptions, fib};
//!
//! # fn main() -> amqp_rpc::Result<()> {
//! let url = amqp_rpc::DEFAULT_URL;
//! let max_n = fib::DEFAULT_MAX_N;
//! let server = Server::start(url, ServerOptions::default(), move |request: &[u8]| {
//!     fib::handle_request(request, max_n)
//! })?;
//!
//! let mut client = Client::connect(url)?;
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
//! - [`Client`]: one connection, one channel, one exclusive reply queue. A call publishes the
//!   request with `reply_to` and a fresh uuid `correlation_id`, then reads replies until the one
//!   with its `correlation_id` arrives, dropping others. It fails with [`Error::Timeout`] after
//!   its timeout and at once with [`Error::NoRoute`] when no server queue exists.
//!   [`Client::call_many`] keeps many calls in flight from one thread. A client stays on the
//!   thread that made it; for several threads, make one client per thread on a
//!   [`SharedConnection`]. Replies come through an exclusive queue or direct reply-to
//!   ([`ReplyRoute`]). With [`ClientOptions::retry`], calls cut off by a lost connection are sent
//!   again after reconnecting.
//! - [`Server`]: a supervisor thread owns the connection and a pool of worker threads, each with
//!   its own channel and `qos(1)`. A worker calls the [`Handler`] (bytes in, bytes out),
//!   publishes the reply, then acks. Handler errors and panics become error replies. Lost
//!   connections are re-established with backoff. The queue is classic (as the tutorial's) or
//!   quorum ([`QueueType`]), with a delivery limit for requests that keep killing servers.
//! - [`connect`]: opens connections with `TCP_NODELAY`, without which each call waits about
//!   40 ms on Nagle's algorithm. Every URL argument may list several brokers (a cluster's nodes)
//!   separated by commas: the first that answers is used, and after a loss the next.
//! - [`bench`](mod@bench): the load generator behind `client --bench`.
//! - [`fib`]: exact Fibonacci numbers by fast doubling, and the tutorial's handler.
//!
//! The wire format is the tutorial's, so peers in other languages interoperate: the request body
//! is `n` in decimal, the reply body the result in decimal; an error reply carries its message
//! in the `error` header.
#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod connect;
pub mod error;
pub mod fib;
pub mod server;
pub mod shared;

pub use client::{Client, ClientOptions, DEFAULT_QUEUE, ReplyRoute};
pub use connect::{ConnectOptions, DEFAULT_URL};
pub use error::{Error, Result};
pub use server::{Handler, QueueType, Server, ServerOptions, ShutdownHandle};
pub use shared::SharedConnection;
