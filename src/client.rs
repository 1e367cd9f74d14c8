//! The RPC client: publish a request, then wait on the reply consumer for the matching answer.
//!
//! Each [`Client`] has a channel (on a connection of its own, or on a [`SharedConnection`]) and
//! an exclusive, server-named reply queue that it consumes without acks, as the tutorial's
//! client does. A call publishes the request to the server queue with `reply_to` set to that
//! reply queue and a fresh uuid as `correlation_id`, then loops over the consumer's messages,
//! dropping every reply whose `correlation_id` is not awaited (a late answer to an earlier
//! call that timed out, say).
//!
//! The request is published `mandatory`, so a request that no queue can take comes back at once
//! as [`Error::NoRoute`]; it also carries an `expiration` equal to the call's timeout, so the
//! broker drops it rather than have a server compute it for a caller who has given up.
//!
//! Replies come back through the client's own exclusive queue (the tutorial's way, and the
//! default) or through RabbitMQ's direct reply-to pseudo-queue ([`ReplyRoute`]), which saves
//! the broker a queue per client. The server does not need to know which.
//!
//! Every call, single or batched, goes through one loop ([`Client::send_many`]): the calls not
//! yet answered are published on the current session, their replies collected until each is
//! answered or its own deadline passes, and, when the session breaks and retry is on, the
//! unanswered ones are sent again on the next session.
//!
//! A `Client` is used from the thread that made it (its amiquip channel and consumer are not
//! `Send`). For many threads, give each its own `Client`: either each with a connection of its
//! own ([`Client::with_options`]), or all on one [`SharedConnection`]
//! ([`Client::on_shared`]), which is faster when there are more threads than cores.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amiquip::{
    Channel, Connection, Consumer, ConsumerMessage, ConsumerOptions, Publish, QueueDeclareOptions,
    Return,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, select};
use log::{debug, trace};
use num_bigint::BigUint;
use uuid::Uuid;

use crate::connect::{Brokers, ConnectOptions};
use crate::error::{Error, Result};
use crate::message::{Call, Reply};
use crate::shared::SharedConnection;
use crate::wire::{self, DEFAULT_QUEUE, DIRECT_REPLY_TO};

/// How a [`Client`] connects and calls.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The queue the server consumes, used as the routing key on the default exchange.
    /// Default: [`DEFAULT_QUEUE`] (`rpc_queue`).
    pub queue: String,
    /// How long a call waits for its reply before it returns [`Error::Timeout`], unless the
    /// call sets its own ([`Call::with_timeout`]). Default: 10 s.
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

self_cell::self_cell!(
    /// A channel together with the reply consumer that borrows it.
    struct ReplyChannel {
        owner: Channel,
        #[covariant]
        dependent: Consumer,
    }
);

