//! One connection's worth of client state, shared by every thread that calls through it: the
//! connection, the one channel all threads publish on, and the reply consumer, whose replies
//! are handed to the calls awaiting them.
//!
//! This is the tutorial's client loop (read the reply consumer, keep the reply whose
//! `correlation_id` is awaited, drop the rest) run once for all callers instead of once per
//! thread. The broker sees one channel and one reply queue (or direct reply-to) per session,
//! however many threads call.
//!
//! **Who reads the replies.** Not a thread of its own: the callers take turns. While calls
//! wait, exactly one of their threads is the *reader*: it reads the reply consumer (and the
//! returned requests) and hands each reply to the call that awaits it, its own included. The
//! others wait on their own channel for their answers, or for the reader role, which a reader
//! passes on when its own calls are done. A lone caller is always the reader, so a sequential
//! call costs what the tutorial's loop costs: a dispatcher thread instead cost sequential
//! calls one thread hand-off each, 12% of their rate (2,337 against 2,655 calls/s, medians of
//! three interleaved rounds on 2 cores), and gained nothing with 8 or 64 threads. Once no call
//! has waited for a while, a thread of the session's own takes the reader role until a call
//! begins and drops what arrives (late answers to calls that timed out, strays, a hostile
//! peer's flood), so that nothing piles up between calls; a busy client never sees it.
//!
//! **Publishing.** amiquip's `Channel` is not `Sync`, so the channel sits behind a mutex that
//! is held only for the publish itself (about 5 µs: the frame goes to amiquip's I/O thread, not
//! to the socket). Direct reply-to requires publishing on the channel that consumes the
//! replies, which rules out a pool of publishing channels; a publisher thread would cost every
//! call two more thread hand-offs. Measured with `bench/run` on 2 cores: see the table of
//! `docs/performance.md`, where 64 threads publish through this one lock. Callers take their turn
//! at it within their call's deadline, and a publish stuck past its own is ended by cutting
//! the connection: see [`Publisher`].
//!
//! **The reply consumer** is never cancelled: its `Consumer` handle is forgotten right after
//! `basic_consume` (so that the channel can move into the mutex), which keeps its receiver
//! alive for as long as the connection lives. amiquip must always be able to deliver to a
//! consumer's receiver, even the final `ClientClosedChannel` (see `docs/amiquip.md`); a
//! forgotten handle can never be dropped too early. The session ends by closing its
//! connection, which ends the consumer with it.

use std::collections::{HashMap, VecDeque};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{
    Channel, Connection, ConnectionBlockedNotification, ConsumerMessage, ConsumerOptions, Delivery,
    Publish, QueueDeclareOptions, Return,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};
use log::{debug, trace, warn};
use uuid::Uuid;

use crate::client_options::{ClientOptions, ReplyRoute};
use crate::connect::{self, Brokers, Connected};
use crate::destination::Destination;
use crate::error::{Error, QueueState, Result};
use crate::message::{Call, Reply};
use crate::probe::Probe;
use crate::stats::ClientCounters;
use crate::sync::{lock, wait_timeout};
use crate::wire::{self, DIRECT_REPLY_TO};

/// What a waiting caller is told, by the reader or by the session.
pub(crate) enum Event {
    /// The outcome of the caller's call number `index`: the reply, the server's error, or no
    /// route.
    Answer {
        index: usize,
        outcome: Result<Reply>,
    },
    /// The session broke; no more answers will come through it.
    Lost(Error),
    /// The caller is the reader now (see the module documentation).
    Read,
}

/// Where a waiting caller receives its [`Event`]s.
///
/// A mutex and a condition variable rather than a crossbeam channel: a crossbeam receiver spins
/// and yields the processor several times before it sleeps, which with 64 waiting threads on 2
/// cores cost 4 `sched_yield` calls per call; a condition variable sleeps at once, and is
/// signalled only when its owner is asleep on it.
#[derive(Default)]
pub(crate) struct Mailbox {
    state: Mutex<Letters>,
    arrived: Condvar,
}

#[derive(Default)]
struct Letters {
    events: VecDeque<Event>,
    /// True while the owner sleeps, waiting for an event.
    asleep: bool,
}

