//! Where a call goes: a [`Destination`], and how a server's queue is bound to exchanges: a
//! [`Binding`].
//!
//! A client is not bound to one service: each call names its destination (or takes the
//! client's default, [`crate::ClientOptions::queue`]), and one client, with its one
//! connection, channel and reply queue, calls any number of them.

use std::fmt;

/// Where a call's request is published.
///
/// ```
/// use amqp_rpc::{Call, Destination};
///
/// let fib = Call::new("30").to("math.fib");
/// let order = Call::new("{}").to(Destination::exchange("services", "shop.order"));
/// assert_eq!(fib.destination(), Some(&Destination::queue("math.fib")));
/// assert_eq!(order.destination().unwrap().routing_key(), "shop.order");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Destination {
    /// A queue, through the default exchange (`""`), as the tutorial calls: the queue's name is
    /// the routing key. No queue by that name: [`crate::Error::NoRoute`].
    Queue(String),
    /// An exchange, with a routing key: a topic exchange whose servers bind their queues to
    /// `service.method` keys, say. No exchange by that name: [`crate::Error::NoExchange`];
    /// no queue bound for the key: [`crate::Error::NoRoute`].
    Exchange {
        /// The exchange's name.
        exchange: String,
        /// The routing key the request is published with.
        routing_key: String,
    },
}

impl Destination {
    /// The queue `name`, through the default exchange.
    pub fn queue(name: impl Into<String>) -> Destination {
        Destination::Queue(name.into())
    }

    /// The exchange `exchange`, with `routing_key`.
    pub fn exchange(exchange: impl Into<String>, routing_key: impl Into<String>) -> Destination {
        Destination::Exchange {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }

    /// The exchange a request is published to: `""` (the default exchange) for a queue.
    pub fn exchange_name(&self) -> &str {
        match self {
            Destination::Queue(_) => "",
            Destination::Exchange { exchange, .. } => exchange,
        }
    }

    /// The routing key a request is published with: the queue's name for a queue.
    pub fn routing_key(&self) -> &str {
        match self {
            Destination::Queue(queue) => queue,
            Destination::Exchange { routing_key, .. } => routing_key,
        }
    }

    /// The queue, for a queue destination: the one the broker can say who consumes.
    pub fn queue_name(&self) -> Option<&str> {
        match self {
            Destination::Queue(queue) => Some(queue),
            Destination::Exchange { .. } => None,
        }
    }

    /// The destination a request published to `exchange` with `routing_key` went to.
    pub(crate) fn published_to(exchange: &str, routing_key: &str) -> Destination {
        match exchange {
            "" => Destination::queue(routing_key),
            exchange => Destination::exchange(exchange, routing_key),
        }
    }
}

/// A name is a queue: `"rpc_queue".into()` is [`Destination::Queue`].
impl From<&str> for Destination {
    fn from(queue: &str) -> Self {
        Destination::queue(queue)
    }
}

/// A name is a queue.
impl From<String> for Destination {
    fn from(queue: String) -> Self {
        Destination::Queue(queue)
    }
}

/// `queue 'math.fib'`, or `exchange 'services' (routing key 'shop.order')`.
impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Queue(queue) => write!(f, "queue '{queue}'"),
            Destination::Exchange {
                exchange,
                routing_key,
            } => write!(f, "exchange '{exchange}' (routing key '{routing_key}')"),
        }
    }
}

/// The kind of an exchange a server declares for a [`Binding`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routes by patterns of dot-separated words (`shop.*`, `#`): nameko's, and the default.
    #[default]
    Topic,
    /// Routes by the exact routing key.
    Direct,
    /// Routes to every bound queue, whatever the key.
    Fanout,
    /// Routes by headers instead of the routing key.
    Headers,
}

impl ExchangeKind {
    /// The kind's name, as AMQP's `exchange.declare` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Topic => "topic",
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// A binding of a server's queue to an exchange: requests published to `exchange` with a
/// routing key that `routing_key` matches reach the queue. The server declares the exchange
/// (durable, of [`Binding::kind`]) and the binding when it starts, and again after a lost
/// connection, as it does its queue.
///
/// ```
/// use amqp_rpc::{Binding, QueueOptions};
///
/// let options = QueueOptions {
///     bindings: vec![Binding::topic("services", "shop.order"), Binding::topic("services", "shop.*.v2")],
///     ..QueueOptions::default()
/// };
/// # let _ = options;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The exchange.
    pub exchange: String,
    /// The routing key, or for a topic exchange the pattern, that reaches the queue.
    pub routing_key: String,
    /// The kind of exchange to declare. Every declaration of an exchange must agree: the
    /// broker refuses another kind for an existing exchange.
    pub kind: ExchangeKind,
}

impl Binding {
    /// A binding to the topic exchange `exchange` for `routing_key`.
    pub fn topic(exchange: impl Into<String>, routing_key: impl Into<String>) -> Binding {
        Binding {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            kind: ExchangeKind::Topic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_say_where_they_go() {
        let queue = Destination::queue("q");
        assert_eq!((queue.exchange_name(), queue.routing_key()), ("", "q"));
        assert_eq!(queue.to_string(), "queue 'q'");
        let exchange = Destination::exchange("e", "k");
        assert_eq!(
            (exchange.exchange_name(), exchange.routing_key()),
            ("e", "k")
        );
        assert_eq!(exchange.queue_name(), None);
        assert_eq!(exchange.to_string(), "exchange 'e' (routing key 'k')");
        assert_eq!(Destination::published_to("", "q"), queue);
        assert_eq!(Destination::published_to("e", "k"), exchange);
    }
}
