//! What the broker sends, checked frame by frame before amiquip parses it.
//!
//! Anything a broker delivers may come from a stranger: any peer that can publish to a server
//! queue, or to a client's reply queue, writes the properties and headers that amiquip then
//! parses. amiquip 0.4.2 parses with amq-protocol 1.2, which trusts what it reads (see
//! `docs/amiquip.md`):
//!
//! - it parses nested header tables and arrays by recursion, on amiquip's I/O thread: a request
//!   whose headers nested 15,000 tables (105 KB, well inside RabbitMQ's default frame of
//!   131,072 bytes) overflowed that thread's stack and aborted the process, and the request,
//!   back in the queue, killed the next server that took it;
//! - when a short string is not UTF-8 it skips the property without skipping its bytes, so
//!   every property after it is read from the wrong place: a rogue could write a `user_id`
//!   inside its `content_type` and have amiquip read it, while the broker had verified another
//!   one, and so pass a client's `server_user` check;
//! - a header of an unknown type, or one that runs past its table, silently ends the table.
//!
//! So every connection reads through a [`CheckedStream`]. It splits the bytes into frames and
//! checks each one that amiquip would parse (method frames and content headers; bodies pass
//! as they come), without recursion and within the frame's bounds, before amiquip sees it:
//!
//! - A content header whose properties are sound passes unchanged; that is every message of
//!   this crate and of the tutorial's peers, at the cost of one pass over its bytes. A long
//!   string header value that is not UTF-8 is handed over as bytes (`x`), as pika reads one.
//! - Any other content header is replaced by one that amiquip parses safely: the properties
//!   that could be read (each short string that is UTF-8), and instead of the headers, the one
//!   header [`UNDECODABLE_HEADER`] saying what was wrong. A server answers such a request with
//!   a `bad-request` error reply, a client fails such a reply's call with
//!   [`crate::Error::InvalidReply`]; neither hands it to a handler or a caller as a message.
//! - Short strings of the methods that carry a stranger's names (a delivery's exchange and
//!   routing key, say) are made UTF-8, lossily.
//! - A frame larger than the broker's own `frame_max`, or a `connection.start` whose server
//!   properties nest too deep, ends the connection: a broker never sends those.
//!
//! amiquip's I/O thread then never parses headers nested deeper than [`MAX_HEADER_DEPTH`],
//! whatever the frame size, and no code of this crate recurses deeper than that over them.

use std::io::{self, Read, Write};
use std::ops::Range;

use mio::{Evented, Poll, PollOpt, Ready, Token};

use crate::headers::MAX_HEADER_DEPTH;

/// The header with which a content header that could not be handed over as it came is
/// replaced: a long string saying why. Reserved: a message that carries it itself is replaced
/// too.
pub(crate) const UNDECODABLE_HEADER: &str = "x-amqp-rpc-undecodable";

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size.
const FRAME_HEAD: usize = 7;

/// The largest frame taken before the broker has said its `frame_max` (`connection.tune`):
/// RabbitMQ's default frame_max. AMQP allows only 4,096 bytes then.
const FRAME_LIMIT_BEFORE_TUNE: usize = 131_072;

/// The largest frame taken from a broker whose `frame_max` is 0 (no limit): RabbitMQ's default
/// largest message.
const FRAME_LIMIT_UNLIMITED: usize = 128 * 1024 * 1024;

/// The smallest frame_max AMQP allows.
const FRAME_MIN_SIZE: usize = 4096;

/// How many bytes a read asks the transport for at least.
const READ_SIZE: usize = 64 * 1024;

/// How a connection's bytes travel: over TCP, or TLS over TCP.
pub(crate) enum Transport {
    /// Plain TCP.
    Plain(mio::net::TcpStream),
    /// TLS, its handshake done.
    Tls(Box<native_tls::TlsStream<mio::net::TcpStream>>),
}

impl Transport {
    fn socket(&self) -> &mio::net::TcpStream {
        match self {
            Transport::Plain(socket) => socket,
            Transport::Tls(tls) => tls.get_ref(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => socket.read(buf),
            Transport::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => socket.write(buf),
            Transport::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(socket) => socket.flush(),
            Transport::Tls(tls) => tls.flush(),
        }
    }
}

/// A connection's stream as amiquip reads it: what the broker sends comes out checked (see
/// the module documentation); what amiquip writes goes out as it is.
pub(crate) struct CheckedStream {
    transport: Transport,
    /// What was read: `buffer[handed..checked]` is checked and waits for amiquip,
    /// `buffer[checked..filled]` waits for the rest of its frame; the rest is room.
    buffer: Vec<u8>,
    handed: usize,
    checked: usize,
    filled: usize,
    /// Bytes of the body or heartbeat frame being passed that are still to come.
    passing: usize,
    /// The largest frame taken.
    frame_limit: usize,
    /// True once a frame that amiquip refuses anyway (an unknown type) came: the rest passes
    /// as it is, for amiquip to fail on.
    opaque: bool,
}

impl CheckedStream {
    pub(crate) fn new(transport: Transport) -> CheckedStream {
        CheckedStream {
            transport,
            buffer: vec![0; READ_SIZE],
            handed: 0,
            checked: 0,
            filled: 0,
            passing: 0,
            frame_limit: FRAME_LIMIT_BEFORE_TUNE,
            opaque: false,
        }
    }