impl Mailbox {
    fn letters(&self) -> MutexGuard<'_, Letters> {
        lock(&self.state)
    }

    fn post(&self, event: Event) {
        let asleep = {
            let mut letters = self.letters();
            letters.events.push_back(event);
            letters.asleep
        };
        // Signalled after the lock is released, so that the owner does not wake only to wait
        // for it.
        if asleep {
            self.arrived.notify_one();
        }
    }

    /// The next event, if one is there.
    pub(crate) fn take(&self) -> Option<Event> {
        self.letters().events.pop_front()
    }

    /// The next event, waiting for it until `deadline`; `None` once the deadline has passed.
    pub(crate) fn wait_until(&self, deadline: Instant) -> Option<Event> {
        let mut letters = self.letters();
        loop {
            if let Some(event) = letters.events.pop_front() {
                return Some(event);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            letters.asleep = true;
            letters = wait_timeout(&self.arrived, letters, left);
            letters.asleep = false;
        }
    }
}

/// A waiting caller's part in reading the replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Waits on its own channel for answers.
    Follower,
    /// Reads the reply consumer for everyone.
    Reader,
}

/// A call awaiting its reply: where to send it, and which of its caller's calls it is.
struct Waiter {
    mailbox: Arc<Mailbox>,
    index: usize,
}

/// How many timed-out calls a session remembers, to tell their late replies from strays.
const REMEMBERED_TIMEOUTS: usize = 10_000;

/// The calls awaiting replies, by correlation id, and whether the session still works.
#[derive(Default)]
struct Awaited {
    calls: HashMap<String, Waiter>,
    /// The correlation ids of the latest calls that timed out, oldest first.
    timed_out: VecDeque<String>,
    /// True while some caller holds the reader role.
    reading: bool,
    /// True while the idle drain holds it (see [`drain_while_idle`]).
    idle_reading: bool,
    /// When a call last started, for the idle drain.
    last_call: Option<Instant>,
    /// Why the session broke, once it has.
    broken: Option<Error>,
}

impl Awaited {
    /// Gives the reader role to a caller that still waits, if any.
    fn pass_reading_on(&mut self) {
        // Every caller in `calls` still waits: one that stops waiting leaves it first. Any
        // of them will do. With 8 threads the role passes about once per 5 calls (0.20 passes
        // a call); handing it to the newest call, whose reply comes last, made that 0.135 but
        // left the rate within noise (1.01x, medians of 15 interleaved rounds of 10,000 calls
        // on 2 cores): passing the role is too rare to matter.
        self.reading = match self.calls.values().next() {
            Some(waiter) => {
                waiter.mailbox.post(Event::Read);
                true
            }
            None => false,
        };
    }
}

/// The reply side of a session, which the callers share, and the idle drain (see
/// [`drain_while_idle`]).
struct Shared {
    awaited: Mutex<Awaited>,
    /// The client's counters, for late, stray and rejected replies.
    counters: Arc<ClientCounters>,
    /// The reply consumer's messages, read by the reader.
    replies: Receiver<ConsumerMessage>,
    /// Ends the idle drain's turn when a call begins: see [`drain_while_idle`].
    nudge: Sender<()>,
    nudged: Receiver<()>,
    /// Requests the broker could not route, read by the reader.
    returns: Receiver<Return>,
    /// [`ClientOptions::max_reply`].
    max_reply: usize,
    /// [`ClientOptions::server_user`].
    server_user: Option<String>,
}

