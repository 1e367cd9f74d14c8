//! Observability: the client's and the server's statistics count exactly what was done, the
//! `/metrics` endpoint is valid Prometheus text that agrees with them and goes with the server,
//! `/health` follows the server's state, and W3C trace context travels through a call.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::{
    Client, ClientOptions, HandlerError, Health, QueueOptions, Request, Server, ServerOptions, fib,
};
use common::process::{our_server, send_signal, spawn_until_ready, text};
use common::proxy::FaultProxy;
use common::{
    QueueGuard, hold_until, http_get, pika_peer, pika_script, python_with_pika,
    python_with_prometheus_client, require_broker, unique_queue, wait_until,
};

/// A server of `queue`, with its metrics endpoint on a free port, whose one worker holds
/// `hold` requests until `released`, refuses `bad`, and computes Fibonacci otherwise.
fn observed_server(url: &str, queue: &str, released: &Arc<AtomicBool>) -> Server {
    let released = Arc::clone(released);
    let mut options = ServerOptions {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerOptions::default()
    };
    options.connect.heartbeat = 1;
    Server::builder(url)
        .options(options)
        .serve(
            queue,
            QueueOptions::with_workers(1),
            move |request: &Request| match request.body() {
                b"hold" => {
                    hold_until(&released);
                    Ok(b"held".to_vec())
                }
                b"bad" => Err(HandlerError::bad_request("refused")),
                _ => fib::serve(request, 1000),
            },
        )
        .start()
        .unwrap()
}

/// Makes the known mix of calls: a no-route (before the server exists), 5 good ones, 2 bad
/// requests, a timeout whose reply comes late, and a sixth good one, during which the late
/// reply is read. Returns the client and the server.
fn known_mix(queue: &str, released: &Arc<AtomicBool>) -> (Client, Server) {
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: queue.to_string(),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    assert!(client.call(b"1").unwrap_err().is_no_route());
    let server = observed_server(&require_broker(), queue, released);
    for n in 0..5u64 {
        assert_eq!(client.fib(n).unwrap(), fib::fib(n));
    }
    for _ in 0..2 {
        assert!(client.call(b"bad").unwrap_err().is_remote());
    }
    let timed_out = client
        .call_with_timeout(b"hold", Duration::from_millis(300))
        .unwrap_err();
    assert!(timed_out.is_timeout(), "{timed_out:?}");
    released.store(true, Ordering::SeqCst);
    // The one worker answers the held request first: its late reply comes before this one's.
    assert_eq!(client.fib(10).unwrap(), fib::fib(10));
    assert_eq!(client.stats().late_replies, 1);
    (client, server)
}

#[test]
fn client_and_server_statistics_equal_what_was_done() {
    let queue = unique_queue("stats");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(false));
    let (client, server) = known_mix(&queue, &released);

    let stats = client.stats();
    assert_eq!((stats.calls, stats.replies), (10, 8), "{stats:?}");
    assert_eq!(stats.errors.no_route, 1);
    assert_eq!(stats.errors.timeout, 1);
    assert_eq!(stats.errors.remote.bad_request, 2);
    assert_eq!(stats.errors.total(), 4);
    assert_eq!((stats.late_replies, stats.stray_replies), (1, 0));
    assert_eq!((stats.retries, stats.reconnections), (0, 0));
    assert_eq!(stats.latency.count, 8, "a latency for each reply");
    assert!(stats.latency.p50 > Duration::ZERO && stats.latency.p99 <= stats.latency.max);

    let served = server.stats();
    assert_eq!(served.queues.len(), 1);
    let counts = &served.queues[0];
    assert_eq!(counts.queue, queue);
    assert_eq!(counts.requests, 9, "{counts:?}");
    assert_eq!(counts.replies.ok, 7, "6 good and the late one");
    assert_eq!(counts.replies.errors.bad_request, 2);
    assert_eq!(counts.replies.errors.total(), 2);
    assert_eq!(counts.handler_time.count, 9);
    // Held from just after the call began until just after its 300 ms timeout.
    assert!(
        counts.handler_time.max >= Duration::from_millis(250),
        "the held request: {:?}",
        counts.handler_time
    );
    assert_eq!((counts.redeliveries, counts.skipped_past_deadline), (0, 0));
    assert_eq!(counts.workers_busy, 0);
    assert_eq!(served.reconnections, 0);
    assert!(served.health.is_serving(), "{:?}", served.health);
    server.shutdown().unwrap();
}

