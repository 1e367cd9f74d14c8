//! The wire format both sides speak, and its mapping to and from AMQP messages.
//!
//! It is the RabbitMQ tutorial's: a request goes to the server queue on the default exchange
//! with `reply_to` and `correlation_id`; the reply goes to `reply_to` with the same
//! `correlation_id`. Everything added here is optional for peers:
//!
//! - an error reply carries its message in the [`ERROR_HEADER`] header (a string, also sent as
//!   the body) and its kind in the [`ERROR_KIND_HEADER`] header;
//! - requests carry the call's timeout as `expiration` and its absolute deadline in the
//!   [`DEADLINE_HEADER`] header, and may carry headers, content type and encoding, `type` and
//!   `message_id`; replies may carry headers and a content type.
//!
//! Client and server both use this module; neither imports the other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amiquip::{AmqpProperties, AmqpValue, Delivery, FieldTable};

use crate::error::Error;
use crate::headers::{HeaderValue, Headers, TRACEPARENT_HEADER, TRACESTATE_HEADER};
use crate::inbound::UNDECODABLE_HEADER;
use crate::message::{Call, FailureKind, HandlerError, Reply, Request};

/// The server queue the tutorial uses.
pub const DEFAULT_QUEUE: &str = "rpc_queue";

/// The reply header in which a server puts an error message instead of a result.
pub const ERROR_HEADER: &str = "error";

/// The reply header that says what kind of error an error reply is: `bad-request`,
/// `handler-failed`, `overloaded` or `deadline-exceeded` (see [`FailureKind`]).
pub const ERROR_KIND_HEADER: &str = "error-kind";

/// The request header that carries the call's absolute deadline: Unix time in milliseconds, a
/// 64-bit integer. A server does not run the handler for a request whose deadline has passed.
pub const DEADLINE_HEADER: &str = "deadline";

/// The largest `expiration` RabbitMQ accepts, in milliseconds.
const MAX_EXPIRATION_MS: u128 = u32::MAX as u128;

/// The content type of JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The AMQP field table for `headers`.
pub(crate) fn field_table(headers: &Headers) -> FieldTable {
    headers
        .iter()
        .map(|(name, value)| (name.to_string(), amqp_value(value)))
        .collect()
}

fn amqp_value(value: &HeaderValue) -> AmqpValue {
    match value {
        HeaderValue::Bool(value) => AmqpValue::Boolean(*value),
        HeaderValue::Int(value) => AmqpValue::LongLongInt(*value),
        HeaderValue::Float(value) => AmqpValue::Double(*value),
        HeaderValue::Text(text) => AmqpValue::LongString(text.clone()),
        HeaderValue::Bytes(bytes) => AmqpValue::ByteArray(bytes.clone()),
        HeaderValue::Timestamp(seconds) => AmqpValue::Timestamp(*seconds),
        HeaderValue::List(values) => AmqpValue::FieldArray(values.iter().map(amqp_value).collect()),
        HeaderValue::Table(table) => AmqpValue::FieldTable(field_table(table)),
        HeaderValue::Void => AmqpValue::Void,
    }
}

/// Our headers for an AMQP field table.
pub(crate) fn headers_from(table: &FieldTable) -> Headers {
    table
        .iter()
        .map(|(name, value)| (name.clone(), header_value(value)))
        .collect()
}

fn header_value(value: &AmqpValue) -> HeaderValue {
    match value {
        AmqpValue::Boolean(value) => HeaderValue::Bool(*value),
        AmqpValue::ShortShortInt(value) => HeaderValue::Int((*value).into()),
        AmqpValue::ShortShortUInt(value) => HeaderValue::Int((*value).into()),
        AmqpValue::ShortInt(value) => HeaderValue::Int((*value).into()),
        AmqpValue::ShortUInt(value) => HeaderValue::Int((*value).into()),
        AmqpValue::LongInt(value) => HeaderValue::Int((*value).into()),
        AmqpValue::LongUInt(value) => HeaderValue::Int((*value).into()),
        AmqpValue::LongLongInt(value) => HeaderValue::Int(*value),
        AmqpValue::Float(value) => HeaderValue::Float((*value).into()),
        AmqpValue::Double(value) => HeaderValue::Float(*value),
        AmqpValue::DecimalValue(decimal) => {
            HeaderValue::Float(f64::from(decimal.value) / 10f64.powi(decimal.scale.into()))
        }
        AmqpValue::LongString(text) => HeaderValue::Text(text.clone()),
        AmqpValue::FieldArray(values) => {
            HeaderValue::List(values.iter().map(header_value).collect())
        }
        AmqpValue::Timestamp(seconds) => HeaderValue::Timestamp(*seconds),
        AmqpValue::FieldTable(table) => HeaderValue::Table(headers_from(table)),
        AmqpValue::ByteArray(bytes) => HeaderValue::Bytes(bytes.clone()),
        AmqpValue::Void => HeaderValue::Void,
    }
}