impl Shared {
    fn awaited(&self) -> MutexGuard<'_, Awaited> {
        lock(&self.awaited)
    }

    /// Hands each outcome to the call with its correlation id, if one awaits it. The lock is
    /// taken once for all, and released before the callers are woken.
    fn answer(&self, outcomes: Vec<(String, Result<Reply>)>) {
        let waiters: Vec<_> = {
            let mut awaited = self.awaited();
            outcomes
                .into_iter()
                .map(|(id, outcome)| (awaited.calls.remove(&id), id, outcome))
                .collect()
        };
        for (waiter, id, outcome) in waiters {
            match waiter {
                Some(waiter) => {
                    waiter.mailbox.post(Event::Answer {
                        index: waiter.index,
                        outcome,
                    });
                }
                None => self.unawaited(&id),
            }
        }
    }

    /// Drops a reply that no call awaits: counts and logs it as late when its call timed out,
    /// and as a duplicate or a stray otherwise.
    fn unawaited(&self, id: &str) {
        let late = {
            let mut awaited = self.awaited();
            let position = awaited
                .timed_out
                .iter()
                .position(|timed_out| timed_out == id);
            position.and_then(|position| awaited.timed_out.remove(position))
        };
        if late.is_some() {
            ClientCounters::add(&self.counters.late_replies, 1);
            debug!("dropping a late reply: call {id} had timed out");
        } else {
            ClientCounters::add(&self.counters.stray_replies, 1);
            debug!("dropping a reply that no call awaits (a duplicate or a stray): {id:?}");
        }
    }

    /// Marks the session broken and tells every waiting call why; returns why, which is an
    /// earlier `error` when the session had broken already.
    fn break_with(&self, error: Error) -> Error {
        let mut awaited = self.awaited();
        if awaited.broken.is_none() {
            debug!("the client's session broke: {error}");
        }
        let reason = awaited.broken.get_or_insert(error).clone();
        for (_, waiter) in awaited.calls.drain() {
            waiter.mailbox.post(Event::Lost(reason.clone()));
        }
        reason
    }

    /// As the reader: reads the next reply or returned request and hands it to the call that
    /// awaits it, or waits until `deadline` for one. When the consumer has ended, breaks the
    /// session: every waiting call, the reader's own too, is told [`Event::Lost`].
    fn read(&self, deadline: Instant) {
        // Waiting on the reply channel alone costs far less than `select!` over it and the
        // returns channel (a third of the futex calls). Replies usually follow each other
        // closely, so wait on them alone for QUICK first, and look at the returns after each
        // reply without waiting; when no reply comes for QUICK, wait on both.
        const QUICK: Duration = Duration::from_millis(5);
        // Replies handed out under one lock, at most, before the reader looks at its own.
        const MOST_AT_ONCE: usize = 64;
        let message = match self
            .replies
            .recv_deadline(deadline.min(Instant::now() + QUICK))
        {
            Ok(message) => Ok(message),
            Err(RecvTimeoutError::Disconnected) => Err(()),
            Err(RecvTimeoutError::Timeout) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                select! {
                    recv(self.replies) -> message => message.map_err(|_| ()),
                    recv(self.returns) -> returned => match returned {
                        Ok(returned) => {
                            self.answer(vec![returned_outcome(returned)]);
                            return;
                        }
                        Err(_) => Err(()),
                    },
                    default(remaining) => return,
                }
            }
        };
        let mut outcomes = Vec::new();
        let mut next = message;
        // Take every reply already there, so that one lock serves them all.
        let ended = loop {
            match next {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    if self.is_from_the_server(&delivery) {
                        outcomes.push(reply_outcome(delivery, self.max_reply));
                    }
                }
                Ok(other) => break Some(consumer_ended(other)),
                Err(()) => break Some(Error::lost(amiquip::Error::EventLoopDropped)),
            }
            if outcomes.len() == MOST_AT_ONCE {
                // The rest wait for the next read: the reader must look at its own answers.
                break None;
            }
            match self.replies.try_recv() {
                Ok(message) => next = Ok(message),
                Err(crossbeam_channel::TryRecvError::Empty) => break None,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    break Some(Error::lost(amiquip::Error::EventLoopDropped));
                }
            }
        };
        while let Ok(returned) = self.returns.try_recv() {
            outcomes.push(returned_outcome(returned));
        }
        self.answer(outcomes);
        if let Some(error) = ended {
            self.break_with(error);
        }
    }

    /// True when `reply` may be trusted: [`ClientOptions::server_user`] is not set, or the
    /// reply's `user_id` (which the broker verifies) names that user. Other replies are
    /// counted and logged at warn; their calls go on waiting for the real reply.
    fn is_from_the_server(&self, reply: &Delivery) -> bool {
        let Some(expected) = &self.server_user else {
            return true;
        };
        let user = reply.properties.user_id().as_deref();
        if user == Some(expected.as_str()) {
            return true;
        }
        ClientCounters::add(&self.counters.rejected_replies, 1);
        warn!(
            "dropping a reply to {:?} from user {user:?}, not from the servers' user \
             '{expected}'",
            reply.properties.correlation_id()
        );
        false
    }
}