/// The samples of `/metrics` at `address`, as Python's prometheus_client parser reads them.
fn parsed_metrics(address: SocketAddr) -> serde_json::Map<String, serde_json::Value> {
    let output = Command::new(python_with_prometheus_client())
        .args([
            &pika_script("parse_metrics.py"),
            &format!("http://{address}/metrics"),
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "not valid Prometheus text: {stderr}"
    );
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn the_metrics_endpoint_is_valid_prometheus_text_that_counts_the_calls_and_goes_with_the_server() {
    let queue = unique_queue("metrics");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(false));
    let (_client, server) = known_mix(&queue, &released);
    let address = server.metrics_addr().expect("an endpoint was asked for");

    let samples = parsed_metrics(address);
    let sample = |name: &str, labels: &str| {
        samples
            .get(&format!("{name}{{{labels}}}"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in {samples:#?}"))
    };
    let q = format!("queue=\"{queue}\"");
    assert_eq!(sample("amqp_rpc_server_requests_total", &q), 9.0);
    let reply = |outcome: &str| {
        sample(
            "amqp_rpc_server_replies_total",
            &format!("outcome=\"{outcome}\",{q}"),
        )
    };
    assert_eq!(reply("ok"), 7.0);
    assert_eq!(reply("bad-request"), 2.0);
    assert_eq!(reply("handler-failed"), 0.0);
    assert_eq!(sample("amqp_rpc_server_handler_seconds_count", &q), 9.0);
    assert_eq!(
        sample(
            "amqp_rpc_server_handler_seconds_bucket",
            &format!("le=\"+Inf\",{q}")
        ),
        9.0
    );
    assert!(sample("amqp_rpc_server_handler_seconds_sum", &q) >= 0.3);
    assert_eq!(sample("amqp_rpc_server_up", ""), 1.0);
    assert_eq!(sample("amqp_rpc_server_state", "state=\"serving\""), 1.0);
    assert_eq!(sample("amqp_rpc_server_reconnections_total", ""), 0.0);
    assert_eq!(sample("amqp_rpc_server_workers_busy", &q), 0.0);
    assert_eq!(
        http_get(address, "/health"),
        Some((200, "serving\n".into()))
    );
    assert_eq!(
        http_get(address, "/nothing").map(|(status, _)| status),
        Some(404)
    );

    server.shutdown().unwrap();
    assert_eq!(http_get(address, "/metrics"), None, "the endpoint is gone");
}

#[test]
fn health_follows_a_lost_connection_and_its_recovery() {
    let queue = unique_queue("health");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(true));
    let proxy = FaultProxy::start(&require_broker());
    let server = observed_server(&proxy.url(), &queue, &released);
    let address = server.metrics_addr().unwrap();
    assert!(server.health().is_serving());

    // Silence: missed heartbeats end the connection, and new ones hang in their handshake.
    proxy.freeze();
    wait_until("the server reconnects", || {
        matches!(server.health(), Health::Reconnecting { .. })
    });
    let Health::Reconnecting { reason, .. } = server.health() else {
        unreachable!()
    };
    assert!(!reason.is_empty());
    let (status, body) = http_get(address, "/health").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("reconnecting: "), "{body}");

    proxy.thaw();
    wait_until("the server serves again", || server.health().is_serving());
    assert_eq!(http_get(address, "/health").unwrap().0, 200);
    assert_eq!(server.stats().reconnections, 1);
    server.shutdown().unwrap();
}

#[test]
fn a_traceparent_from_pika_reaches_the_handler_and_comes_back_on_the_reply() {
    let python = python_with_pika();
    let queue = unique_queue("trace");
    let _guard = QueueGuard(queue.clone());
    let seen = Arc::new(Mutex::new(None));
    let record = Arc::clone(&seen);
    let server = common::start_server(&queue, 1, move |request: &Request| {
        *record.lock().unwrap() = Some((
            request.traceparent().map(str::to_string),
            request.tracestate().map(str::to_string),
            request.trace_id().map(str::to_string),
        ));
        fib::serve(request, 1000)
    });
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let output = pika_peer(&python, "call_with_trace.py", &queue)
        .args([traceparent, "vendor=opaque"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let reply: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(reply["body"], "55");
    assert_eq!(reply["headers"]["traceparent"], traceparent);
    assert_eq!(reply["headers"]["tracestate"], "vendor=opaque");
    assert_eq!(
        seen.lock().unwrap().clone().unwrap(),
        (
            Some(traceparent.to_string()),
            Some("vendor=opaque".to_string()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_string())
        )
    );
    server.shutdown().unwrap();
}

#[test]
fn the_server_binary_logs_the_trace_id_and_serves_metrics_when_asked() {
    let python = python_with_pika();
    let queue = unique_queue("trace-log");
    let _guard = QueueGuard(queue.clone());
    let log_path = std::env::temp_dir().join(format!("{queue}.log"));
    let mut command = our_server(&queue);
    command
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "amqp_rpc=debug")
        .stderr(std::fs::File::create(&log_path).unwrap());
    // The metrics line comes first; wait for the last start-up line.
    let mut server = spawn_until_ready(command, "Awaiting RPC requests");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let output = pika_peer(&python, "call_with_trace.py", &queue)
        .args([traceparent, ""])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output).1);
    send_signal(&server.0, "TERM");
    assert!(server.0.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        log.lines().any(|line| line.contains("DEBUG")
            && line.contains("trace 0af7651916cd43dd8448eb211c80319c")),
        "the request's debug line carries the trace id:\n{log}"
    );
}

/// The threads of process `pid`, as Linux counts them.
fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("a Threads line")
}

