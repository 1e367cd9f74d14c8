//! Hostile peers: requests and replies written frame by frame, with headers nested to the
//! frame's limit, a header table that fills a frame, every field type, types AMQP does not
//! define and short strings that are not UTF-8, sent through the real broker to servers (the
//! library's and the binary) and to clients (the library's and the binary). Nothing kills,
//! hangs or wedges either: a server answers what it can and refuses the rest with a
//! `bad-request` error reply saying why, a client refuses a bad reply with
//! `Error::InvalidReply`, and after each message the next good call is answered.

mod common;

use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use amiquip::{ConsumerMessage, ConsumerOptions, Delivery};
use amqp_rpc::{Call, Client, ClientOptions, Error, MAX_HEADER_DEPTH, Request, Server, fib};
use common::process::{Running, our_server_with_workers, spawn_until_ready, text};
use common::raw_amqp::{
    Property, RawProperties, RawPublisher, Verdict, array, deepest_arrays_within,
    deepest_tables_within, headers_room, long_string, nested_arrays, nested_tables, table,
};
use common::{
    Inbox, QueueGuard, client_for, declare_queue, raw_connection, require_broker, unique_queue,
};

/// What a server should do with a hostile request.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Answer it: fib(10).
    Answer,
    /// Refuse it with a `bad-request` error reply whose message says this.
    Refuse(&'static str),
    /// Drop it: no `reply_to` can be read from it.
    Drop,
    /// None: the broker refuses it (RabbitMQ parses header tables, and closes the channel of a
    /// publisher that sends one it cannot parse). The frame checks' unit tests cover it.
    BrokerRefuses,
}

/// One hostile message: what it is, the properties it adds to a request's or a reply's own,
/// and what a server does with it.
struct Case {
    name: &'static str,
    properties: RawProperties,
    expect: Expect,
}

/// A table of one entry of each field type AMQP 0-9-1 and RabbitMQ define.
fn every_field_type() -> Vec<u8> {
    let entries: Vec<(&[u8], u8, Vec<u8>)> = vec![
        (b"bool", b't', vec![1]),
        (b"i8", b'b', vec![0xff]),
        (b"u8", b'B', vec![0xff]),
        (b"i16", b's', 7i16.to_be_bytes().to_vec()),
        (b"u16", b'u', 7u16.to_be_bytes().to_vec()),
        (b"i32", b'I', (-7i32).to_be_bytes().to_vec()),
        (b"u32", b'i', 7u32.to_be_bytes().to_vec()),
        (b"i64", b'l', (-7i64).to_be_bytes().to_vec()),
        (b"f32", b'f', 1.5f32.to_be_bytes().to_vec()),
        (b"f64", b'd', 2.5f64.to_be_bytes().to_vec()),
        (b"decimal", b'D', vec![2, 0, 0, 1, 0]),
        (b"text", b'S', long_string("héllo".as_bytes())),
        (b"bytes", b'x', long_string(&[0, 0xff])),
        (b"time", b'T', 1_700_000_000u64.to_be_bytes().to_vec()),
        (b"void", b'V', vec![]),
        (
            b"list",
            b'A',
            array(&[(b'S', long_string(b"a")), (b'V', vec![])]),
        ),
        (
            b"table",
            b'F',
            table(&[(b"inner", b'l', 3i64.to_be_bytes().to_vec())]),
        ),
    ];
    table(&entries)
}

/// A header table of valid text entries that fills `room` bytes but for less than one entry.
fn table_filling(room: usize) -> Vec<u8> {
    // Each entry: a 7-byte name, a type byte, a 4-byte length and 20 bytes of text.
    const ENTRY: usize = 1 + 7 + 1 + 4 + 20;
    let names: Vec<String> = (0..(room - 4) / ENTRY)
        .map(|i| format!("h{i:06}"))
        .collect();
    let entries: Vec<(&[u8], u8, Vec<u8>)> = names
        .iter()
        .map(|name| (name.as_bytes(), b'S', long_string(&[b'v'; 20])))
        .collect();
    table(&entries)
}

