//! A hostile peer: an AMQP 0-9-1 publisher written frame by frame, which sends content headers
//! exactly as a test writes them (headers nested to the frame's limit, unknown field types,
//! non-UTF-8 short strings), where pika and amiquip would refuse or could not.
//!
//! It speaks just enough of the protocol to publish with confirms: the handshake (PLAIN,
//! heartbeats off), one channel in confirm mode, and `basic.publish`. Each publish waits for
//! the broker's verdict: confirmed (the broker took the message), or the reason the broker
//! closed the channel or the connection; after a close, the next publish connects again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{host_and_port, require_broker};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

/// The property flags of AMQP's basic class, in wire order: bit 15 is `content_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    ContentType = 15,
    ContentEncoding = 14,
    Headers = 13,
    DeliveryMode = 12,
    Priority = 11,
    CorrelationId = 10,
    ReplyTo = 9,
    Expiration = 8,
    MessageId = 7,
    Timestamp = 6,
    Type = 5,
    UserId = 4,
    AppId = 3,
    ClusterId = 2,
}

impl Property {
    /// Every property, in wire order.
    pub const ALL: [Property; 14] = [
        Property::ContentType,
        Property::ContentEncoding,
        Property::Headers,
        Property::DeliveryMode,
        Property::Priority,
        Property::CorrelationId,
        Property::ReplyTo,
        Property::Expiration,
        Property::MessageId,
        Property::Timestamp,
        Property::Type,
        Property::UserId,
        Property::AppId,
        Property::ClusterId,
    ];
}

/// Content header properties as raw bytes: each set property's encoded value, in wire order.
#[derive(Clone, Debug, Default)]
pub struct RawProperties {
    values: Vec<(Property, Vec<u8>)>,
    /// Flag bits set beyond the properties' own (the reserved bits 0 and 1).
    extra_flags: u16,
}

impl RawProperties {
    pub fn new() -> RawProperties {
        RawProperties::default()
    }

    /// Sets `property` to these encoded bytes, exactly (a short string's length byte
    /// included).
    pub fn raw(mut self, property: Property, encoded: Vec<u8>) -> RawProperties {
        self.values.retain(|(set, _)| *set != property);
        self.values.push((property, encoded));
        self
    }

    /// Sets a short-string property to `bytes`, UTF-8 or not.
    pub fn short(self, property: Property, bytes: &[u8]) -> RawProperties {
        self.raw(property, short_string(bytes))
    }

    /// Sets the headers to an encoded field table (see [`table`]).
    pub fn headers(self, table: Vec<u8>) -> RawProperties {
        self.raw(Property::Headers, table)
    }

    /// These properties with each of `over`'s set on top, replacing any of the same name.
    pub fn merged(mut self, over: &RawProperties) -> RawProperties {
        for (property, encoded) in &over.values {
            self = self.raw(*property, encoded.clone());
        }
        self.extra_flags |= over.extra_flags;
        self
    }

    /// Sets flag bits beyond the fourteen properties' own.
    pub fn extra_flags(mut self, bits: u16) -> RawProperties {
        self.extra_flags = bits;
        self
    }

    /// The property flags and values, as a content header carries them.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = self.extra_flags;
        for (property, _) in &self.values {
            flags |= 1 << (*property as u16);
        }
        let mut encoded = flags.to_be_bytes().to_vec();
        for property in Property::ALL {
            if let Some((_, value)) = self.values.iter().find(|(set, _)| *set == property) {
                encoded.extend_from_slice(value);
            }
        }
        encoded
    }
}

/// A short string: one length byte, then the bytes (at most 255), UTF-8 or not.
pub fn short_string(bytes: &[u8]) -> Vec<u8> {
    let length = u8::try_from(bytes.len()).expect("a short string is at most 255 bytes");
    let mut encoded = vec![length];
    encoded.extend_from_slice(bytes);
    encoded
}

/// A long string: a 32-bit length, then the bytes.
pub fn long_string(bytes: &[u8]) -> Vec<u8> {
    let mut encoded = (bytes.len() as u32).to_be_bytes().to_vec();
    encoded.extend_from_slice(bytes);
    encoded
}

/// A field table of `entries`: each a name (UTF-8 or not), a type byte, and that type's
/// encoded value.
pub fn table(entries: &[(&[u8], u8, Vec<u8>)]) -> Vec<u8> {
    let mut content = Vec::new();
    for (name, kind, value) in entries {
        content.extend(short_string(name));
        content.push(*kind);
        content.extend_from_slice(value);
    }
    long_string(&content)
}