    /// Checks the frames now complete in the buffer, or the part of a body that came.
    fn check(&mut self) -> io::Result<()> {
        loop {
            if self.opaque {
                self.checked = self.filled;
                return Ok(());
            }
            if self.passing > 0 {
                let came = self.passing.min(self.filled - self.checked);
                self.checked += came;
                self.passing -= came;
                if self.passing > 0 {
                    return Ok(());
                }
            }
            let waiting = &self.buffer[self.checked..self.filled];
            if waiting.len() < FRAME_HEAD {
                return Ok(());
            }
            let kind = waiting[0];
            let size =
                u32::from_be_bytes([waiting[3], waiting[4], waiting[5], waiting[6]]) as usize;
            let length = size.saturating_add(FRAME_HEAD + 1);
            if length > self.frame_limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the broker sent a frame of {length} bytes, over its frame_max of {}",
                        self.frame_limit
                    ),
                ));
            }
            match kind {
                FRAME_BODY | FRAME_HEARTBEAT => self.passing = length,
                FRAME_METHOD | FRAME_HEADER => {
                    if waiting.len() < length {
                        return Ok(());
                    }
                    if waiting[length - 1] != FRAME_END {
                        self.opaque = true;
                        continue;
                    }
                    let payload = &waiting[FRAME_HEAD..length - 1];
                    let replacement = if kind == FRAME_HEADER {
                        check_content_header(payload)
                    } else if let Some(limit) = tuned_frame_limit(payload) {
                        self.frame_limit = limit;
                        None
                    } else {
                        check_method(payload)?
                    };
                    match replacement {
                        None => self.checked += length,
                        Some(payload) => self.replace_frame(length, &payload),
                    }
                }
                _ => self.opaque = true,
            }
        }
    }

    /// Puts a frame with `payload` in place of the `length` bytes at `checked`, and counts it
    /// as checked.
    fn replace_frame(&mut self, length: usize, payload: &[u8]) {
        let head = &self.buffer[self.checked..self.checked + 3];
        let mut frame = Vec::with_capacity(payload.len() + FRAME_HEAD + 1);
        frame.extend_from_slice(head);
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        let (old_end, new_end) = (self.checked + length, self.checked + frame.len());
        let tail = self.filled - old_end;
        if new_end + tail > self.buffer.len() {
            self.buffer.resize(new_end + tail, 0);
        }
        self.buffer.copy_within(old_end..self.filled, new_end);
        self.buffer[self.checked..new_end].copy_from_slice(&frame);
        self.filled = new_end + tail;
        self.checked = new_end;
    }

    /// Makes room to read into: drops what amiquip has taken, and grows the buffer when the
    /// frame waiting for its rest fills it.
    fn make_room(&mut self) {
        if self.handed > 0 {
            self.buffer.copy_within(self.handed..self.filled, 0);
            self.filled -= self.handed;
            self.checked -= self.handed;
            self.handed = 0;
        }
        if self.buffer.len() - self.filled < READ_SIZE / 4 {
            let grown = (self.buffer.len() * 2).min(self.frame_limit + READ_SIZE);
            self.buffer
                .resize(grown.max(self.filled + READ_SIZE / 4), 0);
        }
    }
}

impl Read for CheckedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.checked > self.handed {
                let count = buf.len().min(self.checked - self.handed);
                buf[..count].copy_from_slice(&self.buffer[self.handed..self.handed + count]);
                self.handed += count;
                return Ok(count);
            }
            self.make_room();
            // A would-block ends the read here, as amiquip's own streams do: amiquip reads
            // until then, and waits for the socket to be readable again.
            let count = self.transport.read(&mut self.buffer[self.filled..])?;
            if count == 0 {
                return Ok(0);
            }
            self.filled += count;
            self.check()?;
        }
    }
}

impl Write for CheckedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.transport.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.transport.flush()
    }
}

