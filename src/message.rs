//! What travels: a [`Call`] as a client sends it, a [`Request`] as a handler sees it, and the
//! [`Reply`] that goes back.
//!
//! The body is bytes; everything else is optional AMQP metadata, so the tutorial's peers in
//! other languages (which set only `reply_to` and `correlation_id`) work unchanged.

use std::time::{Duration, SystemTime};

use crate::destination::Destination;
use crate::headers::{HeaderValue, Headers, TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// A request as a client sends it: a body, optional metadata, and where it goes when not to
/// the client's default queue.
///
/// ```
/// use amqp_rpc::{Call, Destination};
/// use std::time::Duration;
///
/// let call = Call::new("hello")
///     .to("greeter")
///     .with_header("x-tenant", "acme")
///     .with_content_type("text/plain")
///     .with_timeout(Duration::from_secs(2));
/// assert_eq!(call.body(), b"hello");
/// assert_eq!(call.destination(), Some(&Destination::queue("greeter")));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Call {
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Headers,
    pub(crate) content_type: Option<String>,
    pub(crate) content_encoding: Option<String>,
    pub(crate) message_type: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) destination: Option<Destination>,
}

impl Call {
    /// A call with this body and no metadata; it waits the client's default timeout.
    pub fn new(body: impl Into<Vec<u8>>) -> Call {
        Call {
            body: body.into(),
            ..Call::default()
        }
    }

    /// Sends the call to `destination` instead of the client's default queue
    /// ([`crate::ClientOptions::queue`]): a queue by name (`.to("math.fib")`), or an exchange
    /// with a routing key ([`Destination::exchange`]).
    pub fn to(mut self, destination: impl Into<Destination>) -> Call {
        self.destination = Some(destination.into());
        self
    }

    /// Adds (or replaces) header `name`.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Call {
        self.headers.insert(name, value);
        self
    }

    /// Replaces all headers.
    pub fn with_headers(mut self, headers: Headers) -> Call {
        self.headers = headers;
        self
    }

    /// Sets the `content_type` property (a MIME type, such as `application/json`).
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Call {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the `content_encoding` property (such as `gzip`).
    pub fn with_content_encoding(mut self, encoding: impl Into<String>) -> Call {
        self.content_encoding = Some(encoding.into());
        self
    }

    /// Sets the `type` property, an application-defined message type name.
    pub fn with_type(mut self, message_type: impl Into<String>) -> Call {
        self.message_type = Some(message_type.into());
        self
    }

    /// Sets the `message_id` property.
    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Call {
        self.message_id = Some(message_id.into());
        self
    }

    /// Waits at most `timeout` for this call's reply instead of the client's default.
    pub fn with_timeout(mut self, timeout: Duration) -> Call {
        self.timeout = Some(timeout);
        self
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The timeout set with [`Call::with_timeout`], if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The destination set with [`Call::to`], if any; without one the call goes to the
    /// client's default queue.
    pub fn destination(&self) -> Option<&Destination> {
        self.destination.as_ref()
    }
}

/// A request as a handler sees it: the body and every property the broker delivered.
///
/// Built by the server for each delivery; [`Request::new`] makes one by hand, to test a
/// handler without a broker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub(crate) body: Vec<u8>,
    /// Why the delivery's properties could not be decoded, when they could not (see
    /// `inbound.rs`): the server answers such a request with an error, without the handler.
    pub(crate) undecodable: Option<String>,
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) headers: Headers,
    pub(crate) content_type: Option<String>,
    pub(crate) content_encoding: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) message_type: Option<String>,
    pub(crate) app_id: Option<String>,
    pub(crate) timestamp: Option<u64>,
    pub(crate) user_id: Option<String>,
    pub(crate) redelivered: bool,
    pub(crate) queue: String,
}

impl Request {
    /// A request with this body and no metadata, as if from a tutorial peer, for testing
    /// handlers.
    pub fn new(body: impl Into<Vec<u8>>) -> Request {
        Request {
            body: body.into(),
            ..Request::default()
        }
    }

    /// Adds (or replaces) header `name`; for testing handlers.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the `content_type` property; for testing handlers.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the deadline; for testing handlers.
    pub fn with_deadline(mut self, deadline: SystemTime) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// When the caller stops waiting for the reply, from the request's `deadline` header;
    /// `None` for a request without one (the tutorial's peers send none). A handler doing long
    /// work can give up once it has passed ([`Request::is_past_deadline`]) and answer
    /// [`HandlerError::deadline_exceeded`]. The server compares it with its own clock.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline
    }

    /// The W3C `traceparent` header, when the caller sent one (OpenTelemetry-instrumented
    /// peers do); the server copies it onto the reply.
    pub fn traceparent(&self) -> Option<&str> {
        self.header_str(TRACEPARENT_HEADER)
    }

    /// The W3C `tracestate` header, when the caller sent one.
    pub fn tracestate(&self) -> Option<&str> {
        self.header_str(TRACESTATE_HEADER)
    }

    /// The trace id of [`Request::traceparent`] (its second field, 32 hex digits), when the
    /// header is well formed.
    pub fn trace_id(&self) -> Option<&str> {
        let mut fields = self.traceparent()?.split('-');
        let (_version, id) = (fields.next()?, fields.next()?);
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }

    /// True when the request has a deadline and it has passed.
    pub fn is_past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| deadline <= SystemTime::now())
    }

    /// The headers (empty when the request had none).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.headers.get(name)
    }

    /// Header `name` as text (see [`HeaderValue::as_str`]).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get_str(name)
    }

    /// The `content_type` property.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The `content_encoding` property.
    pub fn content_encoding(&self) -> Option<&str> {
        self.content_encoding.as_deref()
    }

    /// The `correlation_id` property, which the reply carries back verbatim.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The `reply_to` property: where the reply goes.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }

    /// The `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The `type` property.
    pub fn message_type(&self) -> Option<&str> {
        self.message_type.as_deref()
    }

    /// The `app_id` property.
    pub fn app_id(&self) -> Option<&str> {
        self.app_id.as_deref()
    }

    /// The `timestamp` property, in seconds since the Unix epoch.
    pub fn timestamp(&self) -> Option<u64> {
        self.timestamp
    }

    /// The `user_id` property. RabbitMQ refuses a message whose `user_id` is not the user of
    /// the connection that published it, so when present it is the verified caller.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// True when the broker delivered this request before (to a server that did not ack it).
    pub fn is_redelivered(&self) -> bool {
        self.redelivered
    }

    /// The queue the request came from: tells procedures apart when one handler serves
    /// several queues.
    pub fn queue(&self) -> &str {
        &self.queue
    }
}