/// The channel every caller publishes on (it also carries the reply consumer), one publish at
/// a time, and the deadline of the call whose request is being published.
///
/// amiquip's `basic_publish` hands the frames to its I/O thread and returns at once, until 16
/// MiB wait unsent: then it blocks, without a bound, until the broker reads them. A broker
/// that reads nothing (paused, or behind a network that drops everything) and large requests
/// get there within seconds, and the caller inside would hold every other caller behind the
/// lock past their deadlines, until the heartbeats ran out (15 s past a 2 s timeout, with
/// eight threads sending 4 MiB requests to a paused broker). So callers wait for their turn
/// no longer than their call's deadline (the call then times out, never sent), and a publish
/// still going [`STUCK_PUBLISH`] past its call's deadline is ended by the session's idle
/// thread, which cuts the connection (see [`drain_while_idle`]).
struct Publisher {
    channel: Mutex<Channel>,
    turn: Mutex<Turn>,
    /// Signalled when the turn is free and callers wait for it.
    turn_free: Condvar,
}

/// Who publishes on a [`Publisher`] now.
#[derive(Default)]
struct Turn {
    /// The deadline of the call being published, while one is.
    publishing_until: Option<Instant>,
    /// Callers waiting for the turn.
    waiting: usize,
}

/// How long past its call's deadline a publish may still be going before the session cuts
/// the connection: on a broker that reads, even a large request is handed over in
/// milliseconds.
const STUCK_PUBLISH: Duration = Duration::from_secs(1);

impl Publisher {
    fn new(channel: Channel) -> Publisher {
        Publisher {
            channel: Mutex::new(channel),
            turn: Mutex::default(),
            turn_free: Condvar::new(),
        }
    }

    /// Publishes `publish` to `exchange` once it is this caller's turn, or returns
    /// `Ok(false)`, not sent, when the turn has not come by `deadline`.
    fn publish(
        &self,
        exchange: &str,
        publish: Publish,
        deadline: Instant,
    ) -> amiquip::Result<bool> {
        {
            let mut turn = lock(&self.turn);
            while turn.publishing_until.is_some() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                turn.waiting += 1;
                turn = wait_timeout(&self.turn_free, turn, left);
                turn.waiting -= 1;
            }
            turn.publishing_until = Some(deadline);
        }
        let published = lock(&self.channel).basic_publish(exchange, publish);
        let waiting = {
            let mut turn = lock(&self.turn);
            turn.publishing_until = None;
            turn.waiting
        };
        // Only when someone waits: a signal is a system call.
        if waiting > 0 {
            self.turn_free.notify_one();
        }
        published.map(|()| true)
    }

    /// True when a publish has been going for [`STUCK_PUBLISH`] past its call's deadline.
    fn is_stuck(&self) -> bool {
        lock(&self.turn)
            .publishing_until
            .and_then(|until| until.checked_add(STUCK_PUBLISH))
            .is_some_and(|cut_at| cut_at < Instant::now())
    }
}

/// A connection with its publishing channel and reply consumer.
pub(crate) struct Session {
    publisher: Arc<Publisher>,
    /// `None` once closed.
    connection: Arc<Mutex<Option<Connection>>>,
    /// The connection's TCP socket, for a close the broker does not confirm to cut.
    socket: TcpStream,
    reply_to: String,
    shared: Arc<Shared>,
    /// For asking the broker about the queues and exchanges calls go to.
    probe: Probe,
    /// Whether the broker blocks this connection, from its notifications.
    blocks: Blocks,
    /// The connection's user, which requests carry as `user_id`, when known.
    user: Option<String>,
}

/// The broker's `connection.blocked` and `connection.unblocked` notifications, read when a
/// call starts or times out, and what the latest one said.
struct Blocks {
    notifications: Receiver<ConnectionBlockedNotification>,
    /// True while `reason` is set, for the look every call takes without the lock.
    blocked: AtomicBool,
    /// Why the broker blocks the connection, while it does.
    reason: Mutex<Option<String>>,
}