/// A field array of `values`: each a type byte and that type's encoded value.
pub fn array(values: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut content = Vec::new();
    for (kind, value) in values {
        content.push(*kind);
        content.extend_from_slice(value);
    }
    long_string(&content)
}

/// A headers table whose one entry `n` holds tables nested `depth` deep (a header whose value
/// is a table nests 1 deep), written outside in, without recursion.
pub fn nested_tables(depth: usize) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(7 * depth + 4);
    for level in 0..depth {
        encoded.extend(((7 * (depth - level)) as u32).to_be_bytes());
        encoded.extend([1, b'n', b'F']);
    }
    encoded.extend(0u32.to_be_bytes());
    encoded
}

/// A headers table whose one entry `a` holds lists nested `depth` deep (at least 1).
pub fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(5 * depth + 7);
    encoded.extend(((7 + 5 * (depth - 1)) as u32).to_be_bytes());
    encoded.extend([1, b'a', b'A']);
    for level in 0..depth {
        encoded.extend(((5 * (depth - 1 - level)) as u32).to_be_bytes());
        if level + 1 < depth {
            encoded.push(b'A');
        }
    }
    encoded
}

/// The deepest [`nested_tables`] that take at most `room` bytes.
pub fn deepest_tables_within(room: usize) -> usize {
    (room - 4) / 7
}

/// The deepest [`nested_arrays`] that take at most `room` bytes.
pub fn deepest_arrays_within(room: usize) -> usize {
    (room - 6) / 5
}

/// The room a content header leaves for its headers under `frame_max`, beside `others` bytes
/// of other properties: a frame's own 8 bytes, class, weight, body size and property flags
/// (14) come off.
pub fn headers_room(frame_max: usize, others: usize) -> usize {
    frame_max - 8 - 14 - others
}

/// What the broker did with a publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It confirmed the message: it routed it (or dropped it, unroutable).
    Confirmed,
    /// It refused the message, closing the channel or the connection, for this reason.
    Refused(String),
}

/// A connection of the hostile peer, with one channel in confirm mode.
pub struct RawPublisher {
    stream: TcpStream,
    /// The broker's host and port.
    address: (String, u16),
    user: String,
    password: String,
    /// The largest frame the broker takes on this connection.
    pub frame_max: usize,
    /// Publishes sent on the channel, for the confirms' delivery tags.
    published: u64,
    /// False once the broker has closed the channel or the connection.
    open: bool,
}

impl RawPublisher {
    /// Connects to the test broker as the user its URL names.
    pub fn connect() -> RawPublisher {
        RawPublisher::connect_to(&require_broker())
    }

    /// Connects to the broker at `url` (its default vhost) as the user the URL names.
    pub fn connect_to(url: &str) -> RawPublisher {
        let parsed = url::Url::parse(url).unwrap();
        let user = match parsed.username() {
            "" => "guest".to_string(),
            name => name.to_string(),
        };
        let password = parsed.password().unwrap_or("guest").to_string();
        RawPublisher::open(host_and_port(url), &user, &password)
    }

    fn open(address: (String, u16), user: &str, password: &str) -> RawPublisher {
        let stream =
            TcpStream::connect((address.0.as_str(), address.1)).expect("connect to the broker");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut publisher = RawPublisher {
            stream,
            address,
            user: user.to_string(),
            password: password.to_string(),
            frame_max: 0,
            published: 0,
            open: false,
        };
        publisher.handshake();
        publisher
    }

    fn handshake(&mut self) {
        self.stream.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
        self.expect_method(10, 10, "connection.start");
        let mut start_ok = method(10, 11);
        start_ok.extend(table(&[]));
        start_ok.extend(short_string(b"PLAIN"));
        start_ok.extend(long_string(
            format!("\0{}\0{}", self.user, self.password).as_bytes(),
        ));
        start_ok.extend(short_string(b"en_US"));
        self.send(FRAME_METHOD, 0, &start_ok);
        let tune = self.expect_method(10, 30, "connection.tune");
        let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
        let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
        self.frame_max = frame_max as usize;
        let mut tune_ok = method(10, 31);
        tune_ok.extend(channel_max.to_be_bytes());
        tune_ok.extend(frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes());
        self.send(FRAME_METHOD, 0, &tune_ok);
        let mut open = method(10, 40);
        open.extend(short_string(b"/"));
        open.extend(short_string(b""));
        open.push(0);
        self.send(FRAME_METHOD, 0, &open);
        self.expect_method(10, 41, "connection.open-ok");
        let mut channel_open = method(20, 10);
        channel_open.extend(short_string(b""));
        self.send(FRAME_METHOD, 1, &channel_open);
        self.expect_method(20, 11, "channel.open-ok");
        let mut select = method(85, 10);
        select.push(0);
        self.send(FRAME_METHOD, 1, &select);
        self.expect_method(85, 11, "confirm.select-ok");
        self.published = 0;
        self.open = true;
    }

