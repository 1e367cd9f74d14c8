//! The crate's one error type.
//!
//! Every fallible call returns [`Error`]. The variants say what really happened, so that a
//! caller can tell apart the cases it would handle differently: try again later
//! ([`Error::is_retryable`]: a timeout, no server, a lost connection, an overloaded server),
//! fix the deployment or the settings ([`Error::NoRoute`], [`Error::Config`],
//! [`Error::Authentication`], [`Error::Tls`]), or give up on the request
//! ([`Error::Remote`] with [`FailureKind::BadRequest`]). The table of `docs/failures.md`
//! lists them with what to do.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::destination::Destination;
use crate::message::FailureKind;

/// A specialised `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the broker knew of a server queue when a call gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// Servers (consumers) consuming the queue.
    pub consumers: u32,
    /// Requests waiting in the queue, not yet delivered to a server.
    pub waiting: u32,
}

/// Everything that can go wrong in a call, in a server, or while connecting.
///
/// Cheap to clone: the causes it wraps are shared, so every call of a batch that failed for one
/// reason reports that same reason.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable: a malformed URL, an unknown scheme, zero workers.
    Config(String),

    /// No TCP connection, or no AMQP handshake, could be completed with the broker at `addr`
    /// in time, or the broker did not answer while it confirmed
    /// [`TlsOptions::external_user`](crate::TlsOptions::external_user), while a client set up
    /// its channel and reply queue, or while a server set up its queues and workers.
    Connect {
        /// The broker's address, without credentials.
        addr: String,
        /// Why the connection failed.
        source: Arc<std::io::Error>,
    },

    /// The broker refused the credentials.
    Authentication {
        /// The broker's address, without credentials.
        addr: String,
        /// The user name that was refused.
        user: String,
    },

    /// The TLS handshake failed: an untrusted or mismatched certificate, say.
    Tls {
        /// The broker's address, without credentials.
        addr: String,
        /// What the TLS library reported.
        reason: String,
    },

    /// No reply arrived within the call's timeout.
    Timeout {
        /// How long the call waited.
        after: Duration,
        /// Where the call went.
        destination: Destination,
        /// For a queue destination, what the broker knew of the queue at that moment, when it
        /// could be asked and answered within 0.25 s (a broker that has stopped answering
        /// does not); `None` for an exchange destination.
        state: Option<QueueState>,
    },

    /// The broker blocks this client's connection: a resource alarm (low on memory or disk)
    /// stops it reading from publishers until the alarm clears. A call made while the client
    /// knows it is not sent (`after` is `None`); a call sent before the client knew, and not
    /// answered within its timeout, may not have left the client (`after` is its timeout): it
    /// goes out, and is served, once the alarm clears, and its late reply is dropped.
    Blocked {
        /// Where the call went.
        destination: Destination,
        /// The broker's reason: "low on memory", "low on disk".
        reason: String,
        /// How long the call waited, when it was sent and timed out.
        after: Option<Duration>,
    },

    /// The server queue exists, but no server consumed it, with requests waiting, when the
    /// call's grace period ([`crate::ClientOptions::no_server_grace`]) ran out, nor a second
    /// later.
    NoServer {
        /// The server queue.
        queue: String,
    },

    /// The broker had no queue to route the request to: no queue by the destination's name,
    /// or none bound to its exchange for its routing key. No server has declared it.
    NoRoute {
        /// Where the call went.
        destination: Destination,
    },

    /// The call's exchange does not exist: no server has declared it. The request was not
    /// sent (publishing to a missing exchange would close the channel every call shares).
    NoExchange {
        /// The exchange.
        exchange: String,
    },

    /// The server answered with an error instead of a result.
    Remote {
        /// What kind of failure the server reported; `None` for a server that does not say
        /// (an older server, or a peer that sets only the `error` header).
        kind: Option<FailureKind>,
        /// The server's message.
        message: String,
    },

    /// The call was refused at once, without being sent: the client already has
    /// [`crate::ClientOptions::max_in_flight`] calls in flight.
    Overloaded {
        /// The limit.
        max_in_flight: usize,
    },

    /// A reply arrived but its body is not what the caller expected (not a decimal number for
    /// [`crate::Client::fib`], JSON of another shape for a typed call), or it was larger than
    /// the client accepts.
    InvalidReply(String),

    /// The request could not be encoded (a value that JSON cannot represent).
    InvalidRequest(String),

    /// The connection to the broker was lost or closed while it was in use.
    ConnectionLost(Arc<amiquip::Error>),

    /// The broker refused an operation and closed the channel it came on: a request or reply
    /// too large for it (406), a queue declared elsewhere with other arguments (406), a missing
    /// queue or exchange (404), a permission it does not grant (403).
    Refused {
        /// The AMQP reply code.
        code: u16,
        /// The broker's explanation.
        text: String,
    },

    /// The broker cancelled a server's consumer: its queue was deleted, say. The server
    /// connects again and declares its queues again.
    ConsumerCancelled {
        /// The queue the consumer consumed.
        queue: String,
    },

    /// Another AMQP failure that amiquip reported.
    Amqp(Arc<amiquip::Error>),

    /// A thread could not be started, or one of the library's own threads panicked.
    Internal(String),
}

