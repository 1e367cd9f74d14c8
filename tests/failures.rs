//! Calls that explain themselves: no server, timeouts that say why, deadlines that reach the
//! server, error kinds on the wire, limits that fail fast, errors that name what really
//! happened, and server failures that stay small. (Refusals by the broker of messages too
//! large for it are in tests/cluster.rs, whose nodes have a small message size limit.)

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{
    Call, Client, ClientOptions, Error, FailureKind, HandlerError, QueueOptions, QueueState,
    Request, Server, ServerOptions, fib,
};
use common::logs;
use common::process::{spawn_until_ready, text};
use common::proxy::FaultProxy;
use common::{
    QueueGuard, consumers, declare_queue, hold_until, pika_peer, publish_request, python_with_pika,
    queued_messages, raw_connection, require_broker, start_fib_server, start_server, unique_queue,
    wait_until,
};

fn options(queue: &str, timeout: Duration, grace: Duration) -> ClientOptions {
    ClientOptions {
        queue: queue.to_string(),
        timeout,
        no_server_grace: grace,
        ..ClientOptions::default()
    }
}

fn client(queue: &str, timeout: Duration, grace: Duration) -> Client {
    Client::with_options(&require_broker(), options(queue, timeout, grace)).unwrap()
}

/// Declares `queue` as a server would, and leaves it without a consumer.
fn declare_unconsumed(queue: &str) {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, queue);
    connection.close().unwrap();
}

/// A server of `queue` with one worker that holds every `hold` request until `released`, and
/// counts the requests its handler sees; other bodies are Fibonacci.
fn holding_server(queue: &str, released: &Arc<AtomicBool>, seen: &Arc<AtomicUsize>) -> Server {
    let (released, seen) = (Arc::clone(released), Arc::clone(seen));
    start_server(queue, 1, move |request: &Request| {
        seen.fetch_add(1, Ordering::SeqCst);
        if request.body() == b"hold" {
            hold_until(&released);
            return Ok(b"held".to_vec());
        }
        fib::serve(request, 1000)
    })
}

