//! Message headers: AMQP field values, in types of this crate's own.
//!
//! AMQP headers are a table of named, typed values (RabbitMQ's dialect of the 0-9-1 field
//! table). [`HeaderValue`] keeps the distinctions a peer can make (text or bytes, integer or
//! float, nested lists and tables) without tying the API to amiquip's types. Every AMQP
//! integer width reads back as [`HeaderValue::Int`]; RabbitMQ has no unsigned 64-bit field.

use std::collections::BTreeMap;
use std::fmt;

/// How deep header values may nest tables and lists, in requests and replies alike: a header
/// whose value is a table nests 1 deep, one whose value is a list of tables 2 deep. A message
/// whose headers nest deeper is refused: a server answers such a request with a `bad-request`
/// error, a client fails such a reply's call with [`crate::Error::InvalidReply`], and a call
/// or reply of this crate's own that nests deeper is not sent.
///
/// RabbitMQ's own headers nest 3 deep (`x-death`: a list of tables of lists); 32 leaves any
/// application room while bounding every recursion over headers (amiquip parses them
/// recursively, on its I/O thread) to a few tens of kilobytes of stack.
pub const MAX_HEADER_DEPTH: usize = 32;

/// The W3C trace context header that names the trace and the caller's span; a server copies
/// it from a request onto the reply.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The W3C trace context header with vendor-specific trace data; copied like
/// [`TRACEPARENT_HEADER`].
pub const TRACESTATE_HEADER: &str = "tracestate";

/// One header value.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum HeaderValue {
    /// A boolean (`t`).
    Bool(bool),
    /// Any integer field (`b`, `B`, `s`, `u`, `I`, `i`, `l`); written as a 64-bit integer (`l`).
    Int(i64),
    /// A floating-point field (`f`, `d`), or a decimal (`D`, read as its nearest `f64`);
    /// written as a double (`d`).
    Float(f64),
    /// A text string (`S`); Python's `str` and Java's `String` arrive as this.
    Text(String),
    /// Raw bytes (`x`, RabbitMQ's extension); Python's `bytes` arrive as this.
    Bytes(Vec<u8>),
    /// A timestamp in seconds since the Unix epoch (`T`).
    Timestamp(u64),
    /// A list of values (`A`).
    List(Vec<HeaderValue>),
    /// A nested table (`F`).
    Table(Headers),
    /// No value (`V`); Python's `None` arrives as this.
    Void,
}

impl HeaderValue {
    /// The value as text: a [`HeaderValue::Text`], or [`HeaderValue::Bytes`] that are valid
    /// UTF-8; `None` for every other kind.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Text(text) => Some(text),
            HeaderValue::Bytes(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// The value as an integer, when it is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(value) => Some(*value),
            _ => None,
        }
    }
}

impl fmt::Display for HeaderValue {
    /// Renders the value as text: numbers in decimal, bytes as lossy UTF-8, lists as
    /// `[a, b]`, tables as `{name: value}`, void as nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Bool(value) => write!(f, "{value}"),
            HeaderValue::Int(value) => write!(f, "{value}"),
            HeaderValue::Float(value) => write!(f, "{value}"),
            HeaderValue::Text(text) => f.write_str(text),
            HeaderValue::Bytes(bytes) => f.write_str(&String::from_utf8_lossy(bytes)),
            HeaderValue::Timestamp(seconds) => write!(f, "{seconds}"),
            HeaderValue::List(values) => {
                f.write_str("[")?;
                for (index, value) in values.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{value}")?;
                }
                f.write_str("]")
            }
            HeaderValue::Table(table) => {
                f.write_str("{")?;
                for (index, (name, value)) in table.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{name}: {value}")?;
                }
                f.write_str("}")
            }
            HeaderValue::Void => Ok(()),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(text: &str) -> Self {
        HeaderValue::Text(text.to_string())
    }
}

impl From<String> for HeaderValue {
    fn from(text: String) -> Self {
        HeaderValue::Text(text)
    }
}

impl From<bool> for HeaderValue {
    fn from(value: bool) -> Self {
        HeaderValue::Bool(value)
    }
}

impl From<i64> for HeaderValue {
    fn from(value: i64) -> Self {
        HeaderValue::Int(value)
    }
}

impl From<i32> for HeaderValue {
    fn from(value: i32) -> Self {
        HeaderValue::Int(value.into())
    }
}