impl Session {
    /// Connects, by `deadline` if there is one, and sets up the reply consumer.
    pub(crate) fn open(
        brokers: &Brokers,
        options: &ClientOptions,
        deadline: Option<Instant>,
        counters: &Arc<ClientCounters>,
    ) -> Result<Session> {
        let Connected {
            connection,
            socket,
            user,
            addr,
        } = brokers.connect_by(&options.connect, deadline)?;
        // The handshake is done; the rest waits for the broker's answers, which amiquip does
        // without a bound, so it runs within the call's deadline, or a connect timeout more.
        let set_up_by =
            deadline.unwrap_or_else(|| Instant::now() + options.connect.connect_timeout);
        let route = options.reply_route;
        let ((connection, set_up), cut) =
            connect::bounded("rpc-connect", set_up_by, &socket, move || {
                set_up(connection, route)
            })?;
        let SetUp {
            channel,
            notifications,
            returns,
            reply_to,
            replies,
        } = match set_up {
            // Cut, it may still have ended well, just too late: the connection is gone.
            _ if cut => {
                return Err(connect::unanswered(
                    addr,
                    "the client set up its channel and reply queue",
                ));
            }
            Ok(set_up) => set_up,
            Err(error) => {
                let _ = connect::close(connection, &socket);
                return Err(error.into());
            }
        };
        let blocks = Blocks {
            notifications,
            blocked: AtomicBool::new(false),
            reason: Mutex::new(None),
        };
        let (nudge, nudged) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            awaited: Mutex::default(),
            counters: Arc::clone(counters),
            replies,
            nudge,
            nudged,
            returns,
            max_reply: options.max_reply,
            server_user: options.server_user.clone(),
        });
        let publisher = Arc::new(Publisher::new(channel));
        let idle = Arc::clone(&shared);
        let (watched, socket_to_cut) = (Arc::clone(&publisher), socket.try_clone().ok());
        thread::Builder::new()
            .name("rpc-client-idle".into())
            .spawn(move || drain_while_idle(&idle, &watched, socket_to_cut.as_ref()))
            .map_err(|e| Error::Internal(format!("cannot start the client's idle thread: {e}")))?;
        debug!("client ready, replies to {reply_to}");
        let connection = Arc::new(Mutex::new(Some(connection)));
        Ok(Session {
            publisher,
            probe: Probe::new(Arc::clone(&connection)),
            connection,
            socket,
            reply_to,
            shared,
            blocks,
            user,
        })
    }

    /// True once the session can carry no more calls.
    pub(crate) fn is_broken(&self) -> bool {
        self.shared.awaited().broken.is_some()
    }

    /// Why the session can carry no more calls, once it cannot.
    pub(crate) fn broken(&self) -> Option<Error> {
        self.shared.awaited().broken.clone()
    }

    /// Registers `calls` (each with its index in the caller's batch and its deadline)
    /// so that their outcomes come to `events`, publishes them, and returns their correlation
    /// ids, in order, and the caller's role: the reader when nobody else reads.
    ///
    /// # Errors
    ///
    /// Why the session is broken, or broke while publishing; then it is marked broken, and the
    /// caller holds no role.
    pub(crate) fn start<'c>(
        &self,
        calls: impl ExactSizeIterator<Item = (usize, &'c Call, &'c Destination, Instant)>,
        mailbox: &Arc<Mailbox>,
    ) -> Result<(Vec<String>, Role)> {
        let role;
        let mut ids = Vec::with_capacity(calls.len());
        let mut requests = Vec::with_capacity(calls.len());
        {
            // Registered before publishing: a reply can arrive before `basic_publish` returns.
            let mut awaited = self.shared.awaited();
            if let Some(error) = &awaited.broken {
                return Err(error.clone());
            }
            awaited.last_call = Some(Instant::now());
            for (index, call, destination, deadline) in calls {
                let id = Uuid::new_v4().to_string();
                let waiter = Waiter {
                    mailbox: Arc::clone(mailbox),
                    index,
                };
                awaited.calls.insert(id.clone(), waiter);
                requests.push((call, destination, deadline));
                ids.push(id);
            }
            role = if awaited.reading {
                if awaited.idle_reading {
                    // Full when a nudge is already on its way.
                    let _ = self.shared.nudge.try_send(());
                }
                Role::Follower
            } else {
                awaited.reading = true;
                Role::Reader
            };
        }
        for ((call, destination, deadline), id) in requests.into_iter().zip(&ids) {
            if let Err(error) = self.publish(call, destination, id, deadline) {
                // The idle thread's reason, when it cut a publish that was stuck.
                let error = self.shared.break_with(error);
                self.leave(role, &ids, mailbox);
                return Err(error);
            }
        }
        Ok((ids, role))
    }

    /// Publishes a request to `destination`, with the time its call has left, unless the
    /// call's `deadline` passes before its turn comes (see [`Publisher`]): it then stays
    /// unsent, and the call times out.
    fn publish(
        &self,
        call: &Call,
        destination: &Destination,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut properties = wire::request_properties(call, &self.reply_to, correlation_id, left);
        if let Some(user) = &self.user {
            properties = properties.with_user_id(user.clone());
        }
        let publish = Publish {
            body: &call.body,
            routing_key: destination.routing_key().to_string(),
            mandatory: true,
            immediate: false,
            properties,
        };
        if self
            .publisher
            .publish(destination.exchange_name(), publish, deadline)?
        {
            trace!("published request {correlation_id} to {destination}");
        } else {
            debug!(
                "request {correlation_id} not sent: its deadline passed while another request \
                 was being handed to the connection"
            );
        }
        Ok(())
    }

    /// Stops awaiting the calls with these correlation ids (they timed out): a reply that
    /// comes for one later is dropped as late.
    pub(crate) fn forget(&self, ids: Vec<String>) {
        let mut awaited = self.shared.awaited();
        for id in ids {
            awaited.calls.remove(&id);
            if awaited.timed_out.len() == REMEMBERED_TIMEOUTS {
                awaited.timed_out.pop_front();
            }
            awaited.timed_out.push_back(id);
        }
    }

    /// Why the broker blocks this connection (a resource alarm: "low on memory", "low on
    /// disk"), while it does. Such a broker reads nothing more from the connection until the
    /// alarm clears: requests published meanwhile wait unsent, and a question to the broker
    /// would wait for its answer as long.
    pub(crate) fn blocked(&self) -> Option<String> {
        let blocks = &self.blocks;
        // What every call sees: not blocked, and no news; no lock taken.
        if !blocks.blocked.load(Ordering::Acquire) && blocks.notifications.is_empty() {
            return None;
        }
        let mut reason = lock(&blocks.reason);
        while let Ok(notification) = blocks.notifications.try_recv() {
            *reason = match notification {
                ConnectionBlockedNotification::Blocked(reason) => {
                    warn!("the broker blocks this client's connection: {reason}");
                    Some(reason)
                }
                ConnectionBlockedNotification::Unblocked => {
                    warn!("the broker no longer blocks this client's connection");
                    None
                }
            };
        }
        blocks.blocked.store(reason.is_some(), Ordering::Release);
        reason.clone()
    }

    /// What the broker says of `queue` now: its consumers and waiting requests (see
    /// [`Probe::queue_state`]); `None` when it cannot say, or blocks the connection (see
    /// [`Session::blocked`]), when it would not answer until the block lifts.
    pub(crate) fn queue_state(&self, queue: &str) -> Option<QueueState> {
        if self.blocked().is_some() {
            return None;
        }
        self.probe.queue_state(queue)
    }

    /// Whether `exchange` exists (see [`Probe::exchange_exists`]).
    pub(crate) fn exchange_exists(&self, exchange: &str, deadline: Instant) -> Option<bool> {
        if self.blocked().is_some() {
            return None;
        }
        self.probe.exchange_exists(exchange, deadline)
    }

    /// Ends a caller's wait: forgets its calls still awaited (`ids`), and passes the reader
    /// role on if it holds it, or if it was handed the role (an [`Event::Read`] still in its
    /// `mailbox`) just as it gave up. Answers still in the mailbox are dropped.
    pub(crate) fn leave(&self, role: Role, ids: &[String], mailbox: &Mailbox) {
        let mut awaited = self.shared.awaited();
        for id in ids {
            awaited.calls.remove(id);
        }
        // Under the lock, so that no role can be handed to this caller after this look.
        let handed_the_role =
            std::iter::from_fn(|| mailbox.take()).any(|event| matches!(event, Event::Read));
        if role == Role::Reader || handed_the_role {
            awaited.pass_reading_on();
        }
    }

    /// As the reader: reads the next reply or returned request and hands it to the call that
    /// awaits it, or waits until `deadline` for one; see [`Shared::read`].
    pub(crate) fn read(&self, deadline: Instant) {
        self.shared.read(deadline);
    }

    /// Closes the connection, which ends the reply consumer, within a bound (see
    /// [`connect::close`]).
    ///
    /// # Errors
    ///
    /// [`Error::ConnectionLost`] or [`Error::Amqp`] when the broker does not confirm the
    /// close.
    pub(crate) fn close(&self) -> Result<()> {
        self.shared
            .break_with(Error::lost(amiquip::Error::ClientClosedConnection));
        // A question to the broker may hold the connection, opening a channel.
        let connection = Arc::clone(&self.connection);
        connect::close_when_free(move || lock(&connection).take(), &self.socket)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            debug!("closing the client quietly: {error}");
        }
    }
}