/// Readiness is the socket's: with TLS, a read may still find bytes that the TLS layer holds,
/// which amiquip reads until a read would block, as with its own TLS stream.
impl Evented for CheckedStream {
    fn register(
        &self,
        poll: &Poll,
        token: Token,
        interest: Ready,
        opts: PollOpt,
    ) -> io::Result<()> {
        self.transport
            .socket()
            .register(poll, token, interest, opts)
    }

    fn reregister(
        &self,
        poll: &Poll,
        token: Token,
        interest: Ready,
        opts: PollOpt,
    ) -> io::Result<()> {
        self.transport
            .socket()
            .reregister(poll, token, interest, opts)
    }

    fn deregister(&self, poll: &Poll) -> io::Result<()> {
        self.transport.socket().deregister(poll)
    }
}

impl amiquip::IoStream for CheckedStream {}

/// The largest frame to take once the broker has said its `frame_max`, when `payload` is the
/// `connection.tune` that says it.
fn tuned_frame_limit(payload: &[u8]) -> Option<usize> {
    const TUNE: (u16, u16) = (10, 30);
    if class_and_method(payload)? != TUNE {
        return None;
    }
    let frame_max = payload.get(6..10)?;
    let frame_max =
        u32::from_be_bytes([frame_max[0], frame_max[1], frame_max[2], frame_max[3]]) as usize;
    // A content header comes in one frame of its publisher's frame_max, which the broker caps
    // at its own: this one.
    Some(match frame_max {
        0 => FRAME_LIMIT_UNLIMITED,
        limit => limit.max(FRAME_MIN_SIZE),
    })
}

/// Checks a method frame's payload (see [`check_method_fields`]).
///
/// # Errors
///
/// An I/O error that ends the connection, for a `connection.start` amiquip could not parse
/// safely.
fn check_method(payload: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let Some((class, method)) = class_and_method(payload) else {
        return Ok(None);
    };
    check_method_fields(class, method, payload).map_err(|problem| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the broker's connection.start is malformed: {problem}"),
        )
    })
}

fn class_and_method(payload: &[u8]) -> Option<(u16, u16)> {
    let ids = payload.get(..4)?;
    Some((
        u16::from_be_bytes([ids[0], ids[1]]),
        u16::from_be_bytes([ids[2], ids[3]]),
    ))
}

/// One argument of a method, as far as checking it goes.
#[derive(Clone, Copy)]
enum Field {
    Octet,
    Short,
    Long,
    LongLong,
    ShortString,
    LongString,
    Table,
}

/// The arguments of the methods a broker sends that carry names or text a stranger may have
/// chosen (an exchange's name, a routing key, a reason quoting either), or a table.
fn fields_of(class: u16, method: u16) -> Option<&'static [Field]> {
    use Field::*;
    Some(match (class, method) {
        // connection.start: version, server properties, mechanisms, locales.
        (10, 10) => &[Octet, Octet, Table, LongString, LongString],
        // connection.close, channel.close: code, text, class, method.
        (10, 50) | (20, 40) => &[Short, ShortString, Short, Short],
        // connection.blocked: reason.
        (10, 60) => &[ShortString],
        // basic.cancel (from the broker): consumer tag, no-wait.
        (60, 30) => &[ShortString, Octet],
        // basic.return: code, text, exchange, routing key.
        (60, 50) => &[Short, ShortString, ShortString, ShortString],
        // basic.deliver: consumer tag, delivery tag, redelivered, exchange, routing key.
        (60, 60) => &[ShortString, LongLong, Octet, ShortString, ShortString],
        // basic.get-ok: delivery tag, redelivered, exchange, routing key, message count.
        (60, 71) => &[LongLong, Octet, ShortString, ShortString, Long],
        _ => return None,
    })
}