impl Error {
    /// True when the call gave up because no reply came in time ([`Error::Timeout`], or
    /// [`Error::Blocked`] for a call sent while the broker was blocking the connection).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::Blocked { after: Some(_), .. }
        )
    }

    /// True when the broker was blocking the connection ([`Error::Blocked`]): the call was
    /// not sent, or timed out.
    pub fn is_blocked(&self) -> bool {
        matches!(self, Error::Blocked { .. })
    }

    /// True when nothing consumed the server queue.
    pub fn is_no_server(&self) -> bool {
        matches!(self, Error::NoServer { .. })
    }

    /// True when nothing could take the request: no queue by the destination's name, none
    /// bound for its routing key, or no such exchange ([`Error::NoRoute`],
    /// [`Error::NoExchange`]).
    pub fn is_no_route(&self) -> bool {
        matches!(self, Error::NoRoute { .. } | Error::NoExchange { .. })
    }

    /// True when the connection to the broker is gone; the next call connects again.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::ConnectionLost(_))
    }

    /// True when the server answered the request with an error.
    pub fn is_remote(&self) -> bool {
        matches!(self, Error::Remote { .. })
    }

    /// The kind of failure a server reported, for [`Error::Remote`].
    pub fn remote_kind(&self) -> Option<FailureKind> {
        match self {
            Error::Remote { kind, .. } => *kind,
            _ => None,
        }
    }

    /// True when a reply arrived but could not be read as the caller expected.
    pub fn is_invalid_reply(&self) -> bool {
        matches!(self, Error::InvalidReply(_))
    }

    /// True when the broker refused the credentials.
    pub fn is_authentication(&self) -> bool {
        matches!(self, Error::Authentication { .. })
    }

    /// True when the TLS handshake failed.
    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls { .. })
    }

    /// True for an unusable setting.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_))
    }

    /// True when the broker refused an operation ([`Error::Refused`]).
    pub fn is_refused(&self) -> bool {
        matches!(self, Error::Refused { .. })
    }

    /// True when the same call may succeed if made again later: it timed out, found no server
    /// or no route (a server may be starting), lost or could not make its connection, or was
    /// refused for capacity ([`Error::Overloaded`], or a server's
    /// [`FailureKind::Overloaded`] or [`FailureKind::DeadlineExceeded`]). False for everything
    /// that will fail again the same way: a bad request, a failed handler, a refusal by the
    /// broker, bad settings or credentials. Making a call again is safe only when it is
    /// idempotent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::Blocked { .. }
            | Error::NoServer { .. }
            | Error::NoRoute { .. }
            | Error::NoExchange { .. }
            | Error::ConnectionLost(_)
            | Error::Connect { .. }
            | Error::Overloaded { .. } => true,
            Error::Remote { kind, .. } => matches!(
                kind,
                Some(FailureKind::Overloaded | FailureKind::DeadlineExceeded)
            ),
            _ => false,
        }
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

    /// Sorts an amiquip error into what happened: the connection is gone, the broker refused
    /// something on a channel, or another AMQP failure.
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
            A::ServerClosedChannel { code, message, .. } => Error::Refused {
                code,
                text: message,
            },
            other => Error::Amqp(Arc::new(other)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(message) => write!(f, "invalid configuration: {message}"),
            Error::Connect { addr, .. } => write!(f, "could not connect to {addr}"),
            Error::Authentication { addr, user } => {
                write!(
                    f,
                    "the broker at {addr} refused user '{user}': invalid credentials"
                )
            }
            Error::Tls { addr, reason } => write!(f, "TLS handshake with {addr} failed: {reason}"),
            Error::Timeout {
                after,
                destination,
                state,
            } => {
                write!(
                    f,
                    "timed out after {:.3} s waiting for a reply from {destination}",
                    after.as_secs_f64()
                )?;
                if destination.queue_name().is_none() {
                    return Ok(());
                }
                match state {
                    Some(QueueState {
                        consumers: 0,
                        waiting,
                    }) => write!(
                        f,
                        "; no server was consuming it, {waiting} requests were waiting in it"
                    ),
                    Some(QueueState { consumers, waiting }) => write!(
                        f,
                        "; {consumers} servers were consuming it, {waiting} requests were \
                         waiting in it (0: a server had taken the request and not answered)"
                    ),
                    None => write!(f, "; the broker could not be asked about the queue"),
                }
            }
            Error::Blocked {
                destination,
                reason,
                after: Some(after),
            } => write!(
                f,
                "timed out after {:.3} s waiting for a reply from {destination}; the broker \
                 was blocking this client's connection ({reason}), so the request may not have \
                 been sent",
                after.as_secs_f64()
            ),
            Error::Blocked {
                destination,
                reason,
                after: None,
            } => write!(
                f,
                "not sent to {destination}: the broker is blocking this client's connection \
                 ({reason})"
            ),
            Error::NoServer { queue } => write!(f, "no server is consuming queue '{queue}'"),
            Error::NoRoute {
                destination: Destination::Queue(queue),
            } => write!(
                f,
                "no route to queue '{queue}': no server has declared it (is a server running?)"
            ),
            Error::NoRoute { destination } => write!(
                f,
                "no route to {destination}: no queue is bound for that routing key (is a \
                 server running?)"
            ),
            Error::NoExchange { exchange } => write!(
                f,
                "no exchange '{exchange}': no server has declared it (is a server running?)"
            ),
            Error::Remote {
                kind: Some(kind),
                message,
            } => write!(f, "server error ({kind}): {message}"),
            Error::Remote {
                kind: None,
                message,
            } => write!(f, "server error: {message}"),
            Error::Overloaded { max_in_flight } => write!(
                f,
                "overloaded: this client already has {max_in_flight} calls in flight, its limit"
            ),
            Error::InvalidReply(message) => write!(f, "invalid reply: {message}"),
            Error::InvalidRequest(message) => write!(f, "invalid request: {message}"),
            Error::ConnectionLost(_) => write!(f, "connection to the broker lost"),
            Error::Refused { code, text } => write!(f, "the broker refused ({code}): {text}"),
            Error::ConsumerCancelled { queue } => write!(
                f,
                "the broker cancelled the consumer of queue '{queue}' (was the queue deleted?)"
            ),
            Error::Amqp(_) => write!(f, "AMQP error"),
            Error::Internal(message) => write!(f, "internal error: {message}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_call_says_it_timed_out_and_why_the_broker_blocked() {
        let blocked = |after| Error::Blocked {
            destination: Destination::queue("q"),
            reason: "low on memory".into(),
            after,
        };
        let timed_out = blocked(Some(Duration::from_millis(2500)));
        let message = timed_out.to_string();
        assert!(message.contains("timed out after 2.500 s"), "{message}");
        assert!(message.contains("(low on memory)"), "{message}");
        assert!(timed_out.is_blocked() && timed_out.is_timeout() && timed_out.is_retryable());
        let not_sent = blocked(None);
        let message = not_sent.to_string();
        assert!(message.starts_with("not sent to queue 'q'"), "{message}");
        assert!(message.contains("(low on memory)"), "{message}");
        assert!(not_sent.is_blocked() && !not_sent.is_timeout() && not_sent.is_retryable());
    }

    #[test]
    fn a_timeout_says_it_timed_out_after_how_long_and_what_the_broker_knew() {
        let timeout = |state| Error::Timeout {
            after: Duration::from_millis(1500),
            destination: Destination::queue("q"),
            state,
        };
        let nobody = timeout(Some(QueueState {
            consumers: 0,
            waiting: 3,
        }))
        .to_string();
        assert!(nobody.contains("timed out after 1.500 s"), "{nobody}");
        assert!(nobody.contains("no server was consuming it"), "{nobody}");
        let busy = timeout(Some(QueueState {
            consumers: 2,
            waiting: 1000,
        }))
        .to_string();
        assert!(
            busy.contains("2 servers") && busy.contains("1000 requests"),
            "{busy}"
        );
        assert!(timeout(None).to_string().contains("could not be asked"));
        assert!(timeout(None).is_timeout());
    }

    #[test]
    fn only_what_may_succeed_later_is_retryable() {
        let remote = |kind| Error::Remote {
            kind,
            message: "m".into(),
        };
        assert!(remote(Some(FailureKind::Overloaded)).is_retryable());
        assert!(remote(Some(FailureKind::DeadlineExceeded)).is_retryable());
        assert!(!remote(Some(FailureKind::BadRequest)).is_retryable());
        assert!(!remote(Some(FailureKind::HandlerFailed)).is_retryable());
        assert!(!remote(None).is_retryable());
        assert!(Error::NoServer { queue: "q".into() }.is_retryable());
        assert!(Error::Overloaded { max_in_flight: 1 }.is_retryable());
        let refused = Error::from_amqp(amiquip::Error::ServerClosedChannel {
            channel_id: 1,
            code: 406,
            message: "PRECONDITION_FAILED - message size 5 is larger than max size 4".into(),
        });
        assert!(
            refused.is_refused() && !refused.is_retryable(),
            "{refused:?}"
        );
        assert!(!refused.is_connection_lost());
        assert!(!Error::Config("x".into()).is_retryable());
    }
}
