//! The RPC client: publish a request, then wait on the reply consumer for the matching answer.
//!
//! Each [`Client`] has a channel (on a connection of its own, or on a [`SharedConnection`]) and
//! an exclusive, server-named reply queue that it consumes without acks, as the tutorial's
//! client does. A call publishes the request to the server queue with `reply_to` set to that
//! reply queue and a fresh uuid as
//! `correlation_id`, then loops over the consumer's messages, dropping every reply whose
//! `correlation_id` is not the call's own (a late answer to an earlier call that timed out, say).
//!
//! The request is published `mandatory`, so a request that no queue can take comes back at once
//! as [`Error::NoRoute`]; it also carries an `expiration` equal to the call's timeout, so the
//! broker drops it rather than have a server compute it for a caller who has given up.
//!
//! Replies come back through the client's own exclusive queue (the tutorial's way, and the
//! default) or through RabbitMQ's direct reply-to pseudo-queue ([`ReplyRoute`]), which saves
//! the broker a queue per client. The server does not need to know which.
//!
//! A `Client` is used from the thread that made it (its amiquip channel and consumer are not
//! `Send`). For many threads, give each its own `Client`: either each with a connection of its
//! own ([`Client::with_options`]), or all on one [`SharedConnection`], which is faster when
//! there are more threads than cores.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Connection, Consumer, ConsumerMessage, ConsumerOptions,
    Delivery, Publish, QueueDeclareOptions, Return,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, select};
use log::{debug, trace, warn};
use num_bigint::BigUint;
use uuid::Uuid;

use crate::connect::{Brokers, ConnectOptions};
use crate::error::{Error, Result};
use crate::shared::SharedConnection;

/// The server queue the tutorial uses.
pub const DEFAULT_QUEUE: &str = "rpc_queue";

/// The reply header in which a server puts an error message instead of a result.
pub const ERROR_HEADER: &str = "error";

/// How a [`Client`] connects and calls.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The queue the server consumes, used as the routing key on the default exchange.
    /// Default: [`DEFAULT_QUEUE`] (`rpc_queue`).
    pub queue: String,
    /// How long [`Client::call`] waits for a reply before it returns [`Error::Timeout`].
    /// Default: 10 s.
    pub timeout: Duration,
    /// Whether a request whose connection is lost before its reply arrives is sent again once
    /// the client has reconnected, within the call's timeout. Default: `false`.
    ///
    /// Safe only for idempotent requests (Fibonacci is): the lost request may already have
    /// been served, or may still be, so the server can run it twice.
    pub retry: bool,
    /// How replies come back. Default: [`ReplyRoute::ExclusiveQueue`].
    pub reply_route: ReplyRoute,
    /// TCP and AMQP connection settings (unused for a client on a [`SharedConnection`]).
    pub connect: ConnectOptions,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            queue: DEFAULT_QUEUE.to_string(),
            timeout: Duration::from_secs(10),
            retry: false,
            reply_route: ReplyRoute::default(),
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

/// How long a retrying call waits before it tries a refused broker again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Failures that a retrying call sends its request again after: the connection went, or a new
/// one could not be made yet.
fn is_retryable(error: &Error) -> bool {
    matches!(error, Error::ConnectionLost(_) | Error::Connect { .. })
}

/// The pseudo-queue of RabbitMQ's direct reply-to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

self_cell::self_cell!(
    /// A channel together with the reply consumer that borrows it.
    struct ReplyChannel {
        owner: Channel,
        #[covariant]
        dependent: Consumer,
    }
);

/// A blocking RPC client. See the [module documentation](self) for how a call works.
pub struct Client {
    source: Source,
    options: ClientOptions,
    session: Option<Session>,
}

/// Where a client gets its channel.
enum Source {
    /// A connection of its own, to one of these brokers.
    Own(Brokers),
    /// A channel on a shared connection.
    Shared(SharedConnection),
}

/// One channel's worth of client state; replaced as a whole when the connection is lost.
struct Session {
    /// `None` once closed. Dropped before `connection`, so the channel closes on a live
    /// connection.
    reply_channel: Option<ReplyChannel>,
    /// A clone of the consumer's receiver, kept for [`Session::close`] to drain.
    replies: Receiver<ConsumerMessage>,
    returns: Receiver<Return>,
    reply_to: String,
    /// The server queue, as the routing key of requests.
    queue: String,
    /// The client's own connection; `None` on a shared one.
    connection: Option<Connection>,
}

impl Client {
    /// Connects to the broker at `url` with default [`ClientOptions`].
    ///
    /// # Errors
    ///
    /// See [`Client::with_options`].
    pub fn connect(url: &str) -> Result<Client> {
        Client::with_options(url, ClientOptions::default())
    }