#[test]
fn with_nobody_consuming_a_call_fails_as_no_server_after_the_grace_not_the_timeout() {
    let queue = unique_queue("no-server");
    let _guard = QueueGuard(queue.clone());
    declare_unconsumed(&queue);
    let grace = Duration::from_millis(300);
    let client = client(&queue, Duration::from_secs(20), grace);

    let started = Instant::now();
    let error = client.call(b"10").unwrap_err();
    let waited = started.elapsed();
    assert!(error.is_no_server(), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(
        error.to_string(),
        format!("no server is consuming queue '{queue}'")
    );
    assert!(waited >= grace, "failed before the grace: {waited:?}");
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");

    // Once a server consumes, the same client is answered again.
    let server = start_fib_server(&queue, 1);
    assert_eq!(client.call(b"10").unwrap(), b"55");
    server.shutdown().unwrap();
}

#[test]
fn a_server_restarted_within_the_grace_loses_no_call() {
    let queue = unique_queue("restart-in-grace");
    let _guard = QueueGuard(queue.clone());
    start_fib_server(&queue, 1).shutdown().unwrap();
    assert_eq!(consumers(&queue), 0);
    let client = client(&queue, Duration::from_secs(20), Duration::from_secs(5));
    let call = thread::spawn(move || client.call(b"20"));
    wait_until("the request waits in the queue", || {
        queued_messages(&queue) == 1
    });
    let server = start_fib_server(&queue, 1);
    assert_eq!(call.join().unwrap().unwrap(), b"6765");
    server.shutdown().unwrap();
}

#[test]
fn a_server_back_before_the_second_look_after_the_grace_loses_no_call() {
    // A server replacing its only worker, or restarting at once, consumes nothing for a moment;
    // a call whose grace runs out just then must not fail as "no server".
    logs::capture();
    let queue = unique_queue("second-look");
    let _guard = QueueGuard(queue.clone());
    declare_unconsumed(&queue);
    let client = client(&queue, Duration::from_secs(20), Duration::from_millis(300));
    let call = thread::spawn(move || client.call(b"20"));
    wait_until("the call's first look finds no server", || {
        logs::logged(&format!("no server consumes queue '{queue}' now"))
    });
    // Back within the second that the call gives it before looking again.
    let server = start_fib_server(&queue, 1);
    assert_eq!(call.join().unwrap().unwrap(), b"6765");
    server.shutdown().unwrap();
}

/// The state a call's timeout reported.
fn timeout_state(error: &Error) -> QueueState {
    match error {
        Error::Timeout {
            state: Some(state), ..
        } => *state,
        other => panic!("expected a timeout that names the queue's state, got {other:?}"),
    }
}

#[test]
fn a_timeout_says_nobody_was_consuming() {
    let queue = unique_queue("timeout-nobody");
    let _guard = QueueGuard(queue.clone());
    declare_unconsumed(&queue);
    // The grace check off: the call waits out its timeout.
    let timeout = Duration::from_millis(400);
    let error = client(&queue, timeout, Duration::ZERO)
        .call(b"10")
        .unwrap_err();
    assert!(error.is_timeout() && error.is_retryable(), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("timed out after 0.400 s"), "{message}");
    assert!(message.contains("no server was consuming it"), "{message}");
    assert_eq!(timeout_state(&error).consumers, 0);
}

#[test]
fn a_timeout_says_a_busy_server_had_requests_queued_ahead() {
    let queue = unique_queue("timeout-busy");
    let _guard = QueueGuard(queue.clone());
    let (released, seen) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let server = holding_server(&queue, &released, &seen);
    for _ in 0..3 {
        publish_request(&queue, b"hold");
    }
    wait_until("the worker holds one request", || {
        seen.load(Ordering::SeqCst) == 1
    });
    let error = client(&queue, Duration::from_millis(500), Duration::from_secs(1))
        .call(b"10")
        .unwrap_err();
    let state = timeout_state(&error);
    assert_eq!(state.consumers, 1, "{error}");
    assert!(state.waiting >= 2, "requests queued ahead: {error}");
    assert!(
        error.to_string().contains("1 servers were consuming it"),
        "{error}"
    );
    released.store(true, Ordering::SeqCst);
    server.shutdown().unwrap();
}

#[test]
fn a_timeout_says_a_server_took_the_request_and_never_answered() {
    let queue = unique_queue("timeout-taken");
    let _guard = QueueGuard(queue.clone());
    let (released, seen) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let server = holding_server(&queue, &released, &seen);
    let error = client(&queue, Duration::from_millis(500), Duration::from_secs(1))
        .call(b"hold")
        .unwrap_err();
    assert_eq!(
        timeout_state(&error),
        QueueState {
            consumers: 1,
            waiting: 0
        },
        "{error}"
    );
    assert!(
        error.to_string().contains("a server had taken the request"),
        "{error}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    released.store(true, Ordering::SeqCst);
    server.shutdown().unwrap();
}

#[test]
fn a_late_reply_is_counted_and_dropped() {
    let queue = unique_queue("late");
    let _guard = QueueGuard(queue.clone());
    let (released, seen) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let server = holding_server(&queue, &released, &seen);
    let client = client(&queue, Duration::from_secs(10), Duration::from_secs(1));
    let error = client
        .call_with_timeout(b"hold", Duration::from_millis(300))
        .unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
    assert_eq!(client.stats().late_replies, 0);
    released.store(true, Ordering::SeqCst);
    // The late reply reaches the client while this call waits; it answers nobody else.
    assert_eq!(client.call(b"12").unwrap(), b"144");
    wait_until("the late reply is counted", || {
        client.stats().late_replies == 1
    });
    server.shutdown().unwrap();
}

#[test]
fn a_request_from_pika_past_its_deadline_is_not_computed() {
    let python = python_with_pika();
    let queue = unique_queue("past-deadline");
    let _guard = QueueGuard(queue.clone());
    let computed = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&computed);
    // One worker: had fib(20,000,000) been computed, "10" would wait minutes behind it.
    let server = start_server(&queue, 1, move |request: &Request| {
        record
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(request.body()).into_owned());
        fib::serve(request, 50_000_000)
    });
    let output = pika_peer(&python, "expired_then_fresh.py", &queue)
        .arg("20000000")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let outcome: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(outcome["fresh"], "55", "{stdout}");
    assert_eq!(outcome["expired_answered"], false, "{stdout}");
    assert_eq!(
        *computed.lock().unwrap(),
        ["10"],
        "the handler never saw it"
    );
    server.shutdown().unwrap();
}