/// The hostile messages, for a broker whose frame_max is `frame_max`; `others` is how many
/// bytes the properties of the request or reply they join take besides (so that the deepest
/// nesting fills the frame exactly).
fn cases(frame_max: usize, others: usize) -> Vec<Case> {
    let room = headers_room(frame_max, others);
    let header = |table: Vec<u8>| RawProperties::new().headers(table);
    let not_utf8 = |property| RawProperties::new().short(property, b"caf\xe9");
    vec![
        Case {
            name: "tables nested to the frame's limit",
            properties: header(nested_tables(deepest_tables_within(room))),
            expect: Expect::Refuse("deeper than the 32 levels"),
        },
        Case {
            name: "lists nested to the frame's limit",
            properties: header(nested_arrays(deepest_arrays_within(room))),
            expect: Expect::Refuse("deeper than the 32 levels"),
        },
        Case {
            name: "tables nested as deep as accepted",
            properties: header(nested_tables(MAX_HEADER_DEPTH)),
            expect: Expect::Answer,
        },
        Case {
            name: "tables nested one deeper than accepted",
            properties: header(nested_tables(MAX_HEADER_DEPTH + 1)),
            expect: Expect::Refuse("deeper than the 32 levels"),
        },
        Case {
            name: "a header table that fills the frame",
            properties: header(table_filling(room)),
            expect: Expect::Answer,
        },
        Case {
            name: "every field type",
            properties: header(every_field_type()),
            expect: Expect::Answer,
        },
        Case {
            name: "a long string that is not UTF-8",
            properties: header(table(&[(b"blob", b'S', long_string(b"\xff\xfe"))])),
            expect: Expect::Answer,
        },
        Case {
            name: "a header of a type AMQP does not define",
            properties: header(table(&[(b"odd", b'Z', vec![])])),
            expect: Expect::BrokerRefuses,
        },
        Case {
            name: "a header value that runs past its table",
            properties: header(table(&[(b"long", b'S', vec![0, 0, 0, 200, b'x'])])),
            expect: Expect::BrokerRefuses,
        },
        Case {
            name: "a header name that is not UTF-8",
            properties: header(table(&[(b"n\xff", b'V', vec![])])),
            expect: Expect::Refuse("header name is not UTF-8"),
        },
        Case {
            name: "a content_type that is not UTF-8",
            properties: not_utf8(Property::ContentType),
            expect: Expect::Refuse("content_type is not UTF-8"),
        },
        Case {
            name: "a content_encoding that is not UTF-8",
            properties: not_utf8(Property::ContentEncoding),
            expect: Expect::Refuse("content_encoding is not UTF-8"),
        },
        Case {
            name: "a message_id that is not UTF-8",
            properties: not_utf8(Property::MessageId),
            expect: Expect::Refuse("message_id is not UTF-8"),
        },
        Case {
            name: "a type that is not UTF-8",
            properties: not_utf8(Property::Type),
            expect: Expect::Refuse("type is not UTF-8"),
        },
        Case {
            name: "an app_id that is not UTF-8",
            properties: not_utf8(Property::AppId),
            expect: Expect::Refuse("app_id is not UTF-8"),
        },
        Case {
            name: "a correlation_id that is not UTF-8",
            properties: not_utf8(Property::CorrelationId),
            expect: Expect::Refuse("correlation_id is not UTF-8"),
        },
        Case {
            name: "a reply_to that is not UTF-8",
            properties: not_utf8(Property::ReplyTo),
            expect: Expect::Drop,
        },
    ]
}

fn header_text(reply: &Delivery, name: &str) -> Option<String> {
    match reply.properties.headers().as_ref()?.get(name)? {
        amiquip::AmqpValue::LongString(text) => Some(text.clone()),
        other => Some(format!("{other:?}")),
    }
}

