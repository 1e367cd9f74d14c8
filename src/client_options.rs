//! How a [`Client`](crate::Client) connects and calls: [`ClientOptions`] and [`ReplyRoute`].
//!
//! A module of its own so that the client and its sessions both read the options without
//! importing each other.

use std::time::Duration;

use crate::connect::ConnectOptions;
use crate::wire::DEFAULT_QUEUE;

/// How a [`Client`](crate::Client) connects and calls.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Where calls go when they do not name a destination ([`Call::to`]): the queue the
    /// server consumes, reached through the default exchange. Default: [`DEFAULT_QUEUE`]
    /// (`rpc_queue`).
    ///
    /// [`Call::to`]: crate::Call::to
    pub queue: String,
    /// How long a call waits for its reply before it returns [`Error::Timeout`], unless the
    /// call sets its own ([`Call::with_timeout`]). Default: 10 s.
    ///
    /// [`Error::Timeout`]: crate::Error::Timeout
    /// [`Call::with_timeout`]: crate::Call::with_timeout
    pub timeout: Duration,
    /// Whether a request whose connection is lost before its reply arrives is sent again once
    /// the client has reconnected, within the call's timeout. Default: `false`.
    ///
    /// Safe only for idempotent requests (Fibonacci is): the lost request may already have
    /// been served, or may still be, so the server can run it twice.
    pub retry: bool,
    /// How replies come back. Default: [`ReplyRoute::ExclusiveQueue`].
    pub reply_route: ReplyRoute,
    /// How long a call waits before it asks the broker whether any server consumes the server
    /// queue; when none does and requests wait in it, the call asks once more a second later,
    /// and if still none does, fails with [`Error::NoServer`] instead of waiting out its whole
    /// timeout. (When none consumes but the queue is empty, the request was taken by a server
    /// that is draining: the call waits for its reply.) A server that restarts within the
    /// grace fails nothing, nor does one that consumes nothing for less than a second when the
    /// grace runs out (replacing a worker whose channel the broker closed, say). The broker is
    /// asked only for calls still unanswered after the grace, about each queue on its own and
    /// at most once a second each. `Duration::ZERO` turns the check off. Default: 1 s.
    ///
    /// [`Error::NoServer`]: crate::Error::NoServer
    pub no_server_grace: Duration,
    /// The most calls this client (all its clones together) keeps in flight; a call past the
    /// limit fails at once with [`Error::Overloaded`] instead of queueing without bound.
    /// Default: `None`, no limit.
    ///
    /// [`Error::Overloaded`]: crate::Error::Overloaded
    pub max_in_flight: Option<usize>,
    /// The user the servers run as. When set, only replies whose `user_id` names this user
    /// are accepted (the broker refuses a `user_id` that is not the publishing connection's
    /// user, so it cannot be forged); any other reply is dropped, counted
    /// ([`ClientStats::rejected_replies`]) and logged at warn, and its call goes on waiting
    /// for the real one. Default: `None`, every reply with the awaited `correlation_id` is
    /// accepted, as the tutorial's peers expect (they set no `user_id`).
    ///
    /// [`ClientStats::rejected_replies`]: crate::ClientStats::rejected_replies
    pub server_user: Option<String>,
    /// The largest reply body accepted, in bytes; a larger reply fails its call with
    /// [`Error::InvalidReply`]. Default: 4 MiB (fib(10,000,000)'s 2 MB reply passes).
    ///
    /// [`Error::InvalidReply`]: crate::Error::InvalidReply
    pub max_reply: usize,
    /// TCP and AMQP connection settings.
    pub connect: ConnectOptions,
}

/// The default [`ClientOptions::max_reply`]: 4 MiB.
pub const DEFAULT_MAX_REPLY: usize = 4 * 1024 * 1024;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            queue: DEFAULT_QUEUE.to_string(),
            timeout: Duration::from_secs(10),
            retry: false,
            reply_route: ReplyRoute::default(),
            no_server_grace: Duration::from_secs(1),
            max_in_flight: None,
            max_reply: DEFAULT_MAX_REPLY,
            server_user: None,
            connect: ConnectOptions::default(),
        }
    }
}

/// Where a server's replies are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyRoute {
    /// An exclusive, server-named queue per client, deleted with its connection (the tutorial).
    #[default]
    ExclusiveQueue,
    /// RabbitMQ's `amq.rabbitmq.reply-to` pseudo-queue: no queue to declare, replies go straight
    /// to the client's channel. A reply whose client has gone is dropped by the broker.
    DirectReplyTo,
}