#[test]
fn connections_held_half_open_cost_the_endpoint_no_thread_and_block_no_scraper() {
    use std::io::{Read, Write};
    const HELD: usize = 1000;
    let queue = unique_queue("held-open");
    let _guard = QueueGuard(queue.clone());
    let mut command = our_server(&queue);
    command.args(["--metrics-addr", "127.0.0.1:0"]);
    let (server, printed) = common::process::spawn_and_read_until(command, "Awaiting RPC requests");
    let address: SocketAddr = printed
        .iter()
        .find_map(|line| line.split("http://").nth(1)?.strip_suffix("/metrics"))
        .expect("the server prints where its metrics are")
        .parse()
        .unwrap();
    let pid = server.0.id();
    // The binary starts its signal thread once it has said it awaits requests: a call answered
    // is long after that.
    let client = common::client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.fib(10).unwrap().to_string(), "55");
    let threads = threads_of(pid);

    // Strangers, each having sent half a request.
    let held: Vec<std::net::TcpStream> = (0..HELD)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream.write_all(b"GET /metr").unwrap();
            stream
        })
        .collect();
    // Connections are taken in order: answering this one, the server has taken them all.
    let (status, body) = http_get(address, "/health").expect("/health answers");
    assert_eq!((status, body.as_str()), (200, "serving\n"));
    let (status, metrics) = http_get(address, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(metrics.contains("amqp_rpc_server_up 1"), "{metrics}");
    assert!(
        threads_of(pid) <= threads,
        "{} threads with {HELD} connections held, {threads} before",
        threads_of(pid)
    );
    assert_eq!(
        client.fib(10).unwrap().to_string(),
        "55",
        "calls are answered"
    );
    drop(held);

    // A connection that sends nothing is closed once its time is up.
    let mut silent = std::net::TcpStream::connect(address).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let opened = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = silent.read(&mut byte);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "closed, not timed out on our side: {read:?}"
    );
    assert!(
        opened.elapsed() >= Duration::from_secs(4),
        "closed for its silence, after the server's 5 s: {:?}",
        opened.elapsed()
    );
}