/// Sends every hostile case as a request to `queue`, whose server answers fib requests, and
/// checks what comes back; after each, `good_call` must be answered.
fn send_hostile_requests(queue: &str, good_call: &mut dyn FnMut()) {
    let inbox = Inbox::at(&require_broker());
    let mut publisher = RawPublisher::connect();
    // The request's own properties: correlation_id (at most 40 bytes) and reply_to.
    let others = (1 + 40) + (1 + inbox.name.len());
    for case in cases(publisher.frame_max, others) {
        let id = format!("{:.40}", case.name.replace(' ', "-"));
        let properties = RawProperties::new()
            .short(Property::CorrelationId, id.as_bytes())
            .short(Property::ReplyTo, inbox.name.as_bytes())
            .merged(&case.properties);
        let verdict = publisher.publish(queue, &properties.encode(), b"10");
        match (verdict, case.expect) {
            (Verdict::Refused(_), Expect::BrokerRefuses) => {}
            (Verdict::Refused(why), _) => panic!("the broker refused {:?}: {why}", case.name),
            (Verdict::Confirmed, Expect::BrokerRefuses) => {
                panic!(
                    "the broker took {:?}: the test must expect a reply",
                    case.name
                )
            }
            (Verdict::Confirmed, _) => {}
        }
        match case.expect {
            Expect::Answer => {
                let reply = inbox.next_reply();
                assert_eq!(reply.body, b"55", "{}", case.name);
                assert_eq!(reply.properties.correlation_id().as_deref(), Some(&*id));
            }
            Expect::Refuse(why) => {
                let reply = inbox.next_reply();
                let message = header_text(&reply, "error").unwrap_or_default();
                assert!(message.contains(why), "{}: {message}", case.name);
                assert_eq!(
                    header_text(&reply, "error-kind").as_deref(),
                    Some("bad-request"),
                    "{}",
                    case.name
                );
                if why.starts_with("correlation_id") {
                    assert_eq!(reply.properties.correlation_id(), &None);
                } else {
                    assert_eq!(reply.properties.correlation_id().as_deref(), Some(&*id));
                }
            }
            // The good call after it shows the request did not stop the worker it reached.
            Expect::Drop | Expect::BrokerRefuses => {}
        }
        good_call();
    }
    assert!(
        inbox.replies.try_recv().is_err(),
        "no reply beyond those expected"
    );
}

#[test]
fn hostile_requests_are_answered_or_refused_and_a_library_server_serves_on() {
    let queue = unique_queue("hostile-requests");
    let _guard = QueueGuard(queue.clone());
    // One worker: a request that stopped it would leave nobody to answer the good call.
    let server = common::start_server(&queue, 1, |request: &Request| {
        fib::handle_request(request.body(), 1000)
    });
    let client = client_for(&queue, Duration::from_secs(10));
    send_hostile_requests(&queue, &mut || {
        assert_eq!(client.fib(10).unwrap().to_string(), "55")
    });
    assert_eq!(
        server.stats().reconnections,
        0,
        "no request broke the connection"
    );
    server.shutdown().unwrap();
}

#[test]
fn hostile_requests_are_answered_or_refused_and_the_server_binary_serves_on() {
    let queue = unique_queue("hostile-binary");
    let _guard = QueueGuard(queue.clone());
    // One worker: a request that stopped it would leave nobody to answer the good call.
    let mut command = our_server_with_workers(&queue, 1);
    command
        .env("RUST_LOG", "error")
        // Every thread of the server, amiquip's I/O thread among them, on an eighth of the
        // default stack: amiquip parses at most 32 levels. In this debug build that needs
        // between 128 and 256 KiB (a release build: between 32 and 64 KiB).
        .env("RUST_MIN_STACK", "262144");
    let mut server = spawn_until_ready(command, "Awaiting RPC requests");
    let client = client_for(&queue, Duration::from_secs(10));
    send_hostile_requests(&queue, &mut || {
        assert_eq!(client.fib(10).unwrap().to_string(), "55");
        assert!(server_alive(&mut server), "the server binary died");
    });
}

fn server_alive(server: &mut Running) -> bool {
    server.0.try_wait().unwrap().is_none()
}

/// Makes a reply's properties from the correlation id of the request it answers.
type ReplyMaker = Box<dyn FnOnce(&str) -> RawProperties + Send>;

/// Whether every reply a rogue publishes must be taken by the broker.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Confirms {
    Required,
    MayBeRefused,
}

