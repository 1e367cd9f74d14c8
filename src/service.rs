//! What a server serves: a [`Handler`] for each queue, and what the workers of one queue
//! share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::message::{HandlerError, Reply, Request};
use crate::server_options::QueueOptions;
use crate::stats::QueueMetrics;
use crate::sync::lock;

/// Answers requests. An `Err` is sent back to the caller as an error reply.
///
/// Any `Fn(&Request) -> Result<R, HandlerError>` that can be shared across threads is a
/// handler, where `R` is a [`Reply`] or converts into one (`Vec<u8>`, `String`, `&str`):
///
/// ```
/// use amqp_rpc::{HandlerError, Reply, Request};
///
/// let echo = |request: &Request| -> Result<Vec<u8>, HandlerError> { Ok(request.body().to_vec()) };
/// let greet = |request: &Request| -> Result<Reply, HandlerError> {
///     let name = request.header_str("x-name").ok_or_else(|| HandlerError::bad_request("no x-name header"))?;
///     Ok(Reply::new(format!("hello, {name}")).with_content_type("text/plain"))
/// };
/// # fn is_handler(_: impl amqp_rpc::Handler) {}
/// # is_handler(echo);
/// # is_handler(greet);
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`], which the caller receives as [`Error::Remote`](crate::Error::Remote).
    fn handle(&self, request: &Request) -> std::result::Result<Reply, HandlerError>;
}

impl<F, R> Handler for F
where
    F: Fn(&Request) -> std::result::Result<R, HandlerError> + Send + Sync + 'static,
    R: Into<Reply>,
{
    fn handle(&self, request: &Request) -> std::result::Result<Reply, HandlerError> {
        self(request).map(Into::into)
    }
}

/// One queue a server serves, with its handler.
pub(crate) struct Service {
    pub(crate) queue: String,
    pub(crate) options: QueueOptions,
    pub(crate) handler: Arc<dyn Handler>,
    /// Requests for which the broker refused something, closing the worker's channel (their
    /// reply, or counting their deliveries), by [`reply_key`], with the message to answer
    /// them with. When such a request comes back (it was never acked), it is answered with
    /// that error instead of running it again, so that it cannot loop.
    pub(crate) refused: Mutex<HashMap<String, String>>,
    pub(crate) metrics: QueueMetrics,
}

impl Service {
    /// Remembers that the broker refused something for the request `key`, which is answered
    /// with `message` when it comes back.
    pub(crate) fn refused(&self, key: String, message: String) {
        lock(&self.refused).insert(key, message);
    }
}