/// A reply: the body, and optional headers and content type. A handler returns one, and a
/// client's [`crate::Client::send`] receives one.
///
/// Handlers may also return a `Vec<u8>`, a `String` or a `&str`: each converts into a reply
/// with that body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reply {
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Headers,
    pub(crate) content_type: Option<String>,
    pub(crate) content_encoding: Option<String>,
}

impl Reply {
    /// A reply with this body and no metadata.
    pub fn new(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            body: body.into(),
            ..Reply::default()
        }
    }

    /// Adds (or replaces) header `name`.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Reply {
        self.headers.insert(name, value);
        self
    }

    /// Sets the `content_type` property.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Reply {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the `content_encoding` property.
    pub fn with_content_encoding(mut self, encoding: impl Into<String>) -> Reply {
        self.content_encoding = Some(encoding.into());
        self
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body, taken out of the reply.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Header `name` as text (see [`HeaderValue::as_str`]).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.get_str(name)
    }

    /// The `content_type` property.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The `content_encoding` property.
    pub fn content_encoding(&self) -> Option<&str> {
        self.content_encoding.as_deref()
    }
}

impl From<Vec<u8>> for Reply {
    fn from(body: Vec<u8>) -> Self {
        Reply::new(body)
    }
}

impl From<String> for Reply {
    fn from(body: String) -> Self {
        Reply::new(body)
    }
}

impl From<&str> for Reply {
    fn from(body: &str) -> Self {
        Reply::new(body)
    }
}

/// A handler's refusal or failure, sent back to the caller as an error reply; the caller's
/// call returns [`crate::Error::Remote`] with the message and the kind.
///
/// On the wire the message travels in the `error` header (and as the body), and the kind in
/// the `error-kind` header (see [`FailureKind`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    kind: FailureKind,
    message: String,
}

/// What kind of failure an error reply reports, in its `error-kind` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// `bad-request`: the input is wrong and always will be; don't retry it.
    BadRequest,
    /// `handler-failed`: the handler returned an error or panicked.
    HandlerFailed,
    /// `overloaded`: refused for capacity; retry later.
    Overloaded,
    /// `deadline-exceeded`: the request's deadline passed before it could be answered.
    DeadlineExceeded,
}

impl FailureKind {
    /// The kind's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::BadRequest => "bad-request",
            FailureKind::HandlerFailed => "handler-failed",
            FailureKind::Overloaded => "overloaded",
            FailureKind::DeadlineExceeded => "deadline-exceeded",
        }
    }

    /// The kind a wire name stands for; `None` for a name this version does not know.
    pub fn from_wire(name: &str) -> Option<FailureKind> {
        [
            FailureKind::BadRequest,
            FailureKind::HandlerFailed,
            FailureKind::Overloaded,
            FailureKind::DeadlineExceeded,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl HandlerError {
    /// The request is wrong and always will be: a malformed body, a value out of range.
    pub fn bad_request(message: impl Into<String>) -> HandlerError {
        HandlerError::new(FailureKind::BadRequest, message)
    }

    /// The handler failed to answer a request that may be fine.
    pub fn failed(message: impl Into<String>) -> HandlerError {
        HandlerError::new(FailureKind::HandlerFailed, message)
    }

    /// The handler refuses the request for capacity; the caller may retry later.
    pub fn overloaded(message: impl Into<String>) -> HandlerError {
        HandlerError::new(FailureKind::Overloaded, message)
    }

    /// The request's deadline ([`Request::deadline`]) passed before the handler could answer.
    pub fn deadline_exceeded(message: impl Into<String>) -> HandlerError {
        HandlerError::new(FailureKind::DeadlineExceeded, message)
    }

    /// An error of `kind` with `message`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind,
            message: message.into(),
        }
    }

    /// The one-line message the caller receives.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True for [`HandlerError::bad_request`].
    pub fn is_bad_request(&self) -> bool {
        self.kind == FailureKind::BadRequest
    }

    /// The kind of failure.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

/// A plain message is a handler failure ([`HandlerError::failed`]).
impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        HandlerError::failed(message)
    }
}

/// A plain message is a handler failure ([`HandlerError::failed`]).
impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        HandlerError::failed(message)
    }
}