/// A rogue server of `queue` (declared here): it answers its i-th request with `replies[i]`,
/// which makes a reply's properties from the request's correlation id, publishing each with
/// the hostile peer; the body is always "55".
fn rogue_server(queue: &str, replies: Vec<ReplyMaker>, confirms: Confirms) -> JoinHandle<()> {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, queue);
    let queue = queue.to_string();
    thread::spawn(move || {
        let mut publisher = RawPublisher::connect();
        let consumer = channel
            .basic_consume(
                queue.as_str(),
                ConsumerOptions {
                    no_ack: true,
                    ..ConsumerOptions::default()
                },
            )
            .unwrap();
        let requests = consumer.receiver().clone();
        for reply in replies {
            let ConsumerMessage::Delivery(request) =
                requests.recv_timeout(Duration::from_secs(30)).unwrap()
            else {
                panic!("the rogue expected a request");
            };
            let reply_to = request.properties.reply_to().clone().unwrap();
            let id = request.properties.correlation_id().clone().unwrap();
            let verdict = publisher.publish(&reply_to, &reply(&id).encode(), b"55");
            if confirms == Confirms::Required {
                assert_eq!(verdict, Verdict::Confirmed);
            }
        }
        common::end_consumer(consumer);
        connection.close().unwrap();
    })
}

/// The user this test's broker URL names, which the hostile peer connects as.
fn broker_user() -> String {
    match url::Url::parse(&require_broker()).unwrap().username() {
        "" => "guest".to_string(),
        name => name.to_string(),
    }
}

/// A reply with the awaited correlation id and the peer's own (verified) user id, plus the
/// hostile case's properties.
fn hostile_reply(case: RawProperties) -> ReplyMaker {
    Box::new(move |id: &str| {
        case.short(Property::CorrelationId, id.as_bytes())
            .short(Property::UserId, broker_user().as_bytes())
    })
}

fn good_reply() -> ReplyMaker {
    hostile_reply(RawProperties::new())
}

/// What a client's call returns for each hostile reply, and the good call after each.
fn hostile_replies_to_a_library_client(server_user: Option<String>) {
    let queue = unique_queue("hostile-replies");
    let _guard = QueueGuard(queue.clone());
    let frame_max = RawPublisher::connect().frame_max;
    // The reply's own properties: correlation_id (a uuid) and user_id.
    let others = (1 + 36) + (1 + broker_user().len());
    let cases: Vec<Case> = cases(frame_max, others)
        .into_iter()
        // Replies need a correlation id to be matched and no reply_to.
        .filter(|case| {
            matches!(case.expect, Expect::Answer | Expect::Refuse(_))
                && !case.name.contains("correlation_id")
        })
        .collect();
    let mut script = Vec::new();
    for case in &cases {
        script.push(hostile_reply(case.properties.clone()));
        script.push(good_reply());
    }
    let rogue = rogue_server(&queue, script, Confirms::Required);
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: queue.clone(),
            server_user,
            timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    for case in &cases {
        match (case.expect, client.call(b"10")) {
            (Expect::Answer, Ok(body)) => assert_eq!(body, b"55", "{}", case.name),
            (Expect::Refuse(why), Err(Error::InvalidReply(message))) => {
                assert!(message.contains(why), "{}: {message}", case.name);
            }
            (expect, outcome) => panic!("{}: expected {expect:?}, got {outcome:?}", case.name),
        }
        assert_eq!(
            client.call(b"10").unwrap(),
            b"55",
            "the call after {}",
            case.name
        );
    }
    rogue.join().unwrap();
}

#[test]
fn hostile_replies_fail_their_calls_as_invalid_and_the_client_calls_on() {
    hostile_replies_to_a_library_client(None);
}

#[test]
fn hostile_replies_from_the_servers_user_fail_their_calls_as_invalid() {
    hostile_replies_to_a_library_client(Some(broker_user()));
}

#[test]
fn a_reply_with_a_correlation_id_that_is_not_utf8_is_dropped_and_the_call_answered() {
    let queue = unique_queue("hostile-id");
    let _guard = QueueGuard(queue.clone());
    // The rogue sends the awaited reply after one whose correlation id is not UTF-8.
    let rogue = rogue_server(
        &queue,
        vec![Box::new(|_: &str| {
            RawProperties::new().short(Property::CorrelationId, b"\xff\xfe")
        })],
        Confirms::Required,
    );
    let client = client_for(&queue, Duration::from_secs(2));
    let error = client.call(b"10").unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    rogue.join().unwrap();
    assert_eq!(
        client.stats().stray_replies,
        1,
        "dropped as a reply no call awaits"
    );
    let server = common::start_fib_server(&queue, 1);
    assert_eq!(client.call(b"10").unwrap(), b"55");
    server.shutdown().unwrap();
}