/// What a session reads and publishes through, set up on a new connection by [`set_up`].
struct SetUp {
    channel: Channel,
    notifications: Receiver<ConnectionBlockedNotification>,
    returns: Receiver<Return>,
    reply_to: String,
    replies: Receiver<ConsumerMessage>,
}

/// Sets a new connection up for a session: the notifications of blocks, the channel, its
/// returns, the reply queue (unless direct reply-to) and its consumer. Gives the connection
/// back whatever happens, for the caller to close.
fn set_up(mut connection: Connection, route: ReplyRoute) -> (Connection, amiquip::Result<SetUp>) {
    let set_up = set_up_on(&mut connection, route);
    (connection, set_up)
}

fn set_up_on(connection: &mut Connection, route: ReplyRoute) -> amiquip::Result<SetUp> {
    let notifications = connection.listen_for_connection_blocked()?;
    let channel = connection.open_channel(None)?;
    let returns = channel.listen_for_returns()?;
    let reply_to = match route {
        ReplyRoute::ExclusiveQueue => channel
            .queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
            )?
            .name()
            .to_string(),
        ReplyRoute::DirectReplyTo => DIRECT_REPLY_TO.to_string(),
    };
    // Direct reply-to requires consuming, without acks, before the first publish.
    let consumer = channel.basic_consume(
        reply_to.clone(),
        ConsumerOptions {
            no_ack: true,
            exclusive: route == ReplyRoute::ExclusiveQueue,
            ..ConsumerOptions::default()
        },
    )?;
    let replies = consumer.receiver().clone();
    // Never cancelled and never dropped: see the module documentation.
    std::mem::forget(consumer);
    Ok(SetUp {
        channel,
        notifications,
        returns,
        reply_to,
        replies,
    })
}

