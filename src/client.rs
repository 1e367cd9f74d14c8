//! The RPC client: publish a request, then wait for the reply with the matching
//! `correlation_id`.
//!
//! A [`Client`] is cheap to clone and can be used from any number of threads at once: all
//! clones share one connection, one channel and one reply queue (or direct reply-to), and the
//! waiting callers take turns reading the replies and handing each to the call that awaits it
//! (see `session.rs`). A call publishes the request to its destination (the client's queue
//! unless [`Call::to`] names another queue, or an exchange and a routing key) with `reply_to`
//! and a fresh uuid as `correlation_id`, then waits for its own answer; replies that no call
//! awaits (a late answer to a call that timed out, say) are dropped and logged at debug.
//!
//! The request is published `mandatory`, so a request that no queue can take comes back at once
//! as [`Error::NoRoute`]; it also carries an `expiration` equal to the call's timeout, so the
//! broker drops it rather than have a server compute it for a caller who has given up.
//!
//! Every call, single or batched, goes through one loop ([`Client::send_many`]): the calls not
//! yet answered are published on the current session and awaited until each is answered or
//! its own deadline passes; when the session breaks and retry is on, the unanswered ones are
//! sent again on the next session.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::debug;
use num_bigint::BigUint;

use crate::client_options::ClientOptions;
use crate::connect::Brokers;
use crate::destination::Destination;
use crate::error::{Error, QueueState, Result};
use crate::headers::MAX_HEADER_DEPTH;
use crate::message::{Call, Reply};
use crate::probe::QUEUE_STATE_FRESH;
use crate::session::{Event, Mailbox, Role, Session};
use crate::stats::{ClientCounters, ClientStats};
use crate::sync::{deadline_after, lock, wait_timeout};

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
/// until it is answered or times out, plus its request until amiquip has written it to the
/// socket: at most 128 frames wait for amiquip's I/O thread, and a publish past them waits
/// for room. Nothing else grows with the number of calls or threads.
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