#[test]
fn requests_carry_their_deadline_to_the_handler() {
    let queue = unique_queue("deadline-header");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 1, |request: &Request| {
        let deadline = request.deadline().ok_or("no deadline")?;
        let left = deadline
            .duration_since(std::time::SystemTime::now())
            .map_err(|_| "the deadline has passed")?;
        Ok(left.as_millis().to_string())
    });
    let client = client(&queue, Duration::from_secs(10), Duration::from_secs(1));
    let left: u128 = String::from_utf8(client.call(b"").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        left > 5_000 && left <= 10_000,
        "{left} ms left of a 10 s call"
    );
    server.shutdown().unwrap();
}

/// A server whose handler fails in every way a body asks for.
fn failing_server(queue: &str) -> Server {
    start_server(queue, 2, |request: &Request| match request.body() {
        b"bad" => Err(HandlerError::bad_request("bad input")),
        b"fail" => Err(HandlerError::failed("it broke")),
        b"busy" => Err(HandlerError::overloaded("too busy")),
        b"late" => Err(HandlerError::deadline_exceeded("too late")),
        b"panic" => panic!("on purpose"),
        _ => Ok(b"fine".to_vec()),
    })
}

#[test]
fn each_error_kind_arrives_on_the_wire_and_maps_to_its_variant() {
    let python = python_with_pika();
    let queue = unique_queue("kinds");
    let _guard = QueueGuard(queue.clone());
    let server = failing_server(&queue);
    let cases = [
        ("bad", "bad-request", FailureKind::BadRequest, false),
        ("fail", "handler-failed", FailureKind::HandlerFailed, false),
        ("busy", "overloaded", FailureKind::Overloaded, true),
        (
            "late",
            "deadline-exceeded",
            FailureKind::DeadlineExceeded,
            true,
        ),
        ("panic", "handler-failed", FailureKind::HandlerFailed, false),
    ];
    let mut command = pika_peer(&python, "error_kinds.py", &queue);
    command.args(cases.iter().map(|(body, ..)| body));
    let output = command.output().unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let on_the_wire: serde_json::Value = serde_json::from_str(&stdout).unwrap();

    let client = client(&queue, Duration::from_secs(10), Duration::from_secs(1));
    for (body, wire_kind, kind, retryable) in cases {
        assert_eq!(on_the_wire[body]["error-kind"], wire_kind, "{stdout}");
        let error = client.call(body.as_bytes()).unwrap_err();
        assert_eq!(error.remote_kind(), Some(kind), "{error:?}");
        assert_eq!(error.is_retryable(), retryable, "{error:?}");
        assert_eq!(
            on_the_wire[body]["error"],
            match &error {
                Error::Remote { message, .. } => message.as_str(),
                other => panic!("{other:?}"),
            }
        );
    }
    server.shutdown().unwrap();
}

#[test]
fn an_error_reply_without_a_kind_from_a_pika_server_still_maps() {
    let python = python_with_pika();
    let queue = unique_queue("kindless");
    let _guard = QueueGuard(queue.clone());
    let command = pika_peer(&python, "error_server.py", &queue);
    let _server = spawn_until_ready(command, "Awaiting RPC requests");
    let error = client(&queue, Duration::from_secs(10), Duration::from_secs(1))
        .call(b"this")
        .unwrap_err();
    match &error {
        Error::Remote {
            kind: None,
            message,
        } => assert_eq!(message, "cannot serve this"),
        other => panic!("expected an error reply without a kind, got {other:?}"),
    }
    assert!(!error.is_retryable());
}