/// Once no call has waited for `IDLE` (so never between the calls of a busy client), takes
/// the reader role and drops what comes (late replies, strays, a flood from a hostile peer),
/// so that nothing piles up in the reply consumer between calls; ends when the connection
/// does. Its turn ends with each message, and as soon as a call begins: the call, a follower
/// while the drain reads, nudges it, and the role passes to the call. An idle client thus
/// sleeps instead of polling: turns of 10 ms woke it 233 times a second (0.4% of a core).
/// Two threads never read at once: a reader blocked on the consumer would not see an answer
/// that another put in its mailbox.
///
/// While calls wait, it also watches `publisher`: a publish stuck [`STUCK_PUBLISH`] past its
/// call's deadline ends when this thread breaks the session and cuts `socket`, the
/// connection's own (see [`Publisher`]).
fn drain_while_idle(shared: &Shared, publisher: &Publisher, socket: Option<&TcpStream>) {
    const IDLE: Duration = Duration::from_millis(50);
    // The longest turn, for a session that broke without a word on its consumer.
    const LONGEST_TURN: Duration = Duration::from_secs(1);
    loop {
        {
            let mut awaited = shared.awaited();
            if awaited.broken.is_some() {
                return;
            }
            let idle_for = if awaited.reading || !awaited.calls.is_empty() {
                Duration::ZERO
            } else {
                awaited.last_call.map_or(IDLE, |last| last.elapsed())
            };
            if idle_for < IDLE {
                drop(awaited);
                if publisher.is_stuck() {
                    cut_stuck_publish(shared, socket);
                    return;
                }
                thread::sleep(IDLE - idle_for);
                continue;
            }
            awaited.reading = true;
            awaited.idle_reading = true;
            // A nudge left from an earlier turn is stale; under the lock, no new one can come
            // before this.
            while shared.nudged.try_recv().is_ok() {}
        }
        let ended = select! {
            recv(shared.replies) -> message => match message {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    if shared.is_from_the_server(&delivery) {
                        shared.answer(vec![reply_outcome(delivery, shared.max_reply)]);
                    }
                    None
                }
                Ok(other) => Some(consumer_ended(other)),
                Err(_) => Some(Error::lost(amiquip::Error::EventLoopDropped)),
            },
            recv(shared.returns) -> returned => match returned {
                Ok(returned) => {
                    shared.answer(vec![returned_outcome(returned)]);
                    None
                }
                Err(_) => Some(Error::lost(amiquip::Error::EventLoopDropped)),
            },
            recv(shared.nudged) -> _ => None,
            default(LONGEST_TURN) => None,
        };
        if let Some(error) = ended {
            shared.break_with(error);
            return;
        }
        // The turn is over: to a call that began meanwhile, or to nobody.
        let mut awaited = shared.awaited();
        awaited.idle_reading = false;
        awaited.pass_reading_on();
    }
}