/// The properties of a request: the call's own, plus where and how to answer it. `left` is
/// the time the call has left: the broker drops the request unserved after it (`expiration`),
/// and the server skips it once its deadline, now plus `left`, has passed.
pub(crate) fn request_properties(
    call: &Call,
    reply_to: &str,
    correlation_id: &str,
    left: Duration,
) -> AmqpProperties {
    // "0" would expire the request at once; RabbitMQ counts in whole milliseconds, up to 2^32-1.
    let expiration_ms = left.as_millis().clamp(1, MAX_EXPIRATION_MS);
    let mut properties = AmqpProperties::default()
        .with_reply_to(reply_to.to_string())
        .with_correlation_id(correlation_id.to_string())
        .with_expiration(expiration_ms.to_string());
    let mut headers = field_table(&call.headers);
    if let Some(deadline) = SystemTime::now().checked_add(left).and_then(unix_millis) {
        headers.insert(
            DEADLINE_HEADER.to_string(),
            AmqpValue::LongLongInt(deadline),
        );
    }
    properties = properties.with_headers(headers);
    if let Some(content_type) = &call.content_type {
        properties = properties.with_content_type(content_type.clone());
    }
    if let Some(encoding) = &call.content_encoding {
        properties = properties.with_content_encoding(encoding.clone());
    }
    if let Some(message_type) = &call.message_type {
        properties = properties.with_type_(message_type.clone());
    }
    if let Some(message_id) = &call.message_id {
        properties = properties.with_message_id(message_id.clone());
    }
    properties
}

