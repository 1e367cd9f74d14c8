//! The RPC client: publish a request, then wait for the reply with the matching
//! `correlation_id`.
//!
//! A [`Client`] is cheap to clone and can be used from any number of threads at once: all
//! clones share one connection, one channel and one reply queue (or direct reply-to), and the
//! waiting callers take turns reading the replies and handing each to the call that awaits it
//! (see `session.rs`). A call publishes the request to the server queue with `reply_to` and a fresh
//! uuid as `correlation_id`, then waits for its own answer; replies that no call awaits (a late
//! answer to a call that timed out, say) are dropped and logged at debug.
//!
//! The request is published `mandatory`, so a request that no queue can take comes back at once
//! as [`Error::NoRoute`]; it also carries an `expiration` equal to the call's timeout, so the
//! broker drops it rather than have a server compute it for a caller who has given up.
//!
//! Every call, single or batched, goes through one loop ([`Client::send_many`]): the calls not
//! yet answered are published on the current session and awaited until each is answered or
//! its own deadline passes; when the session breaks and retry is on, the unanswered ones are
//! sent again on the next session.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::debug;
use num_bigint::BigUint;

use crate::connect::{Brokers, ConnectOptions};
use crate::error::{Error, Result};
use crate::message::{Call, Reply};
use crate::session::{Event, Mailbox, Role, Session};
use crate::wire::DEFAULT_QUEUE;

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
    /// TCP and AMQP connection settings.
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

/// A blocking RPC client, shared by every thread that calls through it.
///
/// `Client` is `Send + Sync` and cheap to clone (an `Arc` inside): give each thread a clone, or
/// put one in an `Arc`. All clones share one connection and one reply consumer, so the broker
/// sees one connection, one channel and one reply queue however many threads call. Each call
/// gets exactly its own reply, matched by `correlation_id`; one caller's timeout or failure
/// never disturbs another's call.
///
/// A call in flight costs about 200 bytes (its correlation id and where to deliver its reply)
/// until it is answered or times out, plus its request until it is published; nothing else
/// grows with the number of calls or threads.
///
/// ```no_run
/// use amqp_rpc::Client;
///
/// # fn main() -> amqp_rpc::Result<()> {
/// let client = Client::connect(amqp_rpc::DEFAULT_URL)?;
/// let threads: Vec<_> = (0..8)
///     .map(|_| {
///         let client = client.clone();
///         std::thread::spawn(move || client.fib(30))
///     })
///     .collect();
/// for thread in threads {
///     assert_eq!(thread.join().unwrap()?.to_string(), "832040");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What the clones of a client share.
struct Inner {
    brokers: Brokers,
    options: ClientOptions,
    /// The current session; `None` after it broke, until a call connects again.
    session: Mutex<Option<Arc<Session>>>,
}

