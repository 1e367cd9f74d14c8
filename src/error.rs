//! The crate's one error type.
//!
//! Every fallible call returns [`Error`]. The variants are chosen so that a caller can tell apart
//! the cases it would handle differently: retry later ([`Error::Timeout`],
//! [`Error::ConnectionLost`]), fix the deployment ([`Error::NoRoute`], [`Error::Config`],
//! [`Error::Connect`]), or report the request as bad ([`Error::Remote`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A specialised `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a call, in a server, or while connecting.
///
/// Cheap to clone: the causes it wraps are shared, so every call of a batch that failed for one
/// reason reports that same reason.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable: a malformed URL, an unknown scheme, zero workers.
    Config(String),

    /// No TCP connection could be made to the broker at `addr`.
    Connect {
        /// The address (or URL) that was tried.
        addr: String,
        /// Why the connection failed.
        source: Arc<std::io::Error>,
    },

    /// No reply arrived within the call's timeout.
    Timeout(Duration),

    /// The broker had no queue to route the request to: no server has declared it.
    NoRoute {
        /// The routing key (server queue) the request was published to.
        queue: String,
    },

    /// The server answered with an error instead of a result (a bad request, a failed handler).
    Remote(String),

    /// A reply arrived but its body is not what the caller expected (not a decimal number for
    /// [`crate::Client::fib`], JSON of another shape for a typed call).
    InvalidReply(String),

    /// The request could not be encoded (a value that JSON cannot represent).
    InvalidRequest(String),

    /// The connection to the broker was lost or closed while it was in use.
    ConnectionLost(Arc<amiquip::Error>),

    /// The broker refused an AMQP operation (bad credentials, a queue declared with other
    /// arguments, a missing vhost...).
    Amqp(Arc<amiquip::Error>),
}

impl Error {
    /// True when the call gave up because no reply came in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_))
    }

    /// True when the connection to the broker is gone; a new client (or a reconnect) is needed.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::ConnectionLost(_))
    }

    /// True when the server answered the request with an error.
    pub fn is_remote(&self) -> bool {
        matches!(self, Error::Remote(_))
    }

    /// True when a reply arrived but could not be read as the caller expected.
    pub fn is_invalid_reply(&self) -> bool {
        matches!(self, Error::InvalidReply(_))
    }

    /// The message followed by each of its causes, separated by `": "`, for one-line reports.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            // Many errors (amiquip's among them) repeat their cause in their own message.
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }

    /// The connection is gone, for the reason amiquip gives.
    pub(crate) fn lost(reason: amiquip::Error) -> Error {
        Error::ConnectionLost(Arc::new(reason))
    }

    /// Sorts an amiquip error into "the connection is gone" or "the broker refused something".
    pub(crate) fn from_amqp(error: amiquip::Error) -> Error {
        use amiquip::Error as A;
        match error {
            A::UnexpectedSocketClose
            | A::IoErrorReadingSocket { .. }
            | A::IoErrorWritingSocket { .. }
            | A::MissedServerHeartbeats
            | A::ServerClosedConnection { .. }
            | A::ClientClosedConnection
            | A::EventLoopClientDropped
            | A::EventLoopDropped
            | A::IoThreadPanic => Error::lost(error),
            other => Error::Amqp(Arc::new(other)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(message) => write!(f, "invalid configuration: {message}"),
            Error::Connect { addr, .. } => write!(f, "could not connect to {addr}"),
            Error::Timeout(timeout) => {
                write!(f, "no reply within {:.3} s", timeout.as_secs_f64())
            }
            Error::NoRoute { queue } => write!(
                f,
                "no route to queue '{queue}': no server has declared it (is a server running?)"
            ),
            Error::Remote(message) => write!(f, "server error: {message}"),
            Error::InvalidReply(message) => write!(f, "invalid reply: {message}"),
            Error::InvalidRequest(message) => write!(f, "invalid request: {message}"),
            Error::ConnectionLost(_) => write!(f, "connection to the broker lost"),
            Error::Amqp(_) => write!(f, "broker refused the operation"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(source.as_ref()),
            Error::ConnectionLost(source) | Error::Amqp(source) => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<amiquip::Error> for Error {
    fn from(error: amiquip::Error) -> Error {
        Error::from_amqp(error)
    }
}
