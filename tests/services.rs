//! Real services: requests and replies with their metadata, several procedures in one server,
//! typed JSON payloads, and the examples that show them, against the real broker and pika.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use amqp_rpc::{
    Call, Client, ClientOptions, Error, HandlerError, HeaderValue, QueueOptions, Reply, Request,
    Server, ServerOptions, fib, json,
};
use common::process::{example, send_signal, spawn_until_ready, text};
use common::proxy::FaultProxy;
use common::{
    LONG_N, QueueGuard, broker_closes_connection, client_for, consumers, pika_peer,
    python_with_pika, require_broker, start_server, unacked_messages, unique_queue, wait_until,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const READY: &str = "Awaiting RPC requests";

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Takes the `deadline` header (Unix milliseconds, rendered as text) out of a description's
/// headers.
fn take_deadline(seen: &mut Value) -> u128 {
    let deadline = seen["headers"]
        .as_object_mut()
        .and_then(|headers| headers.remove("deadline"))
        .expect("the request carried a deadline header");
    deadline.as_str().unwrap().parse().unwrap()
}

/// Checks that `deadline_ms` (Unix milliseconds) is at most `timeout` from now, and not past.
fn assert_deadline_soon(deadline_ms: u128, timeout: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(
        deadline_ms > now && deadline_ms <= now + timeout.as_millis(),
        "deadline {deadline_ms} against now {now}"
    );
}

#[test]
fn a_pika_client_sends_headers_and_properties_and_the_echo_handler_sees_every_one() {
    let python = python_with_pika();
    let queue = unique_queue("echo-pika");
    let _guard = QueueGuard(queue.clone());
    let mut echo = example("echo");
    echo.args(["--queue", &queue]);
    let _server = spawn_until_ready(echo, READY);

    let output = pika_peer(&python, "call_with_properties.py", &queue)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "pika client failed: {stderr}");
    let reply = json_of(&stdout);
    let seen = json_of(reply["body"].as_str().unwrap());

    let keys: Vec<&str> = seen
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = [
        "app_id",
        "body",
        "content_encoding",
        "content_type",
        "correlation_id",
        "headers",
        "message_id",
        "queue",
        "redelivered",
        "type",
        "user_id",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected, "exactly these keys");
    assert_eq!(seen["body"], "hello");
    assert_eq!(
        seen["headers"],
        serde_json::json!({"x-echo-color": "blue", "x-number": "42", "x-flag": "true", "plain": "text"})
    );
    assert_eq!(seen["content_type"], "text/plain");
    assert_eq!(seen["content_encoding"], "utf-8");
    assert_eq!(seen["correlation_id"], reply["correlation_id"]);
    assert_eq!(seen["message_id"], "message-1");
    assert_eq!(seen["type"], "greeting");
    assert_eq!(seen["app_id"], "pika-peer");
    assert_eq!(seen["user_id"], "guest", "the broker-validated user");
    assert_eq!(seen["redelivered"], false);
    assert_eq!(seen["queue"], queue.as_str());

    // The reply: JSON, and the x-echo- headers, and only those, come back.
    assert_eq!(reply["content_type"], "application/json");
    assert_eq!(
        reply["headers"],
        serde_json::json!({"x-echo-color": "blue"})
    );
}

#[test]
fn our_client_sends_headers_to_a_pika_server_and_gets_its_reply_headers_back() {
    let python = python_with_pika();
    let queue = unique_queue("pika-properties");
    let _guard = QueueGuard(queue.clone());
    let command = pika_peer(&python, "properties_server.py", &queue);
    let _server = spawn_until_ready(command, READY);

    let client = client_for(&queue, Duration::from_secs(10));
    let call = Call::new("payload")
        .with_header("x-tenant", "acme")
        .with_header("x-attempt", 3)
        .with_content_type("text/plain")
        .with_type("lookup");
    let reply = client.send(&call).unwrap();
    assert_eq!(reply.content_type(), Some("application/json"));
    assert_eq!(reply.header_str("x-served-by"), Some("pika"));
    let mut seen = json_of(std::str::from_utf8(reply.body()).unwrap());
    assert_eq!(seen["body"], "payload");
    assert_deadline_soon(take_deadline(&mut seen), Duration::from_secs(10));
    assert_eq!(
        seen["headers"],
        serde_json::json!({"x-tenant": "acme", "x-attempt": "3"})
    );
    assert_eq!(seen["content_type"], "text/plain");
    assert_eq!(seen["type"], "lookup");
    client.close().unwrap();
}