/// Checks the arguments of a method frame: returns a payload whose short strings are made
/// UTF-8, when one was not; `Err` for a `connection.start` whose server properties amiquip
/// could not parse safely.
fn check_method_fields(class: u16, method: u16, payload: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let Some(fields) = fields_of(class, method) else {
        return Ok(None);
    };
    let mut reader = Reader::new(payload, 4);
    // Only the short strings that are not UTF-8: none, nearly always, and no allocation then.
    let mut not_utf8 = Vec::new();
    for field in fields {
        // A method that ends early is amiquip's to refuse, as any malformed frame.
        let read = match field {
            Field::Octet => reader.skip(1),
            Field::Short => reader.skip(2),
            Field::Long => reader.skip(4),
            Field::LongLong => reader.skip(8),
            Field::LongString => reader.long_bytes().map(drop),
            Field::ShortString => reader.short_bytes().map(|(range, utf8)| {
                if !utf8 {
                    not_utf8.push(range);
                }
            }),
            Field::Table => {
                let start = reader.at;
                match check_table(payload, start, payload.len()) {
                    Ok(checked) => reader.skip(checked.end - start),
                    Err(TableProblem::Invalid { why, .. } | TableProblem::Truncated(why)) => {
                        return Err(why);
                    }
                }
            }
        };
        if read.is_none() {
            return Ok(None);
        }
    }
    if not_utf8.is_empty() {
        return Ok(None);
    }
    let mut fixed = Vec::with_capacity(payload.len());
    let mut copied = 0;
    for range in not_utf8 {
        let text = &payload[range.clone()];
        // Up to the length byte before the string, then the string made UTF-8.
        fixed.extend_from_slice(&payload[copied..range.start - 1]);
        let lossy = truncated(&String::from_utf8_lossy(text), 255).to_string();
        fixed.push(lossy.len() as u8);
        fixed.extend_from_slice(lossy.as_bytes());
        copied = range.end;
    }
    fixed.extend_from_slice(&payload[copied..]);
    Ok(Some(fixed))
}

/// The longest start of `text` that is at most `bytes` long and ends on a character boundary.
fn truncated(text: &str, bytes: usize) -> &str {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// True when `bytes` are UTF-8; ASCII, which nearly every name is, is told apart fastest.
fn is_utf8(bytes: &[u8]) -> bool {
    bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()
}

/// A position in a payload, read forward.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], at: usize) -> Reader<'a> {
        Reader { bytes, at }
    }

    /// Skips `count` bytes; `None` when fewer are left.
    fn skip(&mut self, count: usize) -> Option<()> {
        let end = self.at.checked_add(count)?;
        (end <= self.bytes.len()).then(|| self.at = end)
    }

    /// A short string: the range of its bytes, and whether they are UTF-8.
    fn short_bytes(&mut self) -> Option<(Range<usize>, bool)> {
        let length = *self.bytes.get(self.at)? as usize;
        let start = self.at + 1;
        self.at = start;
        self.skip(length)?;
        let utf8 = is_utf8(&self.bytes[start..self.at]);
        Some((start..self.at, utf8))
    }

    /// A long string: the range of its bytes.
    fn long_bytes(&mut self) -> Option<Range<usize>> {
        let length = self.bytes.get(self.at..self.at + 4)?;
        let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
        let start = self.at + 4;
        self.at = start;
        self.skip(length)?;
        Some(start..self.at)
    }
}

/// A field table that can be handed to amiquip, possibly with fixes.
struct CheckedTable {
    /// Where the table ends (after its last byte).
    end: usize,
    /// Where long strings that are not UTF-8 have their type byte, to become byte arrays.
    not_utf8: Vec<usize>,
}

/// Why a field table cannot be handed to amiquip.
enum TableProblem {
    /// Its content is wrong, but its length is right: what follows it can still be read.
    Invalid { why: String, end: usize },
    /// Its length runs past what holds it: nothing after its start can be found.
    Truncated(String),
}

/// The kinds of field values, by type byte, and the size of those of fixed size; `None` for a
/// type this crate (and amiquip) does not know.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Fixed(usize),
    LongString,
    Bytes,
    Table,
    List,
}

fn value_kind(type_byte: u8) -> Option<ValueKind> {
    Some(match type_byte {
        b'V' => ValueKind::Fixed(0),
        b't' | b'b' | b'B' => ValueKind::Fixed(1),
        b's' | b'u' | b'U' => ValueKind::Fixed(2),
        b'I' | b'i' | b'f' => ValueKind::Fixed(4),
        b'D' => ValueKind::Fixed(5),
        b'l' | b'L' | b'd' | b'T' => ValueKind::Fixed(8),
        b'S' => ValueKind::LongString,
        b'x' => ValueKind::Bytes,
        b'F' => ValueKind::Table,
        b'A' => ValueKind::List,
        _ => return None,
    })
}