    /// Connects to the broker at `url` and sets up the reply queue. `url` may list several
    /// brokers (the nodes of a cluster) separated by commas: the client connects to the first
    /// that answers and, after losing a connection, to whichever answers next.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a bad URL or refused credentials, [`Error::Connect`] when the
    /// broker cannot be reached, [`Error::Amqp`] when it refuses the reply queue.
    pub fn with_options(url: &str, options: ClientOptions) -> Result<Client> {
        Client::from_source(Source::Own(Brokers::parse(url)?), options)
    }

    /// A client on a channel of `shared`; see [`SharedConnection::client`].
    pub(crate) fn on_shared(shared: SharedConnection, options: ClientOptions) -> Result<Client> {
        Client::from_source(Source::Shared(shared), options)
    }

    fn from_source(source: Source, options: ClientOptions) -> Result<Client> {
        let session = Session::open(&source, &options)?;
        Ok(Client {
            source,
            options,
            session: Some(session),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Sends `request` to the server queue and returns the reply body, waiting at most the
    /// client's default timeout.
    ///
    /// # Errors
    ///
    /// See [`Client::call_with_timeout`].
    pub fn call(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        self.call_with_timeout(request, self.options.timeout)
    }

    /// Sends `request` to the server queue and returns the reply body, waiting at most
    /// `timeout`.
    ///
    /// When an earlier call lost the connection, this one first connects again; with
    /// [`ClientOptions::retry`], see [`Client::call_many`].
    ///
    /// # Errors
    ///
    /// - [`Error::Timeout`]: no reply within `timeout`;
    /// - [`Error::NoRoute`]: no queue is bound to the server queue's name;
    /// - [`Error::Remote`]: the server replied with an error message;
    /// - [`Error::ConnectionLost`]: the connection died while the call waited;
    /// - the errors of [`Client::with_options`] when reconnecting fails.
    pub fn call_with_timeout(&mut self, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.call_many(&[request], timeout)
            .pop()
            .expect("one outcome per request")
    }

    /// Sends all `requests` at once, then waits for their replies, at most `timeout` in all;
    /// returns one outcome per request, in request order.
    ///
    /// Keeping many requests in flight from one thread is much faster than calling one by one:
    /// the broker and the server's workers are kept busy while replies travel back.
    ///
    /// When an earlier call lost the connection, this one first connects again. With
    /// [`ClientOptions::retry`], requests whose connection is lost before their reply arrives
    /// are sent again once the client has reconnected, until the deadline.
    ///
    /// # Errors
    ///
    /// Each outcome has the errors of [`Client::call_with_timeout`].
    pub fn call_many(&mut self, requests: &[&[u8]], timeout: Duration) -> Vec<Result<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut outcomes: Vec<Option<Result<Vec<u8>>>> = requests.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..requests.len()).collect();
        while !pending.is_empty() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut refused = false;
            let attempt = match self.session() {
                Ok(session) => {
                    let batch: Vec<&[u8]> = pending.iter().map(|&index| requests[index]).collect();
                    session.call_many(&batch, remaining)
                }
                Err(error) => {
                    refused = true;
                    pending.iter().map(|_| Err(error.duplicate())).collect()
                }
            };
            // A lost connection, or a channel the broker closed, leaves nothing to call on.
            if attempt
                .iter()
                .any(|outcome| matches!(outcome, Err(Error::ConnectionLost(_) | Error::Amqp(_))))
            {
                self.session = None;
            }
            let mut again = Vec::new();
            for (index, outcome) in pending.into_iter().zip(attempt) {
                match outcome {
                    Err(error) if self.options.retry && is_retryable(&error) => again.push(index),
                    // A timeout names the call's whole timeout, not the last attempt's share.
                    Err(Error::Timeout(_)) => outcomes[index] = Some(Err(Error::Timeout(timeout))),
                    outcome => outcomes[index] = Some(outcome),
                }
            }
            pending = again;
            if !pending.is_empty() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    for &index in &pending {
                        outcomes[index] = Some(Err(Error::Timeout(timeout)));
                    }
                    break;
                }
                debug!(
                    "retrying {} requests after a lost connection",
                    pending.len()
                );
                if refused {
                    // Do not hammer brokers that refuse connections.
                    std::thread::sleep(remaining.min(RETRY_PAUSE));
                }
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every request has an outcome"))
            .collect()
    }

    /// The current session, connecting again if the last one was lost.
    fn session(&mut self) -> Result<&mut Session> {
        match &mut self.session {
            Some(session) => Ok(session),
            empty => {
                debug!("connecting again after a lost connection");
                Ok(empty.insert(Session::open(&self.source, &self.options)?))
            }
        }
    }