/// A blocking RPC client.
///
/// It has a channel (on a connection of its own, or on a [`SharedConnection`]) and a reply
/// queue. A call publishes the request to the server queue `mandatory`, with `reply_to`, a
/// fresh uuid `correlation_id` and an `expiration` equal to its timeout, then reads the reply
/// consumer, dropping every reply whose `correlation_id` is not awaited, until its own reply,
/// a returned request ([`Error::NoRoute`]) or its timeout ([`Error::Timeout`]).
///
/// A `Client` stays on the thread that made it: for many threads, one client per thread on a
/// [`SharedConnection`] ([`Client::on_shared`]).
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

    /// Makes a client on a channel of `shared`, for use on the calling thread.
    /// `options.connect` is not used: the connection is already made.
    ///
    /// # Errors
    ///
    /// Those of [`Client::with_options`] when the shared connection had to be made again, and
    /// [`Error::Amqp`] when the broker refuses the channel or the reply queue.
    pub fn on_shared(shared: &SharedConnection, options: ClientOptions) -> Result<Client> {
        Client::from_source(Source::Shared(shared.clone()), options)
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
    /// See [`Client::send`].
    pub fn call(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        self.send(&Call::new(request)).map(Reply::into_body)
    }

    /// Sends `request` to the server queue and returns the reply body, waiting at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// See [`Client::send`].
    pub fn call_with_timeout(&mut self, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.send(&Call::new(request).with_timeout(timeout))
            .map(Reply::into_body)
    }

    /// Sends `call` (a body with headers and properties) to the server queue and returns the
    /// whole reply: body, headers and content type.
    ///
    /// When an earlier call lost the connection, this one first connects again; with
    /// [`ClientOptions::retry`], see [`Client::send_many`].
    ///
    /// # Errors
    ///
    /// - [`Error::Timeout`]: no reply within the call's timeout;
    /// - [`Error::NoRoute`]: no queue is bound to the server queue's name;
    /// - [`Error::Remote`]: the server replied with an error message;
    /// - [`Error::ConnectionLost`]: the connection died while the call waited;
    /// - the errors of [`Client::with_options`] when reconnecting fails.
    pub fn send(&mut self, call: &Call) -> Result<Reply> {
        self.send_many(std::slice::from_ref(call))
            .pop()
            .expect("one outcome per call")
    }

    /// Sends all `requests` at once, then waits for their replies, at most `timeout` each;
    /// returns one outcome per request, in request order.
    ///
    /// # Errors
    ///
    /// Each outcome has the errors of [`Client::send`].
    pub fn call_many(&mut self, requests: &[&[u8]], timeout: Duration) -> Vec<Result<Vec<u8>>> {
        let calls: Vec<Call> = requests
            .iter()
            .map(|&request| Call::new(request).with_timeout(timeout))
            .collect();
        self.send_many(&calls)
            .into_iter()
            .map(|outcome| outcome.map(Reply::into_body))
            .collect()
    }

    /// Sends all `calls` at once, then waits for their replies, each at most its own timeout
    /// (or the client's); returns one outcome per call, in call order.
    ///
    /// Keeping many calls in flight from one thread is much faster than calling one by one:
    /// the broker and the server's workers are kept busy while replies travel back.
    ///
    /// When an earlier call lost the connection, this one first connects again. With
    /// [`ClientOptions::retry`], calls whose connection is lost before their reply arrives are
    /// sent again once the client has reconnected, until their deadlines.
    ///
    /// # Errors
    ///
    /// Each outcome has the errors of [`Client::send`].
    pub fn send_many(&mut self, calls: &[Call]) -> Vec<Result<Reply>> {
        let started = Instant::now();
        let timeouts: Vec<Duration> = calls
            .iter()
            .map(|call| call.timeout.unwrap_or(self.options.timeout))
            .collect();
        let mut batch = Batch {
            calls,
            deadlines: timeouts.iter().map(|&timeout| started + timeout).collect(),
            timeouts,
            outcomes: calls.iter().map(|_| None).collect(),
            pending: (0..calls.len()).collect(),
        };
        while !batch.pending.is_empty() {
            let (error, connecting) = match self.session() {
                Ok(session) => match session.exchange(&mut batch) {
                    Ok(()) => break,
                    Err(error) => (error, false),
                },
                Err(error) => (error, true),
            };
            // A lost connection, or a channel the broker closed, leaves nothing to call on.
            if matches!(error, Error::ConnectionLost(_) | Error::Amqp(_)) {
                self.session = None;
            }
            if !(self.options.retry && is_retryable(&error)) {
                batch.fail_pending(&error);
                break;
            }
            batch.time_out_expired(Instant::now());
            if let Some(earliest) = batch.earliest_pending_deadline() {
                debug!(
                    "retrying {} calls after: {}",
                    batch.pending.len(),
                    error.chain()
                );
                if connecting {
                    // Do not hammer brokers that refuse connections.
                    std::thread::sleep(
                        earliest
                            .saturating_duration_since(Instant::now())
                            .min(RETRY_PAUSE),
                    );
                }
            }
        }
        batch
            .outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every call has an outcome"))
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

/// The calls of one [`Client::send_many`], and what has become of each.
struct Batch<'a> {
    calls: &'a [Call],
    timeouts: Vec<Duration>,
    deadlines: Vec<Instant>,
    outcomes: Vec<Option<Result<Reply>>>,
    /// The calls still to be sent on the next session, by index.
    pending: Vec<usize>,
}

impl Batch<'_> {
    fn time_out(&mut self, index: usize) {
        self.outcomes[index] = Some(Err(Error::Timeout(self.timeouts[index])));
    }

    /// Times out every pending call whose deadline is `now` or earlier.
    fn time_out_expired(&mut self, now: Instant) {
        let (expired, live): (Vec<usize>, Vec<usize>) = self
            .pending
            .iter()
            .partition(|&&index| self.deadlines[index] <= now);
        for index in expired {
            self.time_out(index);
        }
        self.pending = live;
    }

    fn earliest_pending_deadline(&self) -> Option<Instant> {
        self.pending
            .iter()
            .map(|&index| self.deadlines[index])
            .min()
    }

    /// Ends every pending call with `error`.
    fn fail_pending(&mut self, error: &Error) {
        for index in std::mem::take(&mut self.pending) {
            self.outcomes[index] = Some(Err(error.clone()));
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

    /// Publishes the batch's pending calls, then collects their replies until each is answered
    /// or past its deadline.
    ///
    /// # Errors
    ///
    /// The error that broke the session; the calls it left unanswered stay pending.
    fn exchange(&mut self, batch: &mut Batch) -> Result<()> {
        let mut waiting = HashMap::with_capacity(batch.pending.len());
        let now = Instant::now();
        for &index in &batch.pending {
            let correlation_id = Uuid::new_v4().to_string();
            let left = batch.deadlines[index].saturating_duration_since(now);
            self.publish(&batch.calls[index], &correlation_id, left)?;
            waiting.insert(correlation_id, index);
        }
        // Deadlines in order, so that the next one to pass is always at the front.
        let mut by_deadline: Vec<usize> = batch.pending.clone();
        by_deadline.sort_by_key(|&index| std::cmp::Reverse(batch.deadlines[index]));
        while !waiting.is_empty() {
            while by_deadline
                .last()
                .is_some_and(|&index| batch.outcomes[index].is_some())
            {
                by_deadline.pop();
            }
            let next_deadline = batch.deadlines[*by_deadline.last().expect("a call waits")];
            match self.receive(next_deadline) {
                Ok(Some((id, outcome))) => match waiting.remove(&id) {
                    Some(index) => batch.outcomes[index] = Some(outcome),
                    None => debug!("dropping a reply that is not awaited: correlation id {id:?}"),
                },
                Ok(None) => {
                    let now = Instant::now();
                    waiting.retain(|_, &mut index| {
                        let expired = batch.deadlines[index] <= now;
                        if expired {
                            batch.time_out(index);
                        }
                        !expired
                    });
                }
                Err(error) => {
                    batch.pending = waiting.into_values().collect();
                    batch.pending.sort_unstable();
                    return Err(error);
                }
            }
        }
        batch.pending.clear();
        Ok(())
    }

    fn publish(&self, call: &Call, correlation_id: &str, timeout: Duration) -> Result<()> {
        let properties =
            wire::request_properties(call, &self.reply_to, correlation_id, timeout.as_millis());
        let Some(reply_channel) = &self.reply_channel else {
            return Err(Error::lost(amiquip::Error::ClientClosedChannel));
        };
        reply_channel.borrow_owner().basic_publish(
            "",
            Publish {
                body: &call.body,
                routing_key: self.queue.clone(),
                mandatory: true,
                immediate: false,
                properties,
            },
        )?;
        trace!("published request {correlation_id} to {}", self.queue);
        Ok(())
    }

    /// Waits until `deadline` for the next reply or returned request, and gives its
    /// correlation id with what it means for that call; `None` when the deadline passed.
    ///
    /// # Errors
    ///
    /// [`Error::ConnectionLost`] when the consumer or the connection ended.
    fn receive(&self, deadline: Instant) -> Result<Option<(String, Result<Reply>)>> {
        // Waiting on the reply channel alone costs far less than `select!` over it and the
        // returns channel (a third of the futex calls; about a tenth more calls per second).
        // Replies usually follow each other closely, so wait on them alone for QUICK first; a
        // returned request is then seen by the `select!` below, QUICK after the publish at most.
        const QUICK: Duration = Duration::from_millis(5);
        match self
            .replies
            .recv_deadline(deadline.min(Instant::now() + QUICK))
        {
            Ok(message) => return reply_outcome(message).map(Some),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::lost(amiquip::Error::EventLoopDropped));
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        select! {
            recv(self.replies) -> message => match message {
                Ok(message) => reply_outcome(message).map(Some),
                Err(_) => Err(Error::lost(amiquip::Error::EventLoopDropped)),
            },
            recv(self.returns) -> returned => match returned {
                Ok(returned) => Ok(Some(returned_outcome(returned))),
                Err(_) => Err(Error::lost(amiquip::Error::EventLoopDropped)),
            },
            default(remaining) => Ok(None),
        }
    }

    /// Ends the consumer safely (see [`crate::consumer::cancel`]), then closes the channel, or
    /// the connection when it is the client's own.
    fn close(&mut self) -> Result<()> {
        let Some(reply_channel) = self.reply_channel.take() else {
            return Ok(());
        };
        let cancelled = crate::consumer::cancel(
            reply_channel.borrow_dependent(),
            &self.replies,
            Duration::from_secs(2),
            |_late_reply| Ok(()),
        );
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

/// What a message from the reply consumer means: a reply (its correlation id, and the reply or
/// the server's error), or the end of the consumer, which means the connection is gone.
fn reply_outcome(message: ConsumerMessage) -> Result<(String, Result<Reply>)> {
    match message {
        ConsumerMessage::Delivery(delivery) => {
            let id = delivery
                .properties
                .correlation_id()
                .clone()
                .unwrap_or_default();
            trace!("reply to {id} arrived");
            Ok((id, wire::reply_from(delivery).map_err(Error::Remote)))
        }
        other => Err(consumer_ended(other)),
    }
}

/// A request the broker could not route: no queue by that name.
fn returned_outcome(returned: Return) -> (String, Result<Reply>) {
    let id = returned
        .properties
        .correlation_id()
        .clone()
        .unwrap_or_default();
    debug!("request {id} returned: {}", returned.reply_text);
    (
        id,
        Err(Error::NoRoute {
            queue: returned.routing_key,
        }),
    )
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