/// Shows the brokers (without passwords), the default queue and the calls in flight.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("brokers", &self.inner.brokers)
            .field("queue", &self.inner.options.queue)
            .field(
                "in_flight",
                &self.inner.in_flight.load(AtomicOrdering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// What the clones of a client share.
struct Inner {
    brokers: Brokers,
    options: ClientOptions,
    /// Where calls go that name no destination: [`ClientOptions::queue`].
    destination: Destination,
    slot: Mutex<Slot>,
    /// Signalled when a connection attempt ends.
    connected: Condvar,
    /// Calls in flight, for [`ClientOptions::max_in_flight`].
    in_flight: AtomicUsize,
    /// What the calls did, for [`Client::stats`].
    counters: Arc<ClientCounters>,
}

/// The current session, and whether a caller is connecting a new one.
struct Slot {
    /// `None` after the session broke, until a call connects again.
    session: Option<Arc<Session>>,
    connecting: bool,
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
        let counters = Arc::new(ClientCounters::new());
        let session = Session::open(&brokers, &options, None, &counters)?;
        Ok(Client {
            inner: Arc::new(Inner {
                brokers,
                destination: Destination::queue(options.queue.as_str()),
                options,
                slot: Mutex::new(Slot {
                    session: Some(Arc::new(session)),
                    connecting: false,
                }),
                connected: Condvar::new(),
                in_flight: AtomicUsize::new(0),
                counters,
            }),
        })
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// What this client's calls (all its clones' together) did since it was made: calls,
    /// replies, errors by kind, late and stray replies, retries, reconnections and latency.
    /// Counting costs a few atomic operations per call and is always on.
    pub fn stats(&self) -> ClientStats {
        self.inner.counters.snapshot()
    }

    /// Sends `request` to the client's queue ([`ClientOptions::queue`]) and returns the reply
    /// body, waiting at most the client's default timeout.
    ///
    /// # Errors
    ///
    /// See [`Client::send`].
    pub fn call(&self, request: &[u8]) -> Result<Vec<u8>> {
        self.send(&Call::new(request)).map(Reply::into_body)
    }

    /// Sends `request` to the client's queue ([`ClientOptions::queue`]) and returns the reply
    /// body, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// See [`Client::send`].
    pub fn call_with_timeout(&self, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        self.send(&Call::new(request).with_timeout(timeout))
            .map(Reply::into_body)
    }

    /// Sends `call` (a body with headers and properties) to its destination ([`Call::to`], or
    /// the client's queue) and returns the whole reply: body, headers and content type.
    ///
    /// When the connection was lost, this call first connects again; with
    /// [`ClientOptions::retry`], see [`Client::send_many`].
    ///
    /// # Errors
    ///
    /// - [`Error::Timeout`]: no reply within the call's timeout;
    /// - [`Error::NoRoute`]: no queue by the destination's name, or none bound to its exchange
    ///   for its routing key;
    /// - [`Error::NoExchange`]: the destination's exchange does not exist (nothing was sent);
    /// - [`Error::NoServer`]: no server consumes the destination queue
    ///   ([`ClientOptions::no_server_grace`]);
    /// - [`Error::Blocked`]: the broker blocks the connection (a resource alarm);
    /// - [`Error::Overloaded`]: [`ClientOptions::max_in_flight`] calls are already in flight;
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
        let options = &self.inner.options;
        let timeouts: Vec<Duration> = calls
            .iter()
            .map(|call| call.timeout.unwrap_or(options.timeout))
            .collect();
        let mut batch = Batch {
            calls,
            deadlines: timeouts
                .iter()
                .map(|&timeout| deadline_after(started, timeout))
                .collect(),
            timeouts,
            outcomes: calls.iter().map(|_| None).collect(),
            pending: Vec::with_capacity(calls.len()),
            destinations: calls
                .iter()
                .map(|call| call.destination.as_ref().unwrap_or(&self.inner.destination))
                .collect(),
            grace_check: (!options.no_server_grace.is_zero()).then(|| GraceCheck {
                at: deadline_after(started, options.no_server_grace),
                nobody_seen: HashSet::new(),
            }),
            started,
            counters: &self.inner.counters,
        };
        batch.refuse_unsendable();
        let _admitted = self.admit(&mut batch);
        // What kept the pending calls from an answer so far, when retrying.
        let mut last_error: Option<Error> = None;
        while !batch.pending.is_empty() {
            if let Some(error) = &last_error {
                // A call whose deadline passed while retrying ends with what kept it from an
                // answer, not with a timeout that hides it.
                batch.expire_pending(Instant::now(), error);
            }
            let Some(earliest) = batch.earliest_pending_deadline() else {
                break;
            };
            let (error, connecting) = match self.session(Some(earliest)) {
                Ok(session) => match batch.exchange(&session) {
                    Ok(()) => break,
                    Err(error) => {
                        self.drop_session(&session);
                        (error, false)
                    }
                },
                Err(error) => (error, true),
            };
            if !(options.retry && is_retryable(&error)) {
                batch.fail_pending(&error);
                break;
            }
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
            } else {
                ClientCounters::add(&self.inner.counters.retries, batch.pending.len() as u64);
            }
            last_error = Some(error);
        }
        let counters = &self.inner.counters;
        batch
            .outcomes
            .into_iter()
            .map(|outcome| {
                let outcome = outcome.expect("every call has an outcome");
                counters.count(&outcome);
                outcome
            })
            .collect()
    }

    /// Admits as many of the batch's calls as [`ClientOptions::max_in_flight`] allows, as
    /// pending, and fails the rest with [`Error::Overloaded`]; the admitted calls count as in
    /// flight until the returned guard is dropped.
    fn admit(&self, batch: &mut Batch) -> InFlight<'_> {
        let wanted = batch.calls.len();
        let admitted = match self.inner.options.max_in_flight {
            None => wanted,
            Some(limit) => {
                let mut admitted = 0;
                let _ = self.inner.in_flight.fetch_update(
                    AtomicOrdering::AcqRel,
                    AtomicOrdering::Acquire,
                    |in_flight| {
                        admitted = wanted.min(limit.saturating_sub(in_flight));
                        Some(in_flight + admitted)
                    },
                );
                admitted
            }
        };
        // Calls that cannot be sent have their outcome already.
        batch
            .pending
            .extend((0..admitted).filter(|&index| batch.outcomes[index].is_none()));
        for index in admitted..wanted {
            batch.outcomes[index] = Some(Err(Error::Overloaded {
                max_in_flight: self.inner.options.max_in_flight.unwrap_or(usize::MAX),
            }));
        }
        InFlight {
            counter: &self.inner.in_flight,
            calls: if self.inner.options.max_in_flight.is_some() {
                admitted
            } else {
                0
            },
        }
    }

    /// The current session, connecting again if the last one broke. One caller connects while
    /// the others wait for it, each no longer than its own `deadline`.
    fn session(&self, deadline: Option<Instant>) -> Result<Arc<Session>> {
        let mut slot = self.lock_slot();
        loop {
            if let Some(session) = slot.session.as_ref().filter(|session| !session.is_broken()) {
                return Ok(Arc::clone(session));
            }
            if !slot.connecting {
                break;
            }
            let left = deadline.map_or(Duration::MAX, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Err(Error::Connect {
                    addr: "the broker".into(),
                    source: Arc::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "another call was still connecting when this call's deadline passed",
                    )),
                });
            }
            slot = wait_timeout(&self.inner.connected, slot, left);
        }
        if slot.session.take().is_some() {
            debug!("connecting again after a lost connection");
        }
        slot.connecting = true;
        drop(slot);
        let opened = Session::open(
            &self.inner.brokers,
            &self.inner.options,
            deadline,
            &self.inner.counters,
        )
        .map(Arc::new);
        if opened.is_ok() {
            ClientCounters::add(&self.inner.counters.reconnections, 1);
        }
        let mut slot = self.lock_slot();
        slot.connecting = false;
        if let Ok(session) = &opened {
            slot.session = Some(Arc::clone(session));
        }
        self.inner.connected.notify_all();
        opened
    }

    /// Forgets `broken`, unless another caller has replaced it already.
    fn drop_session(&self, broken: &Arc<Session>) {
        let mut slot = self.lock_slot();
        if slot
            .session
            .as_ref()
            .is_some_and(|session| Arc::ptr_eq(session, broken))
        {
            slot.session = None;
        }
    }

    fn lock_slot(&self) -> MutexGuard<'_, Slot> {
        lock(&self.inner.slot)
    }

    /// Asks the server for fib(`n`), with the tutorial's wire format: `n` in decimal out, the
    /// result in decimal back.
    ///
    /// fib(n) has about n / 4.8 digits: past n ≈ 20,000,000 its reply is over the default
    /// [`ClientOptions::max_reply`]; size that with [`crate::fib::reply_size`].
    ///
    /// # Errors
    ///
    /// Those of [`Client::call`], and [`Error::InvalidReply`] when the reply is not a decimal
    /// number or is over [`ClientOptions::max_reply`].
    pub fn fib(&self, n: u64) -> Result<BigUint> {
        crate::fib::parse_reply(&self.call(n.to_string().as_bytes())?)
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
        let slot = inner
            .slot
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.session {
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
    /// Where each call goes.
    destinations: Vec<&'a Destination>,
    /// When to ask the broker next whether any server consumes the queues of the calls still
    /// unanswered; `None` once settled, or when the check is off.
    grace_check: Option<GraceCheck>,
    /// When the calls started, for their latency.
    started: Instant,
    counters: &'a ClientCounters,
}

/// The next look at the queues of calls still unanswered after the grace
/// ([`ClientOptions::no_server_grace`]).
#[derive(Clone, Debug)]
struct GraceCheck {
    at: Instant,
    /// The queues in which the look before found no server and requests waiting: this look
    /// decides for them.
    nobody_seen: HashSet<String>,
}

/// Calls counted in [`Inner::in_flight`] until dropped.
struct InFlight<'a> {
    counter: &'a AtomicUsize,
    calls: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.calls > 0 {
            self.counter.fetch_sub(self.calls, AtomicOrdering::AcqRel);
        }
    }
}

