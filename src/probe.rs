//! Questions a client's session asks the broker about where its calls go: how a queue stands
//! (its consumers and waiting requests, to tell a missing server from a slow one), and
//! whether an exchange exists (publishing to a missing one would close the channel every call
//! shares).
//!
//! Each question is a passive declare, which closes its channel when the queue or exchange is
//! missing; so each goes on a channel of its own, opened for it and closed after, and the
//! session's one publishing channel is never at risk. At rest a client holds just that one
//! channel. Each is asked from a thread of its own, so that the asker can stop waiting:
//! amiquip's calls wait for the broker without a bound, opening a channel too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection};
use log::{debug, trace};

use crate::error::QueueState;
use crate::sync::{lock, wait_timeout};

/// How long an answer about a queue is reused: the broker is asked about each queue at most
/// this often per session, so two answers are always at least this far apart.
pub(crate) const QUEUE_STATE_FRESH: Duration = Duration::from_secs(1);

/// How long a look at a queue waits for the broker's answer. A broker that answers at all
/// answers a passive declare within milliseconds; one that has stopped answering without
/// closing the connection (a paused machine, a network that TCP has not yet seen fail, a block
/// that began while the question was out) would otherwise hold a call that timed out until its
/// heartbeat ran out or the broker came back.
const QUEUE_STATE_WAIT: Duration = Duration::from_millis(250);

/// The most queues and exchanges remembered; a client calling more forgets the oldest
/// answers, which it would not reuse anyway.
const MOST_REMEMBERED: usize = 1024;

/// The questions of one session, and their answers.
pub(crate) struct Probe {
    connection: Arc<Mutex<Option<Connection>>>,
    /// What each queue looked like last, and the questions out; signalled when one is
    /// answered.
    looks: Arc<(Mutex<HashMap<String, Look>>, Condvar)>,
    /// Exchanges the broker said exist, for this session.
    exchanges: Mutex<HashSet<String>>,
}

/// The state of the questions about one queue.
#[derive(Default)]
struct Look {
    /// When the question now out was asked.
    asking_since: Option<Instant>,
    /// When the last question was answered, and what the broker said (`None`: it could not
    /// say, the queue missing, say).
    last: Option<(Instant, Option<QueueState>)>,
}

impl Probe {
    pub(crate) fn new(connection: Arc<Mutex<Option<Connection>>>) -> Probe {
        Probe {
            connection,
            looks: Arc::default(),
            exchanges: Mutex::default(),
        }
    }

    /// What the broker says of `queue` now: its consumers and waiting requests. Asked at most
    /// once a second per queue; `None` when the broker cannot say or does not answer within
    /// [`QUEUE_STATE_WAIT`] of the question. Looks at other queues never wait for this one's.
    pub(crate) fn queue_state(&self, queue: &str) -> Option<QueueState> {
        let (looks, answered) = &*self.looks;
        let mut all = lock(looks);
        if all.len() >= MOST_REMEMBERED && !all.contains_key(queue) {
            all.retain(|_, look| look.asking_since.is_some());
        }
        let look = all.entry(queue.to_string()).or_default();
        if let Some((at, state)) = look.last
            && at.elapsed() < QUEUE_STATE_FRESH
        {
            return state;
        }
        let asked = match look.asking_since {
            Some(since) => since,
            None => {
                let since = Instant::now();
                if !self.ask_about_queue(queue) {
                    return None;
                }
                look.asking_since = Some(since);
                since
            }
        };
        loop {
            if let Some(Look {
                last: Some((at, state)),
                ..
            }) = all.get(queue)
                && *at >= asked
            {
                return *state;
            }
            let left = (asked + QUEUE_STATE_WAIT).saturating_duration_since(Instant::now());
            if left.is_zero() {
                debug!(
                    "the broker has not said within {} s how queue '{queue}' stands",
                    QUEUE_STATE_WAIT.as_secs_f64()
                );
                return None;
            }
            all = wait_timeout(answered, all, left);
        }
    }

    /// Asks about `queue`; the answer goes to [`Probe::looks`]. False when no thread could be
    /// started to ask.
    fn ask_about_queue(&self, queue: &str) -> bool {
        let looks = Arc::clone(&self.looks);
        let name = queue.to_string();
        ask(
            &self.connection,
            queue.to_string(),
            |channel, queue| {
                let declared = channel.queue_declare_passive(queue)?;
                Ok(declared
                    .declared_consumer_count()
                    .zip(declared.declared_message_count())
                    .map(|(consumers, waiting)| QueueState { consumers, waiting }))
            },
            move |answer| {
                let state = match answer {
                    Ok(state) => {
                        trace!("queue '{name}': {state:?}");
                        state
                    }
                    Err(error) => {
                        debug!("cannot ask the broker about queue '{name}': {error}");
                        None
                    }
                };
                let (looks, answered) = &*looks;
                let mut all = lock(looks);
                let look = all.entry(name).or_default();
                look.asking_since = None;
                look.last = Some((Instant::now(), state));
                answered.notify_all();
            },
        )
    }

    /// Whether `exchange` exists: `Some(true)` once the broker has said so (remembered for
    /// the session), `Some(false)` when it says there is none, `None` when it does not answer
    /// by `deadline` or cannot say.
    pub(crate) fn exchange_exists(&self, exchange: &str, deadline: Instant) -> Option<bool> {
        if lock(&self.exchanges).contains(exchange) {
            return Some(true);
        }
        let (tell, told) = crossbeam_channel::bounded(1);
        let asked = ask(
            &self.connection,
            exchange.to_string(),
            |channel, exchange| channel.exchange_declare_passive(exchange).map(drop),
            move |answer| {
                let _ = tell.send(answer);
            },
        );
        if !asked {
            return None;
        }
        match told.recv_deadline(deadline) {
            Ok(Ok(())) => {
                let mut known = lock(&self.exchanges);
                if known.len() >= MOST_REMEMBERED {
                    known.clear();
                }
                known.insert(exchange.to_string());
                Some(true)
            }
            Ok(Err(amiquip::Error::ServerClosedChannel { code: 404, .. })) => Some(false),
            Ok(Err(error)) => {
                debug!("cannot ask the broker about exchange '{exchange}': {error}");
                None
            }
            Err(_) => None,
        }
    }
}

/// Asks `question` about `name` on a new channel of `connection`, from a thread of its own,
/// and hands the answer to `answer` once the broker gives it or the connection ends; then
/// closes the channel. False when the thread cannot start.
fn ask<T: Send + 'static>(
    connection: &Arc<Mutex<Option<Connection>>>,
    name: String,
    question: impl FnOnce(&Channel, &str) -> amiquip::Result<T> + Send + 'static,
    answer: impl FnOnce(amiquip::Result<T>) + Send + 'static,
) -> bool {
    let connection = Arc::clone(connection);
    let asked = thread::Builder::new()
        .name("rpc-client-probe".into())
        .spawn(move || {
            let opened = match lock(&connection).as_mut() {
                Some(connection) => connection.open_channel(None),
                None => Err(amiquip::Error::ClientClosedConnection),
            };
            match opened {
                Ok(channel) => {
                    let answered = question(&channel, &name);
                    answer(answered);
                    // After a missing queue or exchange, the broker has closed it already.
                    let _ = channel.close();
                }
                Err(error) => answer(Err(error)),
            }
        });
    match asked {
        Ok(_) => true,
        Err(error) => {
            debug!("cannot start a thread to ask the broker a question: {error}");
            false
        }
    }
}
