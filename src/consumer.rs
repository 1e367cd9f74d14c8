//! Ending an amiquip consumer without killing its connection.
//!
//! amiquip 0.4.2 has a bug that this crate must work around wherever it consumes (see
//! `docs/amiquip.md`): when the broker confirms a consumer's cancel, amiquip's I/O thread
//! first wakes the thread blocked in `Consumer::cancel`, then sends `ClientCancelled` into the
//! consumer's receiver. If the `Consumer` has been dropped in between, that send fails, the
//! I/O thread treats it as fatal and stops, and every channel on the connection dies with it.
//!
//! So a consumer is ended in three steps: cancel it, keep reading a clone of its receiver until
//! `ClientCancelled` (or another end of stream) arrives, and only then drop it. Deliveries that
//! raced the cancel arrive during the second step and must be dealt with (requeued by a
//! server, dropped by a client).

use std::time::{Duration, Instant};

use amiquip::{Consumer, ConsumerMessage, Delivery};
use crossbeam_channel::Receiver;

/// Cancels `consumer` and reads `messages`, a clone of its receiver, until the broker
/// confirms the cancel, the stream ends, or `give_up` passes. Hands each delivery that raced
/// the cancel to `leftover`. The caller may drop the consumer once this returns.
///
/// # Errors
///
/// The cancel's own error (the channel or connection is already gone; then no confirmation
/// can come and dropping is safe), or the first error of `leftover`.
pub(crate) fn cancel(
    consumer: &Consumer,
    messages: &Receiver<ConsumerMessage>,
    give_up: Duration,
    mut leftover: impl FnMut(Delivery) -> amiquip::Result<()>,
) -> amiquip::Result<()> {
    consumer.cancel()?;
    let give_up = Instant::now() + give_up;
    while let Ok(message) = messages.recv_deadline(give_up) {
        match message {
            ConsumerMessage::Delivery(delivery) => leftover(delivery)?,
            _ => break,
        }
    }
    Ok(())
}