    /// Asks the server for fib(`n`), with the tutorial's wire format: `n` in decimal out, the
    /// result in decimal back.
    ///
    /// # Errors
    ///
    /// Those of [`Client::call`], and [`Error::InvalidReply`] when the reply is not a decimal
    /// number.
    pub fn fib(&mut self, n: u64) -> Result<BigUint> {
        let reply = self.call(n.to_string().as_bytes())?;
        BigUint::parse_bytes(&reply, 10).ok_or_else(|| {
            Error::InvalidReply(format!(
                "expected a decimal number, got {:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(40)])
            ))
        })
    }

    /// Cancels the reply consumer and closes the connection, reporting any error. Dropping a
    /// `Client` does the same quietly.
    ///
    /// # Errors
    ///
    /// [`Error::ConnectionLost`] or [`Error::Amqp`] when the broker does not confirm the close.
    pub fn close(mut self) -> Result<()> {
        match self.session.take() {
            Some(mut session) => session.close(),
            None => Ok(()),
        }
    }
}

impl Session {
    fn open(source: &Source, options: &ClientOptions) -> Result<Session> {
        let (channel, connection) = match source {
            Source::Own(brokers) => {
                let mut connection = brokers.connect(&options.connect)?;
                (connection.open_channel(None)?, Some(connection))
            }
            Source::Shared(shared) => (shared.open_channel()?, None),
        };
        let returns = channel.listen_for_returns()?;
        let reply_to = match options.reply_route {
            ReplyRoute::ExclusiveQueue => {
                let queue = channel.queue_declare(
                    "",
                    QueueDeclareOptions {
                        exclusive: true,
                        ..QueueDeclareOptions::default()
                    },
                )?;
                queue.name().to_string()
            }
            ReplyRoute::DirectReplyTo => DIRECT_REPLY_TO.to_string(),
        };
        // Direct reply-to requires consuming, without acks, before the first publish.
        let reply_channel = ReplyChannel::try_new(channel, |channel| {
            channel.basic_consume(
                reply_to.clone(),
                ConsumerOptions {
                    no_ack: true,
                    exclusive: options.reply_route == ReplyRoute::ExclusiveQueue,
                    ..ConsumerOptions::default()
                },
            )
        })?;
        let replies = reply_channel.borrow_dependent().receiver().clone();
        debug!("client ready, replies to {reply_to}");
        Ok(Session {
            reply_channel: Some(reply_channel),
            replies,
            returns,
            reply_to,
            queue: options.queue.clone(),
            connection,
        })
    }

