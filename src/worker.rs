//! One request's path through a server, top to bottom: a worker takes it from its queue,
//! answers what cannot be run (no `reply_to`, one not answered, a deadline passed, properties
//! that could not be read, a request delivered as often as its queue's delivery limit allows),
//! runs the handler on the rest (a panic becomes a handler failure), publishes the reply with
//! the request's `correlation_id`, and only then acks the request. A worker that dies before
//! the ack leaves the request to the broker, which delivers it again.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{Channel, ConsumerMessage, ConsumerOptions, Delivery, Publish};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};
use log::{debug, trace, warn};

use crate::deliveries::{self, DeliveryCounter};
use crate::error::{Error, Result};
use crate::headers::{HeaderValue, MAX_HEADER_DEPTH};
use crate::message::{HandlerError, Reply, Request};
use crate::server_options::{QueueType, reply_to_allowed};
use crate::service::Service;
use crate::sync::lock;
use crate::wire;

/// Never sent: dropping every `Sender<Stop>` is the signal.
pub(crate) enum Stop {}

/// True once shutdown has been asked for (every sender dropped).
pub(crate) fn is_stopped(stop: &Receiver<Stop>) -> bool {
    matches!(
        stop.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

/// How often a worker between requests looks whether shutdown has been asked for; a busy
/// worker looks before each request. Shutdown stops taking requests at most this late.
const STOP_POLL: Duration = Duration::from_millis(50);

/// How long a worker goes without a request before it stops polling (see [`STOP_POLL`]) and
/// sleeps until a request or the stop signal comes. Polling, each of 4 idle workers woke about
/// 90 times a second (8 of crossbeam's yields and a park per poll), and an idle server used
/// 0.6% of a core; with more workers (two per core by default) it grows with the machine.
const SLEEP_AFTER: Duration = Duration::from_millis(100);

/// One worker thread's state: its channel, and the queue it serves.
pub(crate) struct Worker {
    /// Its number in the pool, which its thread's name shows.
    pub(crate) number: usize,
    pub(crate) channel: Channel,
    /// Where it counts the deliveries of requests that come back, for a classic queue with a
    /// delivery limit.
    pub(crate) counter: Option<DeliveryCounter>,
    pub(crate) service: Arc<Service>,
    pub(crate) stop: Receiver<Stop>,
    /// The connection's user, which replies carry as `user_id` for the broker to verify, when
    /// known.
    pub(crate) user: Option<String>,
}

impl Worker {
    /// Serves until shutdown (`Ok`) or until the channel or connection fails (`Err`). Sends
    /// to `ready` once it consumes, and to `done_serving` once it takes no more requests and
    /// has none left.
    pub(crate) fn run(self, ready: Sender<()>, done_serving: Sender<usize>) -> Result<()> {
        let queue = self.service.queue.as_str();
        self.channel.qos(0, self.service.options.prefetch, false)?;
        let consumer = self
            .channel
            .basic_consume(queue, ConsumerOptions::default())?;
        let deliveries = consumer.receiver().clone();
        let _ = ready.send(());
        // The last request answered: when the broker then closes the channel, it refused that
        // reply (publishing returns before the broker has seen the message).
        let mut last_answered = None;
        let mut last_request = Instant::now();
        let failure = loop {
            // The worker waits on its deliveries alone and looks at the stop signal before
            // each request and after each STOP_POLL of idleness, rather than `select!` over the
            // deliveries and the stop signal, which made sequential round trips slower.
            // bench/raw_echo's client calling one after another, 4 workers, 2 cores, medians of
            // interleaved rounds: 3,074 calls/s through `select!`, 3,306 this way (15 rounds
            // of 5,000 calls; two shorter runs gave +9% and +4%). With 8 calling threads or 32
            // calls in flight the two were within noise, in rate and in server CPU per call.
            // `recv_timeout` yields the processor four times before it sleeps (crossbeam's
            // backoff; 17% of the server's perf samples with 8 threads), which `select!` does
            // not; yet on a second machine `select!` over the deliveries alone was again slower
            // sequentially (0.92x, 7 rounds) and equal with 8 threads (1.01x). Once idle for
            // SLEEP_AFTER, where speed no longer matters, it waits on both without polling.
            if is_stopped(&self.stop) {
                break None;
            }
            let message = if last_request.elapsed() < SLEEP_AFTER {
                match deliveries.recv_timeout(STOP_POLL) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        break Some(Error::lost(amiquip::Error::EventLoopDropped));
                    }
                }
            } else {
                trace!("worker of queue '{queue}' idle: sleeping until a request comes");
                select! {
                    recv(deliveries) -> message => match message {
                        Ok(message) => message,
                        Err(_) => break Some(Error::lost(amiquip::Error::EventLoopDropped)),
                    },
                    // Nothing is ever sent: this ends when every sender is dropped, the stop
                    // signal.
                    recv(self.stop) -> _ => break None,
                }
            };
            last_request = Instant::now();
            match message {
                ConsumerMessage::Delivery(delivery) => match self.serve(delivery) {
                    Ok(key) => last_answered = key,
                    Err(error) => break Some(error),
                },
                ConsumerMessage::ServerCancelled => {
                    break Some(Error::ConsumerCancelled {
                        queue: queue.to_string(),
                    });
                }
                ConsumerMessage::ServerClosedChannel(error) => {
                    let error = Error::from_amqp(error);
                    if let (Error::Refused { text, .. }, Some(key)) = (&error, last_answered.take())
                    {
                        self.service.refused(key, refused_reply(text));
                    }
                    break Some(error);
                }
                ConsumerMessage::ServerClosedConnection(error) => {
                    break Some(Error::from_amqp(error));
                }
                _ => break Some(Error::lost(amiquip::Error::EventLoopDropped)),
            }
        };
        // No request is left: the drain need only wait for the broker's confirmations now.
        let _ = done_serving.send(self.number);
        // After a failure the cancel usually fails at once, on a dead connection; that is
        // fine, the supervisor closes it anyway. Deliveries that raced the cancel go back to
        // the queue, for another worker or server.
        let cancelled =
            crate::consumer::cancel(&consumer, &deliveries, Duration::from_secs(5), |delivery| {
                consumer.nack(delivery, true)
            });
        drop(consumer);
        match failure {
            Some(error) => Err(error),
            None => {
                cancelled?;
                self.channel.close()?;
                Ok(())
            }
        }
    }

    /// Answers one request, then acks it; returns its [`reply_key`] when a reply was sent.
    fn serve(&self, mut delivery: Delivery) -> Result<Option<String>> {
        // The body and properties move into the request; the rest of the delivery is kept for
        // the ack.
        let request = wire::request_from(
            std::mem::take(&mut delivery.body),
            std::mem::take(&mut delivery.properties),
            delivery.redelivered,
            &self.service.queue,
        );
        let queue = &self.service.queue;
        let metrics = &self.service.metrics;
        metrics.requests.inc();
        if request.is_redelivered() {
            metrics.redeliveries.inc();
        }
        let trace = request
            .trace_id()
            .map(|id| format!(", trace {id}"))
            .unwrap_or_default();
        debug!("request {:?} on '{queue}'{trace}", request.correlation_id());
        let Some(reply_to) = request.reply_to() else {
            match &request.undecodable {
                Some(why) => warn!(
                    "dropping a request on '{queue}' whose properties could not be decoded, \
                     leaving no reply_to to answer: {why}"
                ),
                None => warn!(
                    "dropping a request without reply_to (correlation id {:?}): nobody to \
                     answer",
                    request.correlation_id()
                ),
            }
            delivery.ack(&self.channel)?;
            return Ok(None);
        };
        if !reply_to_allowed(reply_to, &self.service.options.reply_to) {
            metrics.refused_reply_to.inc();
            warn!(
                "not answering request {:?} on '{queue}'{trace}: reply_to {reply_to:?} is not a \
                 queue a client could own (QueueOptions::reply_to lists the names answered)",
                request.correlation_id()
            );
            delivery.ack(&self.channel)?;
            return Ok(None);
        }
        if request.is_past_deadline() {
            metrics.skipped_past_deadline.inc();
            debug!(
                "skipping request {:?} on '{queue}': its deadline has passed, nobody waits",
                request.correlation_id()
            );
            delivery.ack(&self.channel)?;
            return Ok(None);
        }
        let key = reply_key(&request);
        let refused_before = request
            .is_redelivered()
            .then(|| lock(&self.service.refused).remove(&key))
            .flatten();
        let (outcome, counted) = match (&request.undecodable, refused_before) {
            // The log line of the error reply below says what happened, with what is known.
            (Some(why), _) => (
                Err(HandlerError::bad_request(format!(
                    "the request's properties could not be decoded: {why}"
                ))),
                None,
            ),
            (None, Some(message)) => (Err(HandlerError::failed(message)), None),
            (None, None) => self.answer_within_delivery_limit(&request, &key)?,
        };
        let correlation_id = request.correlation_id();
        let kind = outcome.as_ref().err().map(HandlerError::kind);
        let (body, properties) = match outcome {
            Ok(reply) => {
                let properties = wire::reply_properties(&reply, &request);
                (reply.into_body(), properties)
            }
            Err(error) => {
                warn!("answering request {correlation_id:?} on '{queue}' with an error: {error}");
                let properties = wire::error_properties(&error, &request);
                (error.message().as_bytes().to_vec(), properties)
            }
        };
        let published = self.channel.basic_publish(
            "",
            Publish {
                body: &body,
                routing_key: reply_to.to_string(),
                mandatory: false,
                immediate: false,
                properties: match &self.user {
                    Some(user) => properties.with_user_id(user.clone()),
                    None => properties,
                },
            },
        );
        // A publish only hands the reply to amiquip: the broker's refusal (a reply too large for
        // it, say) comes later, as the channel closing (see `run`), or as the ack failing when
        // the close came first (a worker slow to ack, on a loaded machine). Either way the
        // request comes back unacked; remembered, it is then answered with an error instead of
        // running again.
        let sent = published
            .and_then(|()| delivery.ack(&self.channel))
            .map_err(Error::from);
        if let Err(Error::Refused { text, .. }) = &sent {
            self.service.refused(key.clone(), refused_reply(text));
        }
        sent?;
        metrics.count_reply(kind);
        trace!("replied to {correlation_id:?}");
        if let (Some(counter), Some(counted)) = (&self.counter, counted) {
            // Answered: its count is done with. The queue would expire anyway.
            counter.forget(&counted)?;
        }
        Ok(Some(key))
    }

    /// The handler's answer to `request`, unless the request has been delivered as many
    /// times as [`QueueOptions::delivery_limit`] allows without being answered: then a
    /// `handler-failed` error, without running the handler. With the queue of a classic
    /// queue's count, when it was counted there.
    ///
    /// # Errors
    ///
    /// When counting fails: the broker refused it (then the request is answered with the
    /// reason when it comes back), or the connection is gone.
    fn answer_within_delivery_limit(
        &self,
        request: &Request,
        key: &str,
    ) -> Result<(std::result::Result<Reply, HandlerError>, Option<String>)> {
        let Some(limit) = self.service.options.delivery_limit else {
            return Ok((self.answer(request), None));
        };
        let (before, counted) = match (self.service.options.queue_type, &self.counter) {
            (QueueType::Quorum, _) => (quorum_deliveries_before(request), None),
            // First delivered: nothing to count, nothing to pay.
            (QueueType::Classic, _) if !request.is_redelivered() => (0, None),
            (QueueType::Classic, None) => return Ok((self.answer(request), None)),
            (QueueType::Classic, Some(counter)) => {
                let name = deliveries::counter_name(&self.service.queue, key);
                match counter.count(&name) {
                    // This delivery is counted too; every delivery before a redelivery is
                    // counted, but the first, which is not redelivered.
                    Ok(deliveries) => (deliveries, Some(name)),
                    Err(error) => {
                        if let Error::Refused { text, .. } = &error {
                            self.service.refused(
                                key.to_string(),
                                format!(
                                    "the broker refused to count the deliveries of this \
                                     request, which its queue's delivery limit needs: {text}"
                                ),
                            );
                        }
                        return Err(error);
                    }
                }
            }
        };
        if before < limit {
            return Ok((self.answer(request), counted));
        }
        self.service.metrics.over_delivery_limit.inc();
        let refusal = HandlerError::failed(format!(
            "this request was delivered {before} times without being answered (its servers \
             stopped or died while handling it), as many as its queue's delivery limit \
             allows: it is not run again"
        ));
        Ok((Err(refusal), counted))
    }

    /// The handler's answer, unless the body is over the queue's limit; a panic becomes a
    /// handler failure.
    fn answer(&self, request: &Request) -> std::result::Result<Reply, HandlerError> {
        let limit = self.service.options.max_body;
        if request.body().len() > limit {
            return Err(HandlerError::bad_request(format!(
                "the request body of {} bytes is over this server's limit of {limit} bytes",
                request.body().len()
            )));
        }
        let metrics = &self.service.metrics;
        metrics.busy.inc();
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.service.handler.handle(request)))
            .unwrap_or_else(|panic| {
                Err(HandlerError::failed(format!(
                    "the handler panicked: {}",
                    panic_message(&*panic)
                )))
            });
        metrics.handler_time.record(started.elapsed());
        metrics.busy.dec();
        let depth = outcome.as_ref().map_or(0, |reply| reply.headers.depth());
        if depth > MAX_HEADER_DEPTH {
            return Err(HandlerError::failed(format!(
                "the handler's reply has headers nested {depth} deep, deeper than the \
                 {MAX_HEADER_DEPTH} that clients accept"
            )));
        }
        outcome
    }
}