#[test]
fn an_oversized_body_is_refused_before_the_handler_sees_it() {
    let queue = unique_queue("max-body");
    let _guard = QueueGuard(queue.clone());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let options = QueueOptions {
        workers: 1,
        max_body: 1000,
        ..QueueOptions::default()
    };
    let server = Server::builder(&require_broker())
        .serve(&queue, options, move |request: &Request| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(request.body().len().to_string())
        })
        .start()
        .unwrap();
    let client = client(&queue, Duration::from_secs(10), Duration::from_secs(1));
    let error = client.call(&[b'x'; 1001]).unwrap_err();
    assert_eq!(
        error.remote_kind(),
        Some(FailureKind::BadRequest),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("1001 bytes is over this server's limit of 1000 bytes"),
        "{error}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert_eq!(client.call(&[b'x'; 1000]).unwrap(), b"1000");
    server.shutdown().unwrap();
}

#[test]
fn calls_past_the_in_flight_cap_fail_at_once_as_overloaded() {
    let queue = unique_queue("in-flight");
    let _guard = QueueGuard(queue.clone());
    let (released, seen) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let server = holding_server(&queue, &released, &seen);
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            max_in_flight: Some(2),
            ..options(&queue, Duration::from_secs(20), Duration::from_secs(5))
        },
    )
    .unwrap();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            thread::spawn(move || client.call(b"hold"))
        })
        .collect();
    wait_until("two calls are in flight", || queued_messages(&queue) == 2);

    let error = client.call(b"10").unwrap_err();
    assert!(
        matches!(error, Error::Overloaded { max_in_flight: 2 }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    released.store(true, Ordering::SeqCst);
    for call in held {
        assert_eq!(call.join().unwrap().unwrap(), b"held");
    }
    // A batch larger than the cap: the calls past it fail, the others are answered.
    let outcomes = client.send_many(&[Call::new("1"), Call::new("2"), Call::new("3")]);
    assert_eq!(outcomes[0].as_ref().unwrap().body(), b"1");
    assert_eq!(outcomes[1].as_ref().unwrap().body(), b"1");
    assert!(matches!(outcomes[2], Err(Error::Overloaded { .. })));
    assert_eq!(client.call(b"10").unwrap(), b"55", "the cap is free again");
    server.shutdown().unwrap();
}

/// A TCP listener that accepts connections and never says a word.
fn silent_listener() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        listener.local_addr().unwrap().port()
    );
    (listener, url)
}

#[test]
fn a_broker_address_that_never_speaks_amqp_fails_within_the_connect_timeout() {
    let (_listener, url) = silent_listener();
    let mut options = options("q", Duration::from_secs(10), Duration::from_secs(1));
    options.connect.connect_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let error = Client::with_options(&url, options).expect_err("no broker there");
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(error.chain().contains("handshake"), "{}", error.chain());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A Fibonacci server of a new queue, and a client of it whose connection goes through a
/// fault-injecting proxy; the client has made one call.
fn proxied_client(purpose: &str) -> (QueueGuard, Server, FaultProxy, Client) {
    let queue = unique_queue(purpose);
    let guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);
    let proxy = FaultProxy::start(&require_broker());
    let client = Client::with_options(
        &proxy.url(),
        options(&queue, Duration::from_secs(10), Duration::from_secs(1)),
    )
    .unwrap();
    assert_eq!(client.call(b"10").unwrap(), b"55");
    (guard, server, proxy, client)
}

#[test]
fn reconnecting_inside_a_call_stays_within_the_calls_timeout() {
    let (_guard, server, proxy, client) = proxied_client("reconnect-deadline");
    // The connection goes; new ones are accepted, and never answered.
    proxy.freeze();
    proxy.cut_all();
    let timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let error = client.call_with_timeout(b"10", timeout).unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited < timeout + Duration::from_secs(1),
        "a {timeout:?} call took {waited:?}"
    );
    assert!(
        error.is_connection_lost() || matches!(error, Error::Connect { .. }),
        "{error:?}"
    );
    server.shutdown().unwrap();
}