/// Checks the field table that starts (with its 4-byte length) at `start` in `bytes` and must
/// end by `limit`, without recursion: the containers open at a time are at most
/// [`MAX_HEADER_DEPTH`] + 1, then the table is refused.
fn check_table(bytes: &[u8], start: usize, limit: usize) -> Result<CheckedTable, TableProblem> {
    let mut reader = Reader::new(&bytes[..limit], start);
    let Some(content) = reader.long_bytes() else {
        return Err(TableProblem::Truncated(
            "its headers run past the end of its properties".into(),
        ));
    };
    let end = content.end;
    let invalid = |why: String| TableProblem::Invalid { why, end };
    let mut reader = Reader::new(&bytes[..end], content.start);
    let mut open = OpenContainers::new(end);
    let mut not_utf8 = Vec::new();
    while let Some((container_end, is_table)) = open.last() {
        if reader.at == container_end {
            open.pop();
            continue;
        }
        let past_end = || {
            format!(
                "a header value runs past the end of its {}",
                container(is_table)
            )
        };
        // Reads within the container only.
        let mut inner = Reader::new(&bytes[..container_end], reader.at);
        if is_table {
            let Some((name, utf8)) = inner.short_bytes() else {
                return Err(invalid(past_end()));
            };
            if !utf8 {
                return Err(invalid(format!(
                    "a header name is not UTF-8: {}",
                    preview(&bytes[name])
                )));
            }
            if open.len() == 1 && &bytes[name.clone()] == UNDECODABLE_HEADER.as_bytes() {
                return Err(invalid(format!(
                    "it carries the header '{UNDECODABLE_HEADER}', which amqp-rpc reserves"
                )));
            }
        }
        let Some(&type_byte) = bytes[..container_end].get(inner.at) else {
            return Err(invalid(past_end()));
        };
        let type_at = inner.at;
        inner.at += 1;
        let Some(kind) = value_kind(type_byte) else {
            return Err(invalid(format!(
                "a header value has a type AMQP does not define: {}",
                preview(&[type_byte])
            )));
        };
        match kind {
            ValueKind::Fixed(size) => inner.skip(size).ok_or_else(|| invalid(past_end()))?,
            ValueKind::LongString => {
                let text = inner.long_bytes().ok_or_else(|| invalid(past_end()))?;
                if !is_utf8(&bytes[text]) {
                    not_utf8.push(type_at);
                }
            }
            ValueKind::Bytes => {
                inner.long_bytes().ok_or_else(|| invalid(past_end()))?;
            }
            ValueKind::Table | ValueKind::List => {
                let content = inner.long_bytes().ok_or_else(|| invalid(past_end()))?;
                if open.len() > MAX_HEADER_DEPTH {
                    return Err(invalid(format!(
                        "its headers nest tables and lists deeper than the {MAX_HEADER_DEPTH} \
                         levels amqp-rpc accepts"
                    )));
                }
                reader.at = content.start;
                open.push(content.end, kind == ValueKind::Table);
                continue;
            }
        }
        reader.at = inner.at;
    }
    Ok(CheckedTable { end, not_utf8 })
}

/// The containers [`check_table`] has open, innermost last: where each ends, and whether it is
/// a table (else a list). On the stack: `check_table` runs for every delivery, on amiquip's I/O
/// thread, and refuses a table before more than [`MAX_HEADER_DEPTH`] + 1 are open.
struct OpenContainers {
    ends: [(usize, bool); MAX_HEADER_DEPTH + 1],
    len: usize,
}

