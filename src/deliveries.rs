//! Counting how many times a request of a classic queue was delivered, for the queue's
//! delivery limit ([`crate::QueueOptions::delivery_limit`]).
//!
//! A request whose handling kills its server (an abort in native code, running out of memory,
//! an orchestrator's SIGKILL in the middle) goes back to the queue unacked, and to the next
//! server, which it kills too. A quorum queue counts deliveries itself (`x-delivery-count`);
//! RabbitMQ 3.10's classic queues count nothing: a redelivered message carries only the
//! `redelivered` flag. So the servers count, in the broker, where every server of the queue
//! sees the count whatever process or machine it runs on:
//!
//! - A request delivered for the first time (`redelivered` unset) is served at once and costs
//!   nothing more: only requests that died with a server, or that a server put back, pay.
//! - For a redelivered request, the server declares a queue named after it,
//!   `amqp-rpc.deliveries.` and a name-based uuid of the server queue, the request's
//!   `reply_to` and its `correlation_id` (which every delivery of it carries unchanged), then
//!   publishes one empty message into it, waits for the broker to confirm it, and declares
//!   the queue again: its message count is the number of deliveries counted so far, this one
//!   included. Only then does the handler run. One counted delivery stands for each delivery
//!   before this one: the first (never counted) and the redeliveries counted before.
//! - Once the request is answered (and acked), its count's queue is deleted; one left behind
//!   (its request answered by another kind of server, or expired) deletes itself after an
//!   hour unused (`x-expires`).
//!
//! Why it is safe. Nothing is lost: the request itself is never taken out of its queue, nor
//! published again, until it is answered; the count is a separate queue, and counting only
//! delays the handler. Its `user_id`, which the broker verified when the caller published
//! it, stays as it was, so a handler's `Request::user_id` stays true. Nothing runs past the
//! limit: a delivery is counted, and the broker has confirmed it, before its handler runs;
//! a server that dies before that has not run the handler, and one that dies after has been
//! counted. A request is delivered to one server at a time, so two counts of one request
//! never race. What it can do wrong is count one delivery too many: a delivery that a server
//! put back without running it (it raced a shutdown) counts as one that died, as it does on a
//! quorum queue.

use std::time::Duration;

use amiquip::{
    AmqpValue, Channel, Confirm, Connection, FieldTable, Publish, QueueDeclareOptions,
    QueueDeleteOptions,
};
use crossbeam_channel::Receiver;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The start of the name of every queue in which deliveries are counted.
pub(crate) const COUNTER_PREFIX: &str = "amqp-rpc.deliveries.";

/// How long a count's queue lives unused before the broker deletes it.
const COUNTER_EXPIRES: Duration = Duration::from_secs(3600);

/// The code with which the broker refuses what it cannot take: what a publish's nack means.
const INTERNAL_ERROR: u16 = 541;

/// The name of the queue in which the deliveries of the request of `queue` identified by `key`
/// are counted: the same for every delivery of it, on every server.
pub(crate) fn counter_name(queue: &str, key: &str) -> String {
    let name = format!("amqp-rpc deliveries\n{queue}\n{key}");
    let id = Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes());
    format!("{COUNTER_PREFIX}{id}")
}

/// A channel in confirm mode on which a worker counts deliveries. A channel of its own: the
/// worker's channel publishes replies, which must not wait for confirms.
pub(crate) struct DeliveryCounter {
    channel: Channel,
    confirms: Receiver<Confirm>,
}

impl DeliveryCounter {
    /// Opens the counting channel on `connection`.
    ///
    /// # Errors
    ///
    /// When the broker refuses the channel or confirms, or the connection is gone.
    pub(crate) fn open(connection: &mut Connection) -> Result<DeliveryCounter> {
        let channel = connection.open_channel(None)?;
        let confirms = channel.listen_for_publisher_confirms()?;
        channel.enable_publisher_confirms()?;
        Ok(DeliveryCounter { channel, confirms })
    }

    /// Counts one more delivery in the queue `name`, and returns how many are counted there,
    /// this one included, once the broker has confirmed it.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] when the broker refuses the count's queue (a queue by that name
    /// declared otherwise, a permission it does not grant: see the least-privilege table) or
    /// the count itself; the errors of a lost connection.
    pub(crate) fn count(&self, name: &str) -> Result<u32> {
        self.channel.queue_declare(name, declare_options())?;
        self.channel
            .basic_publish("", Publish::new(b"", name.to_string()))?;
        // One publish at a time on this channel: the next confirm is this one's.
        match self.confirms.recv() {
            Ok(Confirm::Ack(_)) => {}
            Ok(Confirm::Nack(_)) => {
                return Err(Error::Refused {
                    code: INTERNAL_ERROR,
                    text: "the broker did not take the count of a delivery (it nacked it)".into(),
                });
            }
            Err(_) => return Err(Error::lost(amiquip::Error::EventLoopDropped)),
        }
        let counted = self.channel.queue_declare(name, declare_options())?;
        Ok(counted.declared_message_count().unwrap_or(0))
    }

    /// Deletes the queue `name`, whose request has been answered. A queue already gone is no
    /// error: RabbitMQ deletes a missing queue without a word.
    ///
    /// # Errors
    ///
    /// When the broker refuses, or the connection is gone.
    pub(crate) fn forget(&self, name: &str) -> Result<()> {
        self.channel
            .queue_delete(name, QueueDeleteOptions::default())?;
        Ok(())
    }
}

/// A count's queue: classic, not durable (a broker restart loses the requests of a classic
/// queue too), deleted after [`COUNTER_EXPIRES`] unused.
fn declare_options() -> QueueDeclareOptions {
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-expires".into(),
        AmqpValue::LongLongInt(COUNTER_EXPIRES.as_millis() as i64),
    );
    QueueDeclareOptions {
        arguments,
        ..QueueDeclareOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delivery_of_a_request_is_counted_in_one_queue_of_its_own() {
        let name = counter_name("rpc_queue", "amq.gen-a\n1");
        assert_eq!(name, counter_name("rpc_queue", "amq.gen-a\n1"));
        assert!(
            name.starts_with(COUNTER_PREFIX) && name.len() < 255,
            "{name}"
        );
        assert_ne!(name, counter_name("rpc_queue", "amq.gen-a\n2"));
        assert_ne!(name, counter_name("other_queue", "amq.gen-a\n1"));
    }
}