#[test]
fn the_client_binary_reports_a_hostile_reply_and_calls_again() {
    let queue = unique_queue("hostile-client-binary");
    let _guard = QueueGuard(queue.clone());
    let frame_max = RawPublisher::connect().frame_max;
    let room = headers_room(frame_max, (1 + 36) + (1 + broker_user().len()));
    let rogue = rogue_server(
        &queue,
        vec![
            hostile_reply(RawProperties::new().headers(nested_tables(deepest_tables_within(room)))),
            good_reply(),
        ],
        Confirms::Required,
    );
    let run_client = || {
        Command::new(env!("CARGO_BIN_EXE_client"))
            .args(["--url", &require_broker(), "--queue", &queue, "10"])
            .output()
            .unwrap()
    };
    let hostile = run_client();
    let (_, stderr) = text(&hostile);
    assert_eq!(
        hostile.status.code(),
        Some(1),
        "an error, not an abort: {stderr}"
    );
    assert!(
        stderr.contains("invalid reply") && stderr.contains("deeper"),
        "{stderr}"
    );
    let good = run_client();
    let (stdout, stderr) = text(&good);
    assert!(good.status.success(), "{stderr}");
    assert!(stdout.contains(" [.] Got 55"), "{stdout}");
    rogue.join().unwrap();
}

#[test]
fn a_call_or_reply_nested_deeper_than_accepted_is_not_sent() {
    let queue = unique_queue("deep-out");
    let _guard = QueueGuard(queue.clone());
    let deep = |depth: usize| {
        let mut value = amqp_rpc::HeaderValue::Int(1);
        for _ in 0..depth {
            value = amqp_rpc::HeaderValue::List(vec![value]);
        }
        value
    };
    let server = Server::builder(&require_broker())
        .serve(
            &queue,
            amqp_rpc::QueueOptions::with_workers(1),
            move |request: &Request| {
                Ok(amqp_rpc::Reply::new(request.body().to_vec()).with_header("deep", deep(33)))
            },
        )
        .start()
        .unwrap();
    let client = client_for(&queue, Duration::from_secs(10));
    let error = client
        .send(&Call::new("x").with_header("deep", deep(MAX_HEADER_DEPTH + 1)))
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidRequest(why) if why.contains("nest 33 deep")),
        "{error:?}"
    );
    assert_eq!(client.stats().replies, 0, "nothing was sent");
    let error = client
        .send(&Call::new("x").with_header("deep", deep(MAX_HEADER_DEPTH)))
        .unwrap_err();
    assert!(
        matches!(
            error.remote_kind(),
            Some(amqp_rpc::FailureKind::HandlerFailed)
        ) && error.to_string().contains("nested 33 deep"),
        "{error:?}"
    );
    server.shutdown().unwrap();
}