/// Ends a publish that [`Publisher::is_stuck`]: breaks the session, which fails every call
/// waiting on it as a lost connection (or has it sent again, with retry), and cuts `socket`,
/// which ends amiquip's I/O thread, and the publish with it.
fn cut_stuck_publish(shared: &Shared, socket: Option<&TcpStream>) {
    warn!(
        "a request could not be handed to the connection within {} s past its call's timeout \
         (a broker that reads nothing: paused, or behind a network that drops everything): \
         cutting the connection",
        STUCK_PUBLISH.as_secs()
    );
    shared.break_with(Error::lost(amiquip::Error::IoErrorWritingSocket {
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the broker read none of the requests waiting to be sent for a call's whole \
             timeout: the client cut the connection",
        ),
    }));
    if let Some(socket) = socket {
        let _ = socket.shutdown(Shutdown::Both);
    }
}

/// A reply's correlation id, and what it means for the call: the reply or the server's error.
fn reply_outcome(delivery: Delivery, max_reply: usize) -> (String, Result<Reply>) {
    let id = delivery
        .properties
        .correlation_id()
        .clone()
        .unwrap_or_default();
    trace!("reply to {id:?} arrived");
    let size = delivery.body.len();
    let outcome = if size > max_reply {
        Err(Error::InvalidReply(format!(
            "a reply of {size} bytes is over this client's limit of {max_reply} bytes"
        )))
    } else {
        wire::reply_from(delivery)
    };
    if let Err(Error::InvalidReply(why)) = &outcome {
        debug!("reply to {id:?}: {why}");
    }
    (id, outcome)
}

/// A request the broker could not route: no queue by that name, or none bound for its key.
fn returned_outcome(returned: Return) -> (String, Result<Reply>) {
    let id = returned
        .properties
        .correlation_id()
        .clone()
        .unwrap_or_default();
    debug!("request {id} returned: {}", returned.reply_text);
    let destination = Destination::published_to(&returned.exchange, &returned.routing_key);
    (id, Err(Error::NoRoute { destination }))
}

/// Explains why the reply consumer stopped delivering.
fn consumer_ended(message: ConsumerMessage) -> Error {
    match message {
        ConsumerMessage::ServerClosedConnection(error)
        | ConsumerMessage::ServerClosedChannel(error) => Error::from_amqp(error),
        ConsumerMessage::ClientClosedConnection => {
            Error::lost(amiquip::Error::ClientClosedConnection)
        }
        ConsumerMessage::ClientClosedChannel
        | ConsumerMessage::ClientCancelled
        | ConsumerMessage::ServerCancelled
        | ConsumerMessage::Delivery(_) => Error::lost(amiquip::Error::ClientClosedChannel),
    }
}