#[test]
fn the_client_binary_calls_any_service_with_a_body_and_headers() {
    let queue = unique_queue("binary-body");
    let _guard = QueueGuard(queue.clone());
    let mut echo = example("echo");
    echo.args(["--queue", &queue]);
    let _server = spawn_until_ready(echo, READY);

    let output = common::process::our_client(
        &queue,
        &[
            "--body",
            "plain words",
            "--header",
            "x-echo-a=1",
            "--header",
            "b=two=2",
            "--content-type",
            "text/plain",
        ],
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let mut seen = json_of(&stdout);
    assert_eq!(seen["body"], "plain words");
    assert_deadline_soon(take_deadline(&mut seen), Duration::from_secs(10));
    assert_eq!(
        seen["headers"],
        serde_json::json!({"x-echo-a": "1", "b": "two=2"})
    );
    assert_eq!(seen["content_type"], "text/plain");

    let output = common::process::our_client(&queue, &["--header", "a=1", "5"]);
    assert!(!output.status.success(), "--header needs --body");
    let output = common::process::our_client(&queue, &["--body", "x", "--header", "novalue"]);
    assert!(text(&output).1.contains("'novalue' is not NAME=VALUE"));
}

/// Starts a server of two queues whose handlers record which queue each request came from.
fn two_procedure_server(url: &str, first: &str, second: &str) -> (Server, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen_first, seen_second) = (Arc::clone(&seen), Arc::clone(&seen));
    let mut options = ServerOptions::default();
    options.connect.heartbeat = 1;
    let server = Server::builder(url)
        .options(options)
        .serve(
            first,
            QueueOptions::with_workers(2),
            move |request: &Request| {
                seen_first
                    .lock()
                    .unwrap()
                    .push(format!("first:{}", request.queue()));
                fib::handle_request(request.body(), 1000)
            },
        )
        .serve(
            second,
            QueueOptions::with_workers(1),
            move |request: &Request| {
                seen_second
                    .lock()
                    .unwrap()
                    .push(format!("second:{}", request.queue()));
                Ok(Reply::new(request.body().to_ascii_uppercase())
                    .with_header("x-procedure", "upper"))
            },
        )
        .start()
        .unwrap();
    (server, seen)
}

#[test]
fn two_procedures_in_one_server_each_answer_and_never_see_each_others_requests() {
    let (first, second) = (unique_queue("proc-fib"), unique_queue("proc-upper"));
    let _guards = (QueueGuard(first.clone()), QueueGuard(second.clone()));
    let (server, seen) = two_procedure_server(&require_broker(), &first, &second);
    assert_eq!((consumers(&first), consumers(&second)), (2, 1));

    let fib_client = client_for(&first, Duration::from_secs(10));
    let upper_client = client_for(&second, Duration::from_secs(10));
    for n in 0..5 {
        assert_eq!(fib_client.fib(n).unwrap(), fib::fib(n));
        let reply = upper_client.send(&Call::new(format!("call {n}"))).unwrap();
        assert_eq!(reply.body(), format!("CALL {n}").as_bytes());
        assert_eq!(reply.header_str("x-procedure"), Some("upper"));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 10);
    for entry in &seen {
        let expected = [format!("first:{first}"), format!("second:{second}")];
        assert!(
            expected.contains(entry),
            "a request reached the wrong handler: {entry}"
        );
    }
    server.shutdown().unwrap();
    assert_eq!((consumers(&first), consumers(&second)), (0, 0));
}

#[test]
fn after_the_broker_closes_its_connection_both_procedures_are_served_again() {
    let (first, second) = (unique_queue("proc-closed-a"), unique_queue("proc-closed-b"));
    let _guards = (QueueGuard(first.clone()), QueueGuard(second.clone()));
    let proxy = FaultProxy::start(&require_broker());
    let (server, _) = two_procedure_server(&proxy.url(), &first, &second);
    let names = proxy.broker_connection_names();
    assert_eq!(names.len(), 1, "one connection for both queues");
    broker_closes_connection(&names[0]);

    // Served again: both queues have their consumers back, and answer.
    wait_until("both queues consumed again", || {
        proxy.connections() == 2 && consumers(&first) == 2 && consumers(&second) == 1
    });
    assert_eq!(
        client_for(&first, Duration::from_secs(5))
            .call(b"10")
            .unwrap(),
        b"55"
    );
    assert_eq!(
        client_for(&second, Duration::from_secs(5))
            .call(b"ab")
            .unwrap(),
        b"AB"
    );
    server.shutdown().unwrap();
}