/// Checked at compile time: a client can be shared by threads.
const _: () = {
    const fn shareable<T: Send + Sync + Clone>() {}
    shareable::<Client>()
};

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
        let brokers = Brokers::parse(url)?;
        let session = Session::open(&brokers, &options)?;
        Ok(Client {
            inner: Arc::new(Inner {
                brokers,
                options,
                session: Mutex::new(Some(Arc::new(session))),
            }),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Sends `request` to the server queue and returns the reply body, waiting at most the
    /// client's default timeout.
    ///
    /// # Errors
    ///
    /// See [`Client::send`].
    pub fn call(&self, request: &[u8]) -> Result<Vec<u8>> {
        self.send(&Call::new(request)).map(Reply::into_body)
    }

    /// Sends `request` to the server queue and returns the reply body, waiting at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// See [`Client::send`].
    pub fn call_with_timeout(&self, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.send(&Call::new(request).with_timeout(timeout))
            .map(Reply::into_body)
    }

    /// Sends `call` (a body with headers and properties) to the server queue and returns the
    /// whole reply: body, headers and content type.
    ///
    /// When the connection was lost, this call first connects again; with
    /// [`ClientOptions::retry`], see [`Client::send_many`].
    ///
    /// # Errors
    ///
    /// - [`Error::Timeout`]: no reply within the call's timeout;
    /// - [`Error::NoRoute`]: no queue is bound to the server queue's name;
    /// - [`Error::Remote`]: the server replied with an error message;
    /// - [`Error::ConnectionLost`]: the connection died while the call waited;
    /// - the errors of [`Client::with_options`] when reconnecting fails.
    pub fn send(&self, call: &Call) -> Result<Reply> {
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
    pub fn call_many(&self, requests: &[&[u8]], timeout: Duration) -> Vec<Result<Vec<u8>>> {
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
    /// When the connection was lost, this call first connects again. With
    /// [`ClientOptions::retry`], calls whose connection is lost before their reply arrives are
    /// sent again once the client has reconnected, until their deadlines.
    ///
    /// # Errors
    ///
    /// Each outcome has the errors of [`Client::send`].
    pub fn send_many(&self, calls: &[Call]) -> Vec<Result<Reply>> {
        let started = Instant::now();
        let timeouts: Vec<Duration> = calls
            .iter()
            .map(|call| call.timeout.unwrap_or(self.inner.options.timeout))
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
                Ok(session) => match batch.exchange(&session) {
                    Ok(()) => break,
                    Err(error) => {
                        self.drop_session(&session);
                        (error, false)
                    }
                },
                Err(error) => (error, true),
            };
            if !(self.inner.options.retry && is_retryable(&error)) {
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

    /// The current session, connecting again if the last one broke. One caller connects while
    /// the others wait for it.
    fn session(&self) -> Result<Arc<Session>> {
        let mut current = self.lock_session();
        if let Some(session) = current.as_ref().filter(|session| !session.is_broken()) {
            return Ok(Arc::clone(session));
        }
        if current.take().is_some() {
            debug!("connecting again after a lost connection");
        }
        let session = Arc::new(Session::open(&self.inner.brokers, &self.inner.options)?);
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Forgets `broken`, unless another caller has replaced it already.
    fn drop_session(&self, broken: &Arc<Session>) {
        let mut current = self.lock_session();
        if current
            .as_ref()
            .is_some_and(|session| Arc::ptr_eq(session, broken))
        {
            *current = None;
        }
    }

    fn lock_session(&self) -> MutexGuard<'_, Option<Arc<Session>>> {
        // A panic elsewhere while the lock was held leaves the Option whole: keep using it.
        self.inner
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks the server for fib(`n`), with the tutorial's wire format: `n` in decimal out, the
    /// result in decimal back.
    ///
    /// # Errors
    ///
    /// Those of [`Client::call`], and [`Error::InvalidReply`] when the reply is not a decimal
    /// number.
    pub fn fib(&self, n: u64) -> Result<BigUint> {
        let reply = self.call(n.to_string().as_bytes())?;
        BigUint::parse_bytes(&reply, 10).ok_or_else(|| {
            Error::InvalidReply(format!(
                "expected a decimal number, got {:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(40)])
            ))
        })
    }

    /// Drops this handle. When it is the last clone, closes the connection and reports any
    /// error; dropping the last clone does the same quietly. Other clones keep working.
    ///
    /// # Errors
    ///
    /// [`Error::ConnectionLost`] or [`Error::Amqp`] when the broker does not confirm the close.
    pub fn close(self) -> Result<()> {
        let Ok(inner) = Arc::try_unwrap(self.inner) else {
            return Ok(());
        };
        let session = inner
            .session
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match session {
            Some(session) => session.close(),
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
    /// Publishes the pending calls on `session`, then collects their replies until each is
    /// answered or past its deadline.
    ///
    /// # Errors
    ///
    /// The error that broke the session; the calls it left unanswered stay pending.
    fn exchange(&mut self, session: &Session) -> Result<()> {
        let mailbox = Arc::new(Mailbox::default());
        let now = Instant::now();
        let (ids, mut role) = session.start(
            self.pending.iter().map(|&index| {
                let left = self.deadlines[index].saturating_duration_since(now);
                (index, &self.calls[index], left)
            }),
            &mailbox,
        )?;
        // Correlation ids by call index, in deadline order, so that the next deadline to pass
        // is always at the end.
        let mut waiting: Vec<(usize, String)> = self.pending.iter().copied().zip(ids).collect();
        waiting.sort_by_key(|&(index, _)| std::cmp::Reverse(self.deadlines[index]));
        let mut unanswered = waiting.len();
        let mut failure = None;
        while unanswered > 0 {
            while waiting
                .last()
                .is_some_and(|&(index, _)| self.outcomes[index].is_some())
            {
                waiting.pop();
            }
            let next_deadline = self.deadlines[waiting.last().expect("a call waits").0];
            let event = match role {
                // The reader's own answers come through its mailbox too, without a wait.
                Role::Reader => match mailbox.take() {
                    Some(event) => Some(event),
                    None if Instant::now() >= next_deadline => None,
                    None => {
                        session.read(next_deadline);
                        continue;
                    }
                },
                Role::Follower => mailbox.wait_until(next_deadline),
            };
            match event {
                Some(Event::Answer { index, outcome }) => {
                    if self.outcomes[index].is_none() {
                        self.outcomes[index] = Some(outcome);
                        unanswered -= 1;
                    }
                }
                Some(Event::Read) => role = Role::Reader,
                Some(Event::Lost(error)) => {
                    failure = Some(error);
                    break;
                }
                None => {
                    let now = Instant::now();
                    let mut expired = Vec::new();
                    while let Some((index, _)) = waiting.last() {
                        if self.deadlines[*index] > now {
                            break;
                        }
                        let (index, id) = waiting.pop().expect("just seen");
                        if self.outcomes[index].is_none() {
                            self.time_out(index);
                            unanswered -= 1;
                            expired.push(id);
                        }
                    }
                    session.forget(&expired);
                }
            }
        }
        let still_awaited: Vec<String> = waiting
            .into_iter()
            .filter(|&(index, _)| self.outcomes[index].is_none())
            .map(|(_, id)| id)
            .collect();
        // A follower whose calls were all answered was removed from the session by the reader
        // and can be handed nothing more: it leaves without taking the lock.
        if role == Role::Reader || !still_awaited.is_empty() {
            session.leave(role, &still_awaited, &mailbox);
        }
        // Answered and timed-out calls are done; after a failure, the rest go again.
        self.pending.retain(|&index| self.outcomes[index].is_none());
        failure.map_or(Ok(()), Err)
    }

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