impl From<u32> for HeaderValue {
    fn from(value: u32) -> Self {
        HeaderValue::Int(value.into())
    }
}

impl From<f64> for HeaderValue {
    fn from(value: f64) -> Self {
        HeaderValue::Float(value)
    }
}

impl From<Vec<u8>> for HeaderValue {
    fn from(bytes: Vec<u8>) -> Self {
        HeaderValue::Bytes(bytes)
    }
}

/// A message's headers: names, in order, each with one [`HeaderValue`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Headers {
    values: BTreeMap<String, HeaderValue>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Headers {
        Headers::default()
    }

    /// The value of header `name`, if present.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.values.get(name)
    }

    /// The value of header `name` as text (see [`HeaderValue::as_str`]).
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(HeaderValue::as_str)
    }

    /// Sets header `name` to `value`, returning the value it replaces.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<HeaderValue>,
    ) -> Option<HeaderValue> {
        self.values.insert(name.into(), value.into())
    }

    /// Removes header `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<HeaderValue> {
        self.values.remove(name)
    }

    /// Every header, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HeaderValue)> {
        self.values
            .iter()
            .map(|(name, value)| (name.as_str(), value))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// How deep the values nest tables and lists (see [`MAX_HEADER_DEPTH`]): 0 when no value
    /// is a table or a list. Walks the values without recursion.
    pub fn depth(&self) -> usize {
        let is_container =
            |value: &HeaderValue| matches!(value, HeaderValue::List(_) | HeaderValue::Table(_));
        if !self.values.values().any(is_container) {
            return 0;
        }
        let mut deepest = 0;
        let mut pending: Vec<(&HeaderValue, usize)> =
            self.values.values().map(|value| (value, 1)).collect();
        while let Some((value, depth)) = pending.pop() {
            let inside: Box<dyn Iterator<Item = &HeaderValue>> = match value {
                HeaderValue::List(values) => Box::new(values.iter()),
                HeaderValue::Table(table) => Box::new(table.values.values()),
                _ => continue,
            };
            deepest = deepest.max(depth);
            pending.extend(inside.map(|value| (value, depth + 1)));
        }
        deepest
    }
}

impl<N: Into<String>, V: Into<HeaderValue>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Self {
        Headers {
            values: pairs
                .into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_render_as_text() {
        assert_eq!(HeaderValue::from("abc").to_string(), "abc");
        assert_eq!(HeaderValue::Int(-42).to_string(), "-42");
        assert_eq!(HeaderValue::Bool(true).to_string(), "true");
        assert_eq!(HeaderValue::Float(1.5).to_string(), "1.5");
        assert_eq!(HeaderValue::Bytes(b"hi".to_vec()).to_string(), "hi");
        assert_eq!(HeaderValue::Void.to_string(), "");
        let list = HeaderValue::List(vec![1.into(), "two".into()]);
        assert_eq!(list.to_string(), "[1, two]");
        let table: Headers = [("a", 1), ("b", 2)].into_iter().collect();
        assert_eq!(HeaderValue::Table(table).to_string(), "{a: 1, b: 2}");
    }

    #[test]
    fn depth_counts_nested_tables_and_lists() {
        let flat: Headers = [("a", 1)].into_iter().collect();
        assert_eq!(flat.depth(), 0);
        let table: Headers = [("t", HeaderValue::Table(flat.clone()))]
            .into_iter()
            .collect();
        assert_eq!(table.depth(), 1);
        let list = HeaderValue::List(vec![1.into(), HeaderValue::Table(table.clone())]);
        let nested: Headers = [("l", list), ("x", "y".into())].into_iter().collect();
        assert_eq!(nested.depth(), 3);
    }

    #[test]
    fn text_reads_from_strings_and_utf8_bytes_only() {
        let mut headers = Headers::new();
        headers.insert("text", "a");
        headers.insert("bytes", b"b".to_vec());
        headers.insert("binary", vec![0xff]);
        headers.insert("number", 1);
        assert_eq!(headers.get_str("text"), Some("a"));
        assert_eq!(headers.get_str("bytes"), Some("b"));
        assert_eq!(headers.get_str("binary"), None);
        assert_eq!(headers.get_str("number"), None);
        assert_eq!(headers.get_str("missing"), None);
        assert_eq!(headers.get("number").and_then(HeaderValue::as_int), Some(1));
        assert_eq!(headers.len(), 4);
    }
}