/// A generator of random bytes, deterministic from its seed (splitmix64).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Text of up to `most` bytes: ASCII, UTF-8 beyond it, or bytes that are not UTF-8.
    fn text(&mut self, most: u64) -> Vec<u8> {
        let length = self.below(most + 1) as usize;
        match self.below(10) {
            0..=5 => (0..length).map(|_| b' ' + self.below(95) as u8).collect(),
            6 | 7 => "é→🦀".bytes().cycle().take(length).collect(),
            _ => (0..length).map(|_| self.next() as u8).collect(),
        }
    }

    /// One field value: its type byte and encoding, nesting at most `depth` more containers.
    fn value(&mut self, depth: u32) -> (u8, Vec<u8>) {
        const TYPES: &[u8] = b"tbBsuUIilLfdDSxTVAF";
        let type_byte = if self.chance(3) {
            self.next() as u8
        } else {
            TYPES[self.below(TYPES.len() as u64) as usize]
        };
        let fixed = |random: &mut Random, size: usize| {
            (0..size).map(|_| random.next() as u8).collect::<Vec<u8>>()
        };
        let encoded = match type_byte {
            b't' | b'b' | b'B' => fixed(self, 1),
            b's' | b'u' | b'U' => fixed(self, 2),
            b'I' | b'i' | b'f' => fixed(self, 4),
            b'D' => fixed(self, 5),
            b'l' | b'L' | b'd' | b'T' => fixed(self, 8),
            b'V' => Vec::new(),
            b'S' | b'x' => long_string(&self.text(64)),
            b'A' if depth > 0 => {
                let values: Vec<(u8, Vec<u8>)> =
                    (0..self.below(4)).map(|_| self.value(depth - 1)).collect();
                array(&values)
            }
            b'F' if depth > 0 => self.table(depth - 1),
            b'A' | b'F' => long_string(b""),
            // A type AMQP does not define, with a few bytes after it.
            _ => {
                let size = self.below(4) as usize;
                fixed(self, size)
            }
        };
        (type_byte, encoded)
    }

    /// A field table nesting at most `depth` containers, now and then with a wrong length.
    fn table(&mut self, depth: u32) -> Vec<u8> {
        let names: Vec<Vec<u8>> = (0..self.below(5)).map(|_| self.text(12)).collect();
        let entries: Vec<(&[u8], u8, Vec<u8>)> = names
            .iter()
            .map(|name| {
                let (type_byte, value) = self.value(depth);
                (name.as_slice(), type_byte, value)
            })
            .collect();
        let mut encoded = table(&entries);
        if self.chance(3) {
            let wrong = (encoded.len() as u32 - 4)
                .wrapping_add(self.below(5) as u32)
                .wrapping_sub(2);
            encoded[..4].copy_from_slice(&wrong.to_be_bytes());
        }
        encoded
    }

    /// Random properties, with `reply_to` most often, and never a `user_id` but `user`.
    fn properties(&mut self, reply_to: &str, user: &str) -> RawProperties {
        let mut properties = RawProperties::new();
        for property in [
            Property::ContentType,
            Property::ContentEncoding,
            Property::MessageId,
            Property::Type,
            Property::AppId,
            Property::ClusterId,
        ] {
            if self.chance(40) {
                properties = properties.short(property, &self.text(40));
            }
        }
        if self.chance(3) {
            // Deep enough to overflow a parser that recurses, within a default frame.
            let depth = 3_000 + self.below(15_000) as usize;
            let headers = if self.chance(50) {
                nested_tables(depth)
            } else {
                nested_arrays(depth)
            };
            properties = properties.headers(headers);
        } else if self.chance(70) {
            // Sometimes deeper than accepted.
            let depth = self.below(MAX_HEADER_DEPTH as u64 + 8) as u32;
            properties = properties.headers(self.table(depth));
        }
        for property in [Property::DeliveryMode, Property::Priority] {
            if self.chance(30) {
                properties = properties.raw(property, vec![self.next() as u8]);
            }
        }
        if self.chance(30) {
            properties = properties.raw(Property::Timestamp, self.next().to_be_bytes().to_vec());
        }
        if self.chance(90) {
            properties = properties.short(Property::CorrelationId, &self.text(40));
        }
        properties = match self.below(20) {
            0..=16 => properties.short(Property::ReplyTo, reply_to.as_bytes()),
            17 => properties.short(Property::ReplyTo, &self.text(40)),
            _ => properties,
        };
        if self.chance(10) {
            let millis = (10_000 + self.below(50_000)).to_string();
            properties = properties.short(Property::Expiration, millis.as_bytes());
        }
        if self.chance(20) {
            properties = properties.short(Property::UserId, user.as_bytes());
        }
        if self.chance(2) {
            properties = properties.extra_flags(1 + self.below(2) as u16);
        }
        properties
    }
}

/// The seed of a randomized test: `HOSTILE_SEED`, or the clock's. It is printed if the test
/// fails, to run it again with `HOSTILE_SEED=<seed>`.
struct Seed(u64);