impl Batch<'_> {
    /// Publishes the pending calls on `session`, then collects their replies until each is
    /// answered or past its deadline.
    ///
    /// # Errors
    ///
    /// The error that broke the session; the calls it left unanswered stay pending.
    fn exchange(&mut self, session: &Session) -> Result<()> {
        if let Some(reason) = session.blocked() {
            // The broker would not read the requests: they would wait unsent in memory until
            // their calls time out and, past amiquip's 16 MiB of unsent bytes, have the
            // connection cut (see `session::Publisher`). The caller hears it now.
            for index in std::mem::take(&mut self.pending) {
                self.outcomes[index] = Some(Err(Error::Blocked {
                    destination: self.destinations[index].clone(),
                    reason: reason.clone(),
                    after: None,
                }));
            }
            return Ok(());
        }
        self.check_exchanges(session)?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let mailbox = Arc::new(Mailbox::default());
        let (ids, mut role) = session.start(
            self.pending.iter().map(|&index| {
                (
                    index,
                    &self.calls[index],
                    self.destinations[index],
                    self.deadlines[index],
                )
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
            let Some(&(next, _)) = waiting.last() else {
                break;
            };
            let next_deadline = self.deadlines[next];
            if self
                .grace_check
                .as_ref()
                .is_some_and(|check| check.at <= Instant::now())
            {
                let given_up = self.look_for_servers(session, &mut waiting);
                unanswered -= given_up.len();
                // As for timed-out calls: a reply that still comes is late.
                session.forget(given_up);
                continue;
            }
            // Wake for the grace check too.
            let next_deadline = self
                .grace_check
                .as_ref()
                .map_or(next_deadline, |check| check.at.min(next_deadline));
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
                        if !matches!(outcome, Err(Error::NoRoute { .. })) {
                            self.counters.latency.record(self.started.elapsed());
                        }
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
                            expired.push((index, id));
                        }
                    }
                    if !expired.is_empty() {
                        // What the broker knew when the calls gave up explains the timeout,
                        // unless it was blocking the connection.
                        let blocked = session.blocked();
                        for &(index, _) in &expired {
                            let state = match (&blocked, self.destinations[index].queue_name()) {
                                (None, Some(queue)) => session.queue_state(queue),
                                _ => None,
                            };
                            self.time_out(index, state, blocked.as_ref());
                            unanswered -= 1;
                        }
                        session.forget(expired.into_iter().map(|(_, id)| id).collect());
                    }
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

    /// Has the broker say whether each exchange the pending calls go to exists, before any is
    /// published: a publish to a missing exchange closes the channel, and with it every call
    /// of the session. Calls to a missing exchange fail with [`Error::NoExchange`]; calls to
    /// one the broker does not answer about by the first of their deadlines time out.
    ///
    /// # Errors
    ///
    /// Why the session broke, when it broke meanwhile.
    fn check_exchanges(&mut self, session: &Session) -> Result<()> {
        let mut exchanges: Vec<&str> = self
            .pending
            .iter()
            .map(|&index| self.destinations[index].exchange_name())
            .filter(|exchange| !exchange.is_empty())
            .collect();
        if exchanges.is_empty() {
            return Ok(());
        }
        exchanges.sort_unstable();
        exchanges.dedup();
        for exchange in exchanges {
            let to_it: Vec<usize> = self
                .pending
                .iter()
                .copied()
                .filter(|&index| self.destinations[index].exchange_name() == exchange)
                .collect();
            let by = to_it
                .iter()
                .map(|&index| self.deadlines[index])
                .min()
                .expect("a call goes to the exchange");
            match session.exchange_exists(exchange, by) {
                Some(true) => continue,
                Some(false) => {
                    for index in to_it {
                        self.outcomes[index] = Some(Err(Error::NoExchange {
                            exchange: exchange.to_string(),
                        }));
                    }
                }
                None if session.is_broken() => {
                    return Err(session.broken().expect("the session is broken"));
                }
                None => {
                    let blocked = session.blocked();
                    for index in to_it {
                        self.time_out(index, None, blocked.as_ref());
                    }
                }
            }
        }
        self.pending.retain(|&index| self.outcomes[index].is_none());
        Ok(())
    }

    /// Looks at the queues of the calls still `waiting` (an exchange's queues cannot be
    /// told): with nobody consuming a queue and requests waiting in it, its calls fail with
    /// [`Error::NoServer`], once a second look a second later agrees. Returns the
    /// correlation ids of the calls given up, and schedules the next look, if one is needed.
    fn look_for_servers(
        &mut self,
        session: &Session,
        waiting: &mut Vec<(usize, String)>,
    ) -> Vec<String> {
        let check = self.grace_check.take().expect("a look is due");
        let mut queues: Vec<&str> = waiting
            .iter()
            .filter(|&&(index, _)| self.outcomes[index].is_none())
            .filter_map(|&(index, _)| self.destinations[index].queue_name())
            .collect();
        queues.sort_unstable();
        queues.dedup();
        let mut nobody_now = HashSet::new();
        let mut no_server = HashSet::new();
        for queue in queues {
            // With nobody consuming, a request still unanswered is waiting in the queue,
            // unless a server took it and stopped consuming (to drain, say) while it works on
            // it: an empty queue means the request is being served.
            let nobody = session
                .queue_state(queue)
                .is_some_and(|state| state.consumers == 0 && state.waiting > 0);
            if !nobody {
                continue;
            }
            if check.nobody_seen.contains(queue) {
                debug!("no server consumes queue '{queue}'");
                no_server.insert(queue.to_string());
            } else {
                // A server replacing its only worker, or restarting at once, consumes nothing
                // for a moment: only a second look, on a fresh answer, fails calls.
                debug!(
                    "no server consumes queue '{queue}' now; looking again in {} s",
                    QUEUE_STATE_FRESH.as_secs_f64()
                );
                nobody_now.insert(queue.to_string());
            }
        }
        if !nobody_now.is_empty() {
            self.grace_check = Some(GraceCheck {
                at: Instant::now() + QUEUE_STATE_FRESH,
                nobody_seen: nobody_now,
            });
        }
        let mut given_up = Vec::new();
        waiting.retain(|(index, id)| {
            let unserved = self.destinations[*index]
                .queue_name()
                .filter(|queue| no_server.contains(*queue));
            let Some(queue) = unserved else {
                return true;
            };
            if self.outcomes[*index].is_some() {
                return true;
            }
            self.outcomes[*index] = Some(Err(Error::NoServer {
                queue: queue.to_string(),
            }));
            given_up.push(id.clone());
            false
        });
        given_up
    }

    fn time_out(&mut self, index: usize, state: Option<QueueState>, blocked: Option<&String>) {
        let (after, destination) = (self.timeouts[index], self.destinations[index].clone());
        self.outcomes[index] = Some(Err(match blocked {
            Some(reason) => Error::Blocked {
                destination,
                reason: reason.clone(),
                after: Some(after),
            },
            None => Error::Timeout {
                after,
                destination,
                state,
            },
        }));
    }

    /// Fails each call that no server would take, before it is sent: one whose headers nest
    /// deeper than [`MAX_HEADER_DEPTH`].
    fn refuse_unsendable(&mut self) {
        for (index, call) in self.calls.iter().enumerate() {
            let depth = call.headers.depth();
            if depth > MAX_HEADER_DEPTH {
                self.outcomes[index] = Some(Err(Error::InvalidRequest(format!(
                    "the call's headers nest {depth} deep, deeper than the \
                     {MAX_HEADER_DEPTH} that servers accept"
                ))));
            }
        }
    }

    /// Ends every pending call whose deadline is `now` or earlier with `error`.
    fn expire_pending(&mut self, now: Instant, error: &Error) {
        let (expired, live): (Vec<usize>, Vec<usize>) = self
            .pending
            .iter()
            .partition(|&&index| self.deadlines[index] <= now);
        for index in expired {
            self.outcomes[index] = Some(Err(error.clone()));
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