    fn call_many(&mut self, requests: &[&[u8]], timeout: Duration) -> Vec<Result<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut outcomes: Vec<Option<Result<Vec<u8>>>> = requests.iter().map(|_| None).collect();
        let mut waiting = HashMap::with_capacity(requests.len());
        let mut failure = None;
        for (index, request) in requests.iter().enumerate() {
            let correlation_id = Uuid::new_v4().to_string();
            if let Err(error) = self.publish(request, &correlation_id, timeout) {
                failure = Some(error);
                break;
            }
            waiting.insert(correlation_id, index);
        }
        if failure.is_none() && !waiting.is_empty() {
            let received = self.receive_until(deadline, timeout, |id, answer| {
                match waiting.remove(id) {
                    Some(index) => outcomes[index] = Some(answer),
                    None => debug!("dropping a reply that is not ours: correlation id {id:?}"),
                }
                waiting.is_empty()
            });
            failure = received.err();
        }
        // The first unanswered request carries the cause; the others get a timeout or, when the
        // session broke, a lost connection of their own.
        let broken = failure.as_ref().is_some_and(|error| !error.is_timeout());
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(failure.take().unwrap_or_else(|| {
                        if broken {
                            Error::lost(amiquip::Error::EventLoopDropped)
                        } else {
                            Error::Timeout(timeout)
                        }
                    }))
                })
            })
            .collect()
    }

    fn publish(&self, request: &[u8], correlation_id: &str, timeout: Duration) -> Result<()> {
        let properties = AmqpProperties::default()
            .with_reply_to(self.reply_to.clone())
            .with_correlation_id(correlation_id.to_string())
            // "0" would expire the request at once; RabbitMQ counts in whole milliseconds.
            .with_expiration(timeout.as_millis().max(1).to_string());
        let Some(reply_channel) = &self.reply_channel else {
            return Err(Error::lost(amiquip::Error::ClientClosedChannel));
        };
        reply_channel.borrow_owner().basic_publish(
            "",
            Publish {
                body: request,
                routing_key: self.queue.clone(),
                mandatory: true,
                immediate: false,
                properties,
            },
        )?;
        trace!("published request {correlation_id} to {}", self.queue);
        Ok(())
    }

    /// Reads replies and returned requests, handing each with its correlation id to `accept`,
    /// until `accept` says it has all it waits for, or `deadline` passes ([`Error::Timeout`]), or
    /// the connection goes ([`Error::ConnectionLost`]).
    fn receive_until(
        &self,
        deadline: Instant,
        timeout: Duration,
        mut accept: impl FnMut(&str, Result<Vec<u8>>) -> bool,
    ) -> Result<()> {
        // Waiting on the reply channel alone costs far less than `select!` over it and the
        // returns channel (a third of the futex calls; about a tenth more calls per second).
        // Replies usually follow each other closely, so wait on them alone until one is QUICK
        // late; a returned request is then seen by the `select!` below, QUICK after the publish.
        const QUICK: Duration = Duration::from_millis(5);
        loop {
            let quick_deadline = deadline.min(Instant::now() + QUICK);
            match self.replies.recv_deadline(quick_deadline) {
                Ok(message) => {
                    if on_reply(message, &mut accept)? {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::lost(amiquip::Error::EventLoopDropped));
                }
            }
        }
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let done = select! {
                recv(self.replies) -> message => match message {
                    Ok(message) => on_reply(message, &mut accept)?,
                    Err(_) => return Err(Error::lost(amiquip::Error::EventLoopDropped)),
                },
                recv(self.returns) -> returned => match returned {
                    Ok(returned) => {
                        let id = returned.properties.correlation_id().clone().unwrap_or_default();
                        debug!("request {id} returned: {}", returned.reply_text);
                        accept(&id, Err(Error::NoRoute { queue: returned.routing_key }))
                    }
                    Err(_) => return Err(Error::lost(amiquip::Error::EventLoopDropped)),
                },
                default(remaining) => return Err(Error::Timeout(timeout)),
            };
            if done {
                return Ok(());
            }
        }
    }

    /// Cancels the consumer, reads its receiver until the broker confirms the cancel (see
    /// `shared/amiquip-notes.md`: dropping a consumer before that can kill the connection), then
    /// closes the channel, or the connection when it is the client's own.
    fn close(&mut self) -> Result<()> {
        let Some(reply_channel) = self.reply_channel.take() else {
            return Ok(());
        };
        let cancelled = reply_channel.borrow_dependent().cancel();
        if cancelled.is_ok() {
            let give_up = Instant::now() + Duration::from_secs(2);
            while let Ok(message) = self.replies.recv_deadline(give_up) {
                if !matches!(message, ConsumerMessage::Delivery(_)) {
                    break;
                }
            }
        }
        let channel = reply_channel.into_owner();
        let closed = match self.connection.take() {
            Some(connection) => {
                drop(channel);
                connection.close()
            }
            None => channel.close(),
        };
        cancelled.and(closed).map_err(Error::from)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            debug!("closing the client quietly: {error}");
        }
    }
}

/// Hands a reply to `accept` with its correlation id, and returns what `accept` says (whether
/// the caller has all it waits for); a consumer that ended means the connection is gone.
fn on_reply(
    message: ConsumerMessage,
    accept: &mut impl FnMut(&str, Result<Vec<u8>>) -> bool,
) -> Result<bool> {
    match message {
        ConsumerMessage::Delivery(delivery) => {
            let id = delivery
                .properties
                .correlation_id()
                .clone()
                .unwrap_or_default();
            trace!("reply to {id} arrived");
            Ok(accept(&id, reply_outcome(delivery)))
        }
        other => Err(consumer_ended(other)),
    }
}

/// Turns the matching reply into the call's result: its body, or the server's error message.
fn reply_outcome(delivery: Delivery) -> Result<Vec<u8>> {
    let error = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.get(ERROR_HEADER));
    match error {
        None => Ok(delivery.body),
        Some(AmqpValue::LongString(message)) => Err(Error::Remote(message.clone())),
        Some(other) => {
            warn!("the server's error header is not a string: {other:?}");
            Err(Error::Remote(format!("{other:?}")))
        }
    }
}

/// Explains why the reply consumer stopped delivering.
fn consumer_ended(message: ConsumerMessage) -> Error {
    match message {
        ConsumerMessage::ServerClosedConnection(error)
        | ConsumerMessage::ServerClosedChannel(error) => Error::lost(error),
        ConsumerMessage::ClientClosedConnection => {
            Error::lost(amiquip::Error::ClientClosedConnection)
        }
        ConsumerMessage::ClientClosedChannel
        | ConsumerMessage::ClientCancelled
        | ConsumerMessage::ServerCancelled
        | ConsumerMessage::Delivery(_) => Error::lost(amiquip::Error::ClientClosedChannel),
    }
}