    /// Publishes `body` with `properties` (encoded by [`RawProperties::encode`], or written by
    /// hand) to `routing_key` on the default exchange, and waits for the broker's verdict.
    pub fn publish(&mut self, routing_key: &str, properties: &[u8], body: &[u8]) -> Verdict {
        if !self.open {
            self.reconnect();
        }
        let mut publish = method(60, 40);
        publish.extend(0u16.to_be_bytes());
        publish.extend(short_string(b""));
        publish.extend(short_string(routing_key.as_bytes()));
        publish.push(0);
        self.send(FRAME_METHOD, 1, &publish);
        let mut header = Vec::with_capacity(12 + properties.len());
        header.extend(60u16.to_be_bytes());
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend_from_slice(properties);
        assert!(
            header.len() + 8 <= self.frame_max,
            "a content header of {} bytes is over the broker's frame_max of {}",
            header.len() + 8,
            self.frame_max
        );
        self.send(FRAME_HEADER, 1, &header);
        for chunk in body.chunks(self.frame_max - 8) {
            self.send(FRAME_BODY, 1, chunk);
        }
        self.published += 1;
        self.verdict()
    }

    /// The broker's answer to the last publish.
    fn verdict(&mut self) -> Verdict {
        loop {
            let Some((kind, channel, payload)) = self.read_frame() else {
                self.open = false;
                return Verdict::Refused("the broker closed the socket".into());
            };
            if kind != FRAME_METHOD {
                continue;
            }
            match (class_method(&payload), channel) {
                ((60, 80), 1) => return Verdict::Confirmed,
                ((60, 120), 1) => return Verdict::Refused("nacked".into()),
                ((20, 40), 1) | ((10, 50), 0) => {
                    let reason = close_reason(&payload);
                    // Answer the close politely, then start afresh next time.
                    let ok = if channel == 1 { (20, 41) } else { (10, 51) };
                    self.send(FRAME_METHOD, channel, &method(ok.0, ok.1));
                    self.open = false;
                    return Verdict::Refused(reason);
                }
                _ => continue,
            }
        }
    }

    fn reconnect(&mut self) {
        *self = RawPublisher::open(self.address.clone(), &self.user, &self.password);
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        // A broker that has closed the connection makes this fail; the verdict then says why.
        let _ = self.stream.write_all(&frame);
    }

    /// The next frame: its type, channel and payload; `None` once the socket is closed.
    fn read_frame(&mut self) -> Option<(u8, u16, Vec<u8>)> {
        let mut head = [0u8; 7];
        self.stream.read_exact(&mut head).ok()?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0; size + 1];
        self.stream.read_exact(&mut payload).ok()?;
        assert_eq!(payload.pop(), Some(FRAME_END), "a frame ends with 0xCE");
        Some((head[0], u16::from_be_bytes([head[1], head[2]]), payload))
    }

    /// Reads frames until the method `class`.`method` comes, and returns its arguments.
    fn expect_method(&mut self, class: u16, id: u16, name: &str) -> Vec<u8> {
        loop {
            let (kind, _, payload) = self
                .read_frame()
                .unwrap_or_else(|| panic!("the broker closed the socket before {name}"));
            if kind == FRAME_HEARTBEAT {
                continue;
            }
            let found = class_method(&payload);
            if kind == FRAME_METHOD && found == (class, id) {
                return payload[4..].to_vec();
            }
            if found == (10, 50) || found == (20, 40) {
                panic!(
                    "the broker closed before {name}: {}",
                    close_reason(&payload)
                );
            }
        }
    }
}

/// A method frame's payload up to its arguments.
fn method(class: u16, id: u16) -> Vec<u8> {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend(id.to_be_bytes());
    payload
}

fn class_method(payload: &[u8]) -> (u16, u16) {
    if payload.len() < 4 {
        return (0, 0);
    }
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    )
}

/// The reply code and text of a `channel.close` or `connection.close`.
fn close_reason(payload: &[u8]) -> String {
    let code = u16::from_be_bytes([payload[4], payload[5]]);
    let length = payload[6] as usize;
    let text = String::from_utf8_lossy(&payload[7..7 + length]);
    format!("{code} {text}")
}