/// The message of a request whose reply the broker refused, for when it comes back.
fn refused_reply(text: &str) -> String {
    format!("the broker refused the reply to this request: {text}")
}

/// How many times the broker delivered a request of a quorum queue before, unanswered: its
/// `x-delivery-count` header, which the broker sets when it delivers a request again.
fn quorum_deliveries_before(request: &Request) -> u32 {
    request
        .header(DELIVERY_COUNT_HEADER)
        .and_then(HeaderValue::as_int)
        .map_or(0, |count| u32::try_from(count).unwrap_or(u32::MAX))
}

/// The header in which a quorum queue counts a message's earlier deliveries.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// What identifies a request across redeliveries, for [`Service::refused`] and
/// [`deliveries::counter_name`]: where its reply goes, and its correlation id.
fn reply_key(request: &Request) -> String {
    // Built by hand: `format!` cost a request 1,400 instructions, a tenth of all the server's
    // own work on it.
    let reply_to = request.reply_to().unwrap_or_default();
    let correlation_id = request.correlation_id().unwrap_or_default();
    let mut key = String::with_capacity(reply_to.len() + 1 + correlation_id.len());
    key.push_str(reply_to);
    key.push('\n');
    key.push_str(correlation_id);
    key
}

/// The text of a panic's payload, when it has one.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}