#[test]
fn when_reconnecting_fails_every_call_gets_the_real_connect_error() {
    let (guard, server, proxy, client) = proxied_client("reconnect-refused");
    let queue = guard.0.clone();
    proxy.refuse_new();
    proxy.cut_all();
    wait_until("the client sees its connection gone", || {
        client
            .call(b"10")
            .is_err_and(|error| !error.is_connection_lost())
    });
    for outcome in client.call_many(&[b"1", b"2"], Duration::from_secs(5)) {
        let error = outcome.unwrap_err();
        match &error {
            Error::Connect { source, .. } => {
                assert_eq!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "{error:?}"
                )
            }
            other => panic!("expected the refused connection, got {other:?}"),
        }
    }

    // With retry, a call whose deadline passes while reconnecting is refused ends with the
    // connect error, not with a timeout that hides it.
    let proxy = FaultProxy::start(&require_broker());
    let retrying = Client::with_options(
        &proxy.url(),
        ClientOptions {
            retry: true,
            ..options(&queue, Duration::from_secs(10), Duration::from_secs(1))
        },
    )
    .unwrap();
    proxy.refuse_new();
    proxy.cut_all();
    let error = retrying
        .call_with_timeout(b"10", Duration::from_millis(800))
        .unwrap_err();
    assert!(
        matches!(&error, Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused)
            || error.is_connection_lost(),
        "{error:?}"
    );
    assert!(!error.is_timeout(), "{error:?}");
    server.shutdown().unwrap();
}

#[test]
fn bad_credentials_are_an_authentication_error_not_a_configuration_one() {
    let (host, port) = common::host_and_port(&require_broker());
    let url = format!("amqp://guest:wrong-password@{host}:{port}/%2f");
    let error = Client::connect(&url).expect_err("refused");
    assert!(error.is_authentication(), "{error:?}");
    assert!(!error.is_config() && !error.is_retryable());
    assert!(!error.to_string().contains("wrong-password"), "{error}");
    assert!(Client::connect("amqp://h/a/b").unwrap_err().is_config());
}

#[test]
fn shutdown_drains_for_its_drain_timeout_then_sends_the_request_back() {
    let queue = unique_queue("drain-timeout");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(false));
    let (held, seen) = (Arc::clone(&released), Arc::new(AtomicUsize::new(0)));
    let counter = Arc::clone(&seen);
    let server = Server::builder(&require_broker())
        .options(ServerOptions {
            drain_timeout: Duration::from_millis(300),
            ..ServerOptions::default()
        })
        .serve(&queue, QueueOptions::with_workers(1), move |_: &Request| {
            counter.fetch_add(1, Ordering::SeqCst);
            hold_until(&held);
            Ok(Vec::new())
        })
        .start()
        .unwrap();
    publish_request(&queue, b"forever");
    wait_until("the handler holds the request", || {
        seen.load(Ordering::SeqCst) == 1
    });
    let started = Instant::now();
    server.shutdown().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    wait_until("the request is back in the queue", || {
        common::ready_messages(&queue) == 1
    });
    released.store(true, Ordering::SeqCst);
}

#[test]
fn shutdown_is_honoured_while_the_server_is_connecting() {
    let queue = unique_queue("shutdown-connecting");
    let _guard = QueueGuard(queue.clone());
    let proxy = FaultProxy::start(&require_broker());
    let mut options = ServerOptions::default();
    options.connect.connect_timeout = Duration::from_secs(30);
    options.connect.heartbeat = 1;
    let server = Server::builder(&proxy.url())
        .options(options)
        .serve(&queue, QueueOptions::with_workers(1), |_: &Request| {
            Ok(Vec::new())
        })
        .start()
        .unwrap();
    // The connection goes, and the next one hangs in its handshake for up to 30 s.
    proxy.freeze();
    proxy.cut_all();
    wait_until("the server is connecting again", || {
        proxy.connections() >= 2
    });
    let started = Instant::now();
    server.shutdown().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waited {:?} for the connection attempt",
        started.elapsed()
    );
}

#[test]
fn huge_timeouts_work_and_never_panic() {
    let queue = unique_queue("huge-timeout");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);
    let client = client(&queue, Duration::MAX, Duration::from_secs(1));
    assert_eq!(client.call(b"10").unwrap(), b"55");
    assert_eq!(
        client.call_with_timeout(b"11", Duration::MAX).unwrap(),
        b"89"
    );
    let output = common::process::our_client(&queue, &["--timeout", "1e20", "12"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains(" [.] Got 144"), "{stdout}");
    server.shutdown().unwrap();
}