impl Seed {
    fn new() -> Seed {
        let seed = std::env::var("HOSTILE_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        Seed(seed)
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("the randomized test failed with HOSTILE_SEED={}", self.0);
        }
    }
}

/// How many random messages each randomized test sends.
const RANDOM_MESSAGES: usize = 400;

/// Sends [`RANDOM_MESSAGES`] random requests to `queue`, then checks that `good_call` is
/// answered; returns how many the broker took.
fn send_random_requests(seed: u64, queue: &str, good_call: &mut dyn FnMut()) -> usize {
    let mut random = Random(seed);
    let inbox = Inbox::at(&require_broker());
    let mut publisher = RawPublisher::connect();
    let mut taken = 0;
    for _ in 0..RANDOM_MESSAGES {
        let properties = random.properties(&inbox.name, &broker_user());
        let body = if random.chance(50) {
            b"10".to_vec()
        } else {
            random.text(64)
        };
        if publisher.publish(queue, &properties.encode(), &body) == Verdict::Confirmed {
            taken += 1;
        }
    }
    good_call();
    taken
}

#[test]
fn random_requests_through_the_broker_leave_a_server_serving() {
    let seed = Seed::new();
    let queue = unique_queue("random-requests");
    let _guard = QueueGuard(queue.clone());
    let server = common::start_server(&queue, 1, |request: &Request| {
        fib::handle_request(request.body(), 1000)
    });
    let client = client_for(&queue, Duration::from_secs(30));
    let taken = send_random_requests(seed.0, &queue, &mut || {
        assert_eq!(client.fib(10).unwrap().to_string(), "55");
    });
    assert!(taken > RANDOM_MESSAGES / 2, "the broker took only {taken}");
    assert_eq!(
        server.stats().reconnections,
        0,
        "no request broke the connection"
    );
    assert!(server.health().is_serving());
    server.shutdown().unwrap();
}

#[test]
fn random_requests_through_the_broker_leave_the_server_binary_serving() {
    let seed = Seed::new();
    let queue = unique_queue("random-binary");
    let _guard = QueueGuard(queue.clone());
    let mut command = our_server_with_workers(&queue, 1);
    command.env("RUST_LOG", "error");
    let mut server = spawn_until_ready(command, "Awaiting RPC requests");
    let client = client_for(&queue, Duration::from_secs(30));
    send_random_requests(seed.0.wrapping_add(1), &queue, &mut || {
        assert_eq!(client.fib(10).unwrap().to_string(), "55");
    });
    assert!(server_alive(&mut server), "the server binary died");
}

#[test]
fn random_replies_through_the_broker_fail_only_their_own_calls() {
    const CALLS: usize = 100;
    let seed = Seed::new();
    let mut random = Random(seed.0.wrapping_add(2));
    let queue = unique_queue("random-replies");
    let _guard = QueueGuard(queue.clone());
    let replies: Vec<ReplyMaker> = (0..CALLS)
        .map(|_| {
            let properties = random.properties("", &broker_user());
            let own_id = random.chance(80);
            let maker: ReplyMaker = Box::new(move |id: &str| {
                // A reply carries no reply_to; most carry the awaited correlation id.
                let properties = properties.merged(&RawProperties::new());
                let properties = RawProperties::new().merged(&properties);
                if own_id {
                    properties.short(Property::CorrelationId, id.as_bytes())
                } else {
                    properties
                }
            });
            maker
        })
        .collect();
    // The broker refuses some (a type AMQP does not define, a table that runs past its end).
    let rogue = rogue_server(&queue, replies, Confirms::MayBeRefused);
    let client = client_for(&queue, Duration::from_secs(5));
    let calls: Vec<Call> = (0..CALLS).map(|_| Call::new("10")).collect();
    for outcome in client.send_many(&calls) {
        match outcome {
            Ok(_)
            | Err(Error::Remote { .. })
            | Err(Error::InvalidReply(_))
            | Err(Error::Timeout { .. }) => {}
            Err(other) => panic!("a random reply failed the client: {other:?}"),
        }
    }
    rogue.join().unwrap();
    let server = common::start_fib_server(&queue, 1);
    assert_eq!(client.call(b"10").unwrap(), b"55", "the client calls on");
    server.shutdown().unwrap();
}