#[test]
fn the_services_example_serves_both_and_drains_both_on_sigterm() {
    let prefix = unique_queue("services");
    let (fib_queue, stats_queue) = (format!("{prefix}.fib"), format!("{prefix}.stats"));
    let _guards = (
        QueueGuard(fib_queue.clone()),
        QueueGuard(stats_queue.clone()),
    );
    // The answer to the long request below, computed meanwhile.
    let expected = thread::spawn(|| fib::fib(LONG_N));
    let mut services = example("services");
    services.args(["--prefix", &prefix, "--max-n", &LONG_N.to_string()]);
    let mut server = spawn_until_ready(services, READY);

    let output = Command::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_client"))
            .parent()
            .unwrap()
            .join("examples/services_client"),
    )
    .args(["--url", &require_broker(), "--prefix", &prefix])
    .output()
    .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        "fib(30) = 832040\n\
         stats of [1.0, 2.0, 4.5]: count 3, sum 7.5, mean Some(2.5)\n\
         stats of []: count 0, sum 0, mean None\n"
    );

    // fib(3,000,000) takes seconds in this debug build: long enough to see the request taken
    // (polled through rabbitmqctl) and for SIGTERM to arrive mid-request.
    let slow = {
        let queue = fib_queue.clone();
        thread::spawn(move || client_for(&queue, Duration::from_secs(60)).fib(LONG_N))
    };
    wait_until("the server took the request", || {
        unacked_messages(&fib_queue) == 1
    });
    send_signal(&server.0, "TERM");
    let exit = server.0.wait().unwrap();
    assert!(exit.success(), "the services example exited with {exit}");
    assert_eq!(slow.join().unwrap().unwrap(), expected.join().unwrap());
    assert_eq!((consumers(&fib_queue), consumers(&stats_queue)), (0, 0));
    assert_eq!(unacked_messages(&fib_queue), 0);
}