impl OpenContainers {
    /// The outermost table, ending at `end`, open.
    fn new(end: usize) -> OpenContainers {
        let mut ends = [(0, false); MAX_HEADER_DEPTH + 1];
        ends[0] = (end, true);
        OpenContainers { ends, len: 1 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn last(&self) -> Option<(usize, bool)> {
        self.len.checked_sub(1).map(|last| self.ends[last])
    }

    fn pop(&mut self) {
        self.len -= 1;
    }

    /// Opens one more; the caller has checked that at most [`MAX_HEADER_DEPTH`] are open.
    fn push(&mut self, end: usize, is_table: bool) {
        self.ends[self.len] = (end, is_table);
        self.len += 1;
    }
}

fn container(is_table: bool) -> &'static str {
    if is_table { "table" } else { "list" }
}

/// At most 32 of `bytes`, escaped and quoted, for a message.
fn preview(bytes: &[u8]) -> String {
    const SHOWN: usize = 32;
    let mut text = String::from("\"");
    text.extend(
        bytes
            .iter()
            .take(SHOWN)
            .flat_map(|&b| std::ascii::escape_default(b))
            .map(char::from),
    );
    text.push('"');
    if bytes.len() > SHOWN {
        text.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    text
}

/// The basic class's properties, in wire order, by the name the crate's docs use.
const PROPERTIES: [(&str, PropertyKind); 14] = [
    ("content_type", PropertyKind::ShortString),
    ("content_encoding", PropertyKind::ShortString),
    ("headers", PropertyKind::Table),
    ("delivery_mode", PropertyKind::Octet),
    ("priority", PropertyKind::Octet),
    ("correlation_id", PropertyKind::ShortString),
    ("reply_to", PropertyKind::ShortString),
    ("expiration", PropertyKind::ShortString),
    ("message_id", PropertyKind::ShortString),
    ("timestamp", PropertyKind::Timestamp),
    ("type", PropertyKind::ShortString),
    ("user_id", PropertyKind::ShortString),
    ("app_id", PropertyKind::ShortString),
    ("cluster_id", PropertyKind::ShortString),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum PropertyKind {
    ShortString,
    Table,
    Octet,
    Timestamp,
}

/// The flag bit of the `index`-th property: the first is bit 15.
fn flag(index: usize) -> u16 {
    1 << (15 - index)
}

/// Class id, weight and body size, before the property flags.
const CONTENT_HEADER_FIXED: usize = 12;

/// Checks a content header's payload; returns `None` when it can be handed to amiquip as it
/// is, or the payload to hand over instead (see the module documentation).
fn check_content_header(payload: &[u8]) -> Option<Vec<u8>> {
    // Shorter is amiquip's to refuse, as any malformed frame: the broker checks it first.
    let flags = payload.get(CONTENT_HEADER_FIXED..CONTENT_HEADER_FIXED + 2)?;
    let flags = u16::from_be_bytes([flags[0], flags[1]]);
    let mut problems = Vec::new();
    // The bytes of each property that can be handed over, by index (on the stack: this runs
    // for every delivery).
    let mut kept: [Option<Range<usize>>; PROPERTIES.len()] = [const { None }; PROPERTIES.len()];
    let mut not_utf8 = Vec::new();
    if flags & 1 != 0 {
        // More flag words follow, for properties AMQP 0-9-1 does not have: where any value
        // starts is unknown.
        problems.push("its property flags go on past the 14 properties of AMQP 0-9-1".into());
    } else {
        let mut reader = Reader::new(payload, CONTENT_HEADER_FIXED + 2);
        for (index, &(name, kind)) in PROPERTIES.iter().enumerate() {
            if flags & flag(index) == 0 {
                continue;
            }
            let start = reader.at;
            let read = match kind {
                PropertyKind::Octet => reader.skip(1).map(|()| true),
                PropertyKind::Timestamp => reader.skip(8).map(|()| true),
                PropertyKind::ShortString => reader.short_bytes().map(|(text, utf8)| {
                    if !utf8 {
                        problems.push(format!(
                            "its {name} is not UTF-8: {}",
                            preview(&payload[text])
                        ));
                    }
                    utf8
                }),
                PropertyKind::Table => match check_table(payload, start, payload.len()) {
                    Ok(table) => {
                        not_utf8 = table.not_utf8;
                        reader.at = table.end;
                        Some(true)
                    }
                    Err(TableProblem::Invalid { why, end }) => {
                        problems.push(why);
                        reader.at = end;
                        Some(false)
                    }
                    Err(TableProblem::Truncated(why)) => {
                        problems.push(why);
                        None
                    }
                },
            };
            match read {
                Some(true) => kept[index] = Some(start..reader.at),
                Some(false) => {}
                None => {
                    if kind != PropertyKind::Table {
                        problems.push(format!("its properties end in the middle of its {name}"));
                    }
                    // Nothing after this can be found.
                    break;
                }
            }
        }
    }
    if problems.is_empty() {
        if not_utf8.is_empty() {
            return None;
        }
        let mut fixed = payload.to_vec();
        for type_at in not_utf8 {
            fixed[type_at] = b'x';
        }
        return Some(fixed);
    }
    Some(replacement(payload, &kept, &problems))
}

/// A content header with the properties `kept` (the bytes of each, by index) and, for
/// headers, only [`UNDECODABLE_HEADER`] saying what `problems` are.
fn replacement(payload: &[u8], kept: &[Option<Range<usize>>], problems: &[String]) -> Vec<u8> {
    const HEADERS: usize = 2;
    const SHOWN: usize = 3;
    let mut why = problems[..problems.len().min(SHOWN)].join("; ");
    if problems.len() > SHOWN {
        why.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    let mut headers = Vec::new();
    headers.push(UNDECODABLE_HEADER.len() as u8);
    headers.extend_from_slice(UNDECODABLE_HEADER.as_bytes());
    headers.push(b'S');
    headers.extend((why.len() as u32).to_be_bytes());
    headers.extend_from_slice(why.as_bytes());

    let mut flags = flag(HEADERS);
    let mut values = Vec::new();
    for (index, kept) in kept.iter().enumerate() {
        if index == HEADERS {
            values.extend((headers.len() as u32).to_be_bytes());
            values.extend_from_slice(&headers);
        } else if let Some(bytes) = kept {
            flags |= flag(index);
            values.extend_from_slice(&payload[bytes.clone()]);
        }
    }
    let mut header = payload[..CONTENT_HEADER_FIXED].to_vec();
    header.extend(flags.to_be_bytes());
    header.extend(values);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A content header payload: class 60, weight 0, body size 0, then `properties`.
    fn content_header(properties: &[u8]) -> Vec<u8> {
        let mut payload = vec![0, 60, 0, 0];
        payload.extend(0u64.to_be_bytes());
        payload.extend_from_slice(properties);
        payload
    }

    fn short(bytes: &[u8]) -> Vec<u8> {
        let mut encoded = vec![bytes.len() as u8];
        encoded.extend_from_slice(bytes);
        encoded
    }

    fn long(bytes: &[u8]) -> Vec<u8> {
        let mut encoded = (bytes.len() as u32).to_be_bytes().to_vec();
        encoded.extend_from_slice(bytes);
        encoded
    }

    /// Properties with `flags` and these values, in order.
    fn encoded(flags: u16, values: &[Vec<u8>]) -> Vec<u8> {
        let mut encoded = flags.to_be_bytes().to_vec();
        for value in values {
            encoded.extend_from_slice(value);
        }
        encoded
    }

    /// A headers table whose one entry nests `depth` tables, written outside in.
    fn nested_tables(depth: usize) -> Vec<u8> {
        let mut table = Vec::with_capacity(7 * depth + 4);
        for level in 0..depth {
            table.extend(((7 * (depth - level)) as u32).to_be_bytes());
            table.extend([1, b'n', b'F']);
        }
        table.extend(0u32.to_be_bytes());
        table
    }

    /// The properties amiquip parses from a checked content header.
    fn parsed(payload: &[u8]) -> amiquip::AmqpProperties {
        amiquip_reads(&check_content_header(payload).unwrap_or_else(|| payload.to_vec()))
    }

    /// The properties amiquip parses from a content header handed over.
    fn amiquip_reads(payload: &[u8]) -> amiquip::AmqpProperties {
        let (_, properties) =
            amq_protocol::protocol::basic::parse_properties(&payload[CONTENT_HEADER_FIXED..])
                .expect("amiquip parses what the check hands over");
        properties
    }

    fn undecodable(properties: &amiquip::AmqpProperties) -> Option<String> {
        match properties.headers().as_ref()?.get(UNDECODABLE_HEADER)? {
            amiquip::AmqpValue::LongString(why) => Some(why.clone()),
            _ => None,
        }
    }

    const CORRELATION_ID: u16 = 1 << 10;
    const REPLY_TO: u16 = 1 << 9;
    const HEADERS: u16 = 1 << 13;
    const USER_ID: u16 = 1 << 4;

    #[test]
    fn sound_properties_pass_unchanged() {
        let mut entry = short(b"deadline");
        entry.push(b'l');
        entry.extend(5i64.to_be_bytes());
        let payload = content_header(&encoded(
            HEADERS | CORRELATION_ID | REPLY_TO,
            &[long(&entry), short(b"id"), short(b"amq.gen-x")],
        ));
        assert_eq!(check_content_header(&payload), None);
        assert_eq!(check_content_header(&content_header(&[0, 0])), None);
    }

    #[test]
    fn headers_nested_too_deep_are_replaced_and_the_other_properties_kept() {
        let payload = content_header(&encoded(
            HEADERS | CORRELATION_ID | REPLY_TO,
            &[
                nested_tables(MAX_HEADER_DEPTH + 1),
                short(b"id"),
                short(b"amq.gen-x"),
            ],
        ));
        let properties = parsed(&payload);
        let why = undecodable(&properties).expect("replaced");
        assert!(why.contains("deeper than the 32 levels"), "{why}");
        assert_eq!(properties.correlation_id().as_deref(), Some("id"));
        assert_eq!(properties.reply_to().as_deref(), Some("amq.gen-x"));
        assert_eq!(properties.headers().as_ref().unwrap().len(), 1);

        let deepest = content_header(&encoded(HEADERS, &[nested_tables(MAX_HEADER_DEPTH)]));
        assert_eq!(check_content_header(&deepest), None);
    }

    #[test]
    fn a_short_string_that_is_not_utf8_cannot_shift_the_properties_after_it() {
        // amq-protocol alone would skip the content type without its bytes and read the
        // user_id written inside it: "the-server".
        let mut inside = short(b"id");
        inside.extend(short(b"the-server"));
        inside.push(0xff);
        let payload = content_header(&encoded(
            1 << 15 | 1 << 12 | CORRELATION_ID | USER_ID,
            &[short(&inside), vec![1], short(b"real-id"), short(b"rogue")],
        ));
        let properties = parsed(&payload);
        assert_eq!(properties.user_id().as_deref(), Some("rogue"));
        assert_eq!(properties.correlation_id().as_deref(), Some("real-id"));
        assert_eq!(properties.content_type(), &None);
        let why = undecodable(&properties).unwrap();
        assert!(why.contains("content_type is not UTF-8"), "{why}");
    }

    #[test]
    fn long_strings_that_are_not_utf8_become_bytes() {
        let mut entry = short(b"blob");
        entry.push(b'S');
        entry.extend(long(&[0xff, 0xfe]));
        let payload = content_header(&encoded(HEADERS, &[long(&entry)]));
        let properties = parsed(&payload);
        assert_eq!(
            properties.headers().as_ref().unwrap().get("blob"),
            Some(&amiquip::AmqpValue::ByteArray(vec![0xff, 0xfe]))
        );
    }

    #[test]
    fn unknown_types_bad_names_and_the_reserved_header_are_refused() {
        let entry = |name: &[u8], type_byte: u8, value: &[u8]| {
            let mut entry = short(name);
            entry.push(type_byte);
            entry.extend_from_slice(value);
            long(&entry)
        };
        for (table, expected) in [
            (entry(b"a", b'Z', b""), "type AMQP does not define"),
            (entry(&[0xc3], b'V', b""), "header name is not UTF-8"),
            (entry(UNDECODABLE_HEADER.as_bytes(), b'V', b""), "reserves"),
            (entry(b"a", b'S', &[0, 0, 0, 9, b'x']), "runs past the end"),
        ] {
            let payload = content_header(&encoded(HEADERS | CORRELATION_ID, &[table, short(b"c")]));
            let properties = parsed(&payload);
            let why = undecodable(&properties).unwrap();
            assert!(why.contains(expected), "{why}");
            assert_eq!(properties.correlation_id().as_deref(), Some("c"));
        }
    }

    #[test]
    fn properties_cut_short_keep_what_came_before() {
        let payload = content_header(&encoded(
            CORRELATION_ID | REPLY_TO,
            &[short(b"c"), vec![9, b'a']],
        ));
        let properties = parsed(&payload);
        assert_eq!(properties.correlation_id().as_deref(), Some("c"));
        assert_eq!(properties.reply_to(), &None);
        assert!(
            undecodable(&properties)
                .unwrap()
                .contains("middle of its reply_to")
        );
        let continued = content_header(&properties_with_continuation());
        assert!(
            undecodable(&parsed(&continued))
                .unwrap()
                .contains("go on past")
        );
    }

    fn properties_with_continuation() -> Vec<u8> {
        encoded(CORRELATION_ID | 1, &[vec![0, 0], short(b"c")])
    }

    #[test]
    fn a_frame_of_headers_nested_without_end_is_checked_on_a_small_stack() {
        // 16 MiB of tables nested 2.4 million deep: no broker sends it (its frame_max caps
        // it), yet checking it takes no recursion.
        let depth = 16 * 1024 * 1024 / 7;
        let payload = content_header(&encoded(HEADERS, &[nested_tables(depth)]));
        let checked = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || check_content_header(&payload))
            .unwrap()
            .join()
            .expect("no stack overflow");
        let properties = amiquip_reads(&checked.expect("replaced"));
        let why = undecodable(&properties).unwrap();
        assert!(why.contains("deeper"), "{why}");
    }

    #[test]
    fn names_a_stranger_chose_in_a_delivery_are_made_utf8() {
        let mut deliver = vec![0, 60, 0, 60];
        deliver.extend(short(b"ctag"));
        deliver.extend(7u64.to_be_bytes());
        deliver.push(0);
        deliver.extend(short(&[b'e', 0xff]));
        deliver.extend(short(b"key"));
        let fixed = check_method_fields(60, 60, &deliver).unwrap().unwrap();
        let mut expected = vec![0, 60, 0, 60];
        expected.extend(short(b"ctag"));
        expected.extend(7u64.to_be_bytes());
        expected.push(0);
        expected.extend(short("e\u{fffd}".as_bytes()));
        expected.extend(short(b"key"));
        assert_eq!(fixed, expected);
        let mut fine = vec![0, 60, 0, 60];
        fine.extend(short(b"ctag"));
        fine.extend(7u64.to_be_bytes());
        fine.push(0);
        fine.extend(short(b"e"));
        fine.extend(short(b"key"));
        assert_eq!(check_method_fields(60, 60, &fine).unwrap(), None);
    }
}