/// Unix time in milliseconds, when it fits in an `i64`.
fn unix_millis(time: SystemTime) -> Option<i64> {
    let millis = time.duration_since(UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(millis).ok()
}

/// The deadline a request's [`DEADLINE_HEADER`] names, if it has a usable one.
fn deadline_from(headers: &Headers) -> Option<SystemTime> {
    let millis = u64::try_from(headers.get(DEADLINE_HEADER)?.as_int()?).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

/// A delivery's headers, and why its properties could not be decoded when they could not:
/// the reason [`crate::inbound`] left in the one header it put in their place.
fn headers_of(properties: &AmqpProperties) -> (Headers, Option<String>) {
    let mut headers = properties
        .headers()
        .as_ref()
        .map(headers_from)
        .unwrap_or_default();
    let undecodable = headers
        .remove(UNDECODABLE_HEADER)
        .map(|why| why.to_string());
    (headers, undecodable)
}

/// The request a handler sees for a delivery from `queue`.
pub(crate) fn request_from(
    body: Vec<u8>,
    properties: AmqpProperties,
    redelivered: bool,
    queue: &str,
) -> Request {
    let (headers, undecodable) = headers_of(&properties);
    Request {
        body,
        undecodable,
        deadline: deadline_from(&headers),
        headers,
        content_type: properties.content_type().clone(),
        content_encoding: properties.content_encoding().clone(),
        correlation_id: properties.correlation_id().clone(),
        reply_to: properties.reply_to().clone(),
        message_id: properties.message_id().clone(),
        message_type: properties.type_().clone(),
        app_id: properties.app_id().clone(),
        timestamp: *properties.timestamp(),
        user_id: properties.user_id().clone(),
        redelivered,
        queue: queue.to_string(),
    }
}

/// The properties every reply to `request` carries: its `correlation_id`, and its trace
/// context headers, added to `headers` unless they hold their own.
fn answering(request: &Request, mut headers: FieldTable) -> AmqpProperties {
    for name in [TRACEPARENT_HEADER, TRACESTATE_HEADER] {
        if let Some(value) = request.header(name) {
            headers
                .entry(name.to_string())
                .or_insert_with(|| amqp_value(value));
        }
    }
    let mut properties = AmqpProperties::default();
    if !headers.is_empty() {
        properties = properties.with_headers(headers);
    }
    if let Some(id) = request.correlation_id() {
        properties = properties.with_correlation_id(id.to_string());
    }
    properties
}

/// The properties of a successful reply to `request`.
pub(crate) fn reply_properties(reply: &Reply, request: &Request) -> AmqpProperties {
    let mut properties = answering(request, field_table(&reply.headers));
    if let Some(content_type) = &reply.content_type {
        properties = properties.with_content_type(content_type.clone());
    }
    if let Some(encoding) = &reply.content_encoding {
        properties = properties.with_content_encoding(encoding.clone());
    }
    properties
}

/// The properties of an error reply to `request`; its body is the message.
pub(crate) fn error_properties(error: &HandlerError, request: &Request) -> AmqpProperties {
    let mut headers = FieldTable::new();
    headers.insert(
        ERROR_HEADER.to_string(),
        AmqpValue::LongString(error.message().to_string()),
    );
    headers.insert(
        ERROR_KIND_HEADER.to_string(),
        AmqpValue::LongString(error.kind().as_str().to_string()),
    );
    answering(request, headers)
}

/// What a reply delivery means to its caller: the reply; or the server's error
/// ([`Error::Remote`]), with its kind when the server says (a peer may set only the `error`
/// header); or [`Error::InvalidReply`] when its properties could not be decoded.
pub(crate) fn reply_from(delivery: Delivery) -> Result<Reply, Error> {
    let properties = delivery.properties;
    let (headers, undecodable) = headers_of(&properties);
    if let Some(why) = undecodable {
        return Err(Error::InvalidReply(format!(
            "the reply's properties could not be decoded: {why}"
        )));
    }
    if let Some(error) = headers.get(ERROR_HEADER) {
        let kind = headers
            .get_str(ERROR_KIND_HEADER)
            .and_then(FailureKind::from_wire);
        return Err(Error::Remote {
            kind,
            // A peer may send a non-string error header: any rendering beats losing the
            // error. A hostile or broken peer's message must not reach a terminal as escapes.
            message: without_control_characters(&error.to_string()),
        });
    }
    Ok(Reply {
        body: delivery.body,
        headers,
        content_type: properties.content_type().clone(),
        content_encoding: properties.content_encoding().clone(),
    })
}

/// `text` with each control character shown escaped (`\u{1b}`) instead of as itself.
pub(crate) fn without_control_characters(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_survive_the_round_trip_through_amqp() {
        let nested: Headers = [("inner", HeaderValue::Int(3))].into_iter().collect();
        let headers: Headers = [
            ("bool", HeaderValue::Bool(true)),
            ("int", HeaderValue::Int(-7)),
            ("float", HeaderValue::Float(2.5)),
            ("text", HeaderValue::from("hello")),
            ("bytes", HeaderValue::Bytes(vec![0, 255])),
            ("time", HeaderValue::Timestamp(1_700_000_000)),
            ("list", HeaderValue::List(vec![1.into(), "a".into()])),
            ("table", HeaderValue::Table(nested)),
            ("void", HeaderValue::Void),
        ]
        .into_iter()
        .collect();
        assert_eq!(headers_from(&field_table(&headers)), headers);
    }

    #[test]
    fn every_amqp_integer_width_reads_as_an_int() {
        let table: FieldTable = [
            ("a", AmqpValue::ShortShortInt(-1)),
            ("b", AmqpValue::ShortShortUInt(2)),
            ("c", AmqpValue::ShortInt(-3)),
            ("d", AmqpValue::ShortUInt(4)),
            ("e", AmqpValue::LongInt(-5)),
            ("f", AmqpValue::LongUInt(6)),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        let headers = headers_from(&table);
        let ints: Vec<i64> = headers.iter().filter_map(|(_, v)| v.as_int()).collect();
        assert_eq!(ints, [-1, 2, -3, 4, -5, 6]);
    }

    #[test]
    fn a_request_carries_its_deadline_and_a_clamped_expiration() {
        let before = SystemTime::now();
        let properties = request_properties(&Call::new("x"), "r", "c", Duration::from_secs(2));
        let request = request_from(Vec::new(), properties.clone(), false, "q");
        let deadline = request.deadline().expect("a deadline header");
        assert!(
            deadline >= before + Duration::from_millis(1990),
            "{deadline:?}"
        );
        assert!(deadline <= SystemTime::now() + Duration::from_secs(2));
        assert_eq!(properties.expiration().as_deref(), Some("2000"));

        let forever = request_properties(&Call::new("x"), "r", "c", Duration::MAX);
        assert_eq!(forever.expiration().as_deref(), Some("4294967295"));
        let zero = request_properties(&Call::new("x"), "r", "c", Duration::ZERO);
        assert_eq!(zero.expiration().as_deref(), Some("1"));
    }
}