#[test]
fn the_gateway_example_answers_through_one_client_from_its_thread_pool() {
    use std::io::Write;
    let prefix = unique_queue("gateway");
    let _guards = (
        QueueGuard(format!("{prefix}.fib")),
        QueueGuard(format!("{prefix}.stats")),
    );
    let mut services = example("services");
    services.args(["--prefix", &prefix]);
    let _server = spawn_until_ready(services, READY);
    let mut gateway = Command::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_client"))
            .parent()
            .unwrap()
            .join("examples/gateway"),
    )
    .args([
        "--url",
        &require_broker(),
        "--prefix",
        &prefix,
        "--threads",
        "4",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut input = String::new();
    for n in 0..20 {
        input.push_str(&format!("fib {n}\nstats {n} 1\n"));
    }
    input.push_str("fib -1\nsing\n");
    gateway
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = gateway.wait_with_output().unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 42, "{stdout}");
    for n in 0..20u64 {
        let (fib_line, stats_line) = (lines[2 * n as usize], lines[2 * n as usize + 1]);
        assert_eq!(fib_line, format!("{} fib {n}: {}", 2 * n + 1, fib::fib(n)));
        let mean = (n as f64 + 1.0) / 2.0;
        assert_eq!(
            stats_line,
            format!("{} stats {n} 1: count 2, mean {mean}", 2 * n + 2)
        );
    }
    assert!(
        lines[40].starts_with("41 fib -1: error: server error (bad-request)"),
        "{stdout}"
    );
    assert!(
        lines[41].starts_with("42 sing: error: invalid request"),
        "{stdout}"
    );
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Point {
    x: i64,
    y: i64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Distance {
    manhattan: i64,
}

#[test]
fn json_calls_round_trip_and_a_malformed_request_leaves_the_worker_serving() {
    let queue = unique_queue("json");
    let _guard = QueueGuard(queue.clone());
    // One worker: had the malformed request killed it, nothing would answer afterwards.
    let server = start_server(
        &queue,
        1,
        json::handler(|point: Point, request: &Request| {
            assert_eq!(request.content_type(), Some("application/json"));
            Ok(Distance {
                manhattan: point.x.abs() + point.y.abs(),
            })
        }),
    );
    let client = client_for(&queue, Duration::from_secs(10));
    let distance: Distance = client.call_json(&Point { x: 3, y: -4 }).unwrap();
    assert_eq!(distance, Distance { manhattan: 7 });

    let reply = client
        .send(&Call::json(&Point { x: 1, y: 1 }).unwrap())
        .unwrap();
    assert_eq!(reply.content_type(), Some("application/json"));
    assert_eq!(reply.json::<Distance>().unwrap(), Distance { manhattan: 2 });

    for malformed in [&b"{\"x\": 1"[..], b"{\"x\": \"one\", \"y\": 2}", b"\xff"] {
        let error = client
            .send(&Call::new(malformed).with_content_type("application/json"))
            .unwrap_err();
        match &error {
            Error::Remote { message, kind } => {
                assert_eq!(*kind, Some(amqp_rpc::FailureKind::BadRequest));
                assert!(message.contains("not the JSON expected"), "{message}")
            }
            other => panic!("expected an error reply, got {other:?}"),
        }
    }
    let distance: Distance = client.call_json(&Point { x: -2, y: 0 }).unwrap();
    assert_eq!(distance.manhattan, 2, "the worker still serves");

    // A reply of another shape than the caller expects is the caller's own, distinct error.
    let error = client
        .call_json::<_, Vec<String>>(&Point { x: 0, y: 0 })
        .unwrap_err();
    assert!(error.is_invalid_reply(), "{error:?}");
    assert!(!error.is_remote());
    server.shutdown().unwrap();
}

#[test]
fn a_malformed_json_request_gets_a_bad_request_error_reply_on_the_wire() {
    let queue = unique_queue("json-kind");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(
        &queue,
        1,
        json::handler(|point: Point, _: &Request| Ok(point.x)),
    );
    // A byte handler's plain error is a handler failure; compare both kinds on the wire.
    let failing = unique_queue("json-kind-failing");
    let _failing_guard = QueueGuard(failing.clone());
    let failing_server = start_server(&failing, 1, |_: &Request| -> Result<Reply, HandlerError> {
        Err("out of order".into())
    });
    let kind_of = |queue: &str, body: &[u8]| {
        let received = common::raw_reply(queue, body);
        let headers = received.properties.headers().clone().unwrap_or_default();
        let text = |name: &str| match headers.get(name) {
            Some(amiquip::AmqpValue::LongString(text)) => text.clone(),
            other => panic!("header {name}: {other:?}"),
        };
        (text("error-kind"), text("error"))
    };
    let (kind, message) = kind_of(&queue, b"nonsense");
    assert_eq!(kind, "bad-request");
    assert!(message.contains("not the JSON expected"), "{message}");
    assert_eq!(
        kind_of(&failing, b"x"),
        ("handler-failed".into(), "out of order".into())
    );
    server.shutdown().unwrap();
    failing_server.shutdown().unwrap();
}

#[test]
fn header_values_of_every_kind_reach_the_handler_as_sent() {
    let queue = unique_queue("header-kinds");
    let _guard = QueueGuard(queue.clone());
    let received = Arc::new(Mutex::new(None));
    let store = Arc::clone(&received);
    let server = start_server(&queue, 1, move |request: &Request| {
        *store.lock().unwrap() = Some(request.headers().clone());
        Ok(Vec::new())
    });
    let nested: amqp_rpc::Headers = [("depth", 2)].into_iter().collect();
    let call = Call::new("")
        .with_header("text", "words")
        .with_header("int", -5)
        .with_header("bool", false)
        .with_header("float", 0.25)
        .with_header("bytes", vec![0u8, 1, 2])
        .with_header("list", HeaderValue::List(vec!["a".into(), 1.into()]))
        .with_header("table", HeaderValue::Table(nested));
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: queue.clone(),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    client.send(&call).unwrap();
    let mut headers = received.lock().unwrap().take().unwrap();
    // Our client adds the call's deadline to the headers it was given.
    assert!(
        headers
            .remove("deadline")
            .and_then(|d| d.as_int())
            .is_some()
    );
    assert_eq!(&headers, call.headers());
    let rendered: BTreeMap<&str, String> = headers
        .iter()
        .map(|(name, value)| (name, value.to_string()))
        .collect();
    assert_eq!(rendered["list"], "[a, 1]");
    assert_eq!(rendered["table"], "{depth: 2}");
    server.shutdown().unwrap();
}
