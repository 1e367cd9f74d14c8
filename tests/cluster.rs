//! Scaling out on a real 3-node RabbitMQ cluster started on this machine by
//! `scripts/cluster up` (nodes rabbit-c1..c3@localhost on 127.0.0.1:5681..5683; `scripts/test`
//! starts it). Servers on different nodes share the load, and a client under load rides out
//! the loss of its node: with retry nothing fails, without retry only the calls in flight do.
//!
//! These tests stop and start nodes of that cluster, so they run one at a time (a lock), and
//! never touch the machine's default broker.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{
    Client, ClientOptions, ConnectOptions, HandlerError, QueueOptions, QueueType, Request, Server,
    ServerOptions, TlsOptions, fib,
};
use common::proxy::{FaultProxy, assert_failed_to_connect_in_time};
use common::unique_queue;

const NODES: [(&str, u16); 3] = [("c1", 5681), ("c2", 5682), ("c3", 5683)];

/// Cluster tests stop nodes: one at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn cluster_lock() -> MutexGuard<'static, ()> {
    CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn url(node: usize) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", NODES[node].1)
}

/// All three nodes' URLs, starting with `first`.
fn urls_from(first: usize) -> String {
    (0..3)
        .map(|i| url((first + i) % 3))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `rabbitmqctl` against one node of the test cluster.
fn rabbitmqctl_on(node: usize, args: &[&str]) -> String {
    common::rabbitmqctl(&[&["-q", "-n", &node_name(node)], args].concat())
}

/// The Erlang node name of one node of the test cluster, as `rabbitmqctl -n` takes it.
fn node_name(node: usize) -> String {
    format!("rabbit-{}@localhost", NODES[node].0)
}

/// One node of the test cluster, its app stopped while this lives and started again when it is
/// dropped, by a failing test too: a test that fails while a node is down must not take the
/// node from the tests after it.
struct StoppedNode(usize);

impl StoppedNode {
    fn stop(node: usize) -> StoppedNode {
        rabbitmqctl_on(node, &["stop_app"]);
        StoppedNode(node)
    }
}

impl Drop for StoppedNode {
    fn drop(&mut self) {
        let name = node_name(self.0);
        // Not `rabbitmqctl_on`: a panic here, while a failing test unwinds, would abort.
        let started = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &name, "start_app"])
            .status();
        if !started.as_ref().is_ok_and(|status| status.success()) {
            eprintln!("could not start node {name} again: {started:?}");
        }
    }
}

/// Fails, saying how to start it, unless every node of the test cluster accepts connections.
fn require_cluster() {
    for (name, port) in NODES {
        let reachable = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        assert!(
            reachable,
            "cluster node {name} is not listening on 127.0.0.1:{port}: start the test cluster with \
             `scripts/cluster up` (scripts/test does it)"
        );
    }
}

/// Deletes the queue through node c1 when dropped.
struct ClusterQueue(String);

impl Drop for ClusterQueue {
    fn drop(&mut self) {
        if let Ok(mut connection) = amiquip::Connection::insecure_open(&url(0))
            && let Ok(channel) = connection.open_channel(None)
        {
            let _ = channel.queue_delete(self.0.as_str(), Default::default());
            let _ = connection.close();
        }
    }
}

fn quorum_server(urls: &str, queue: &str, served: Arc<AtomicUsize>) -> Server {
    let options = QueueOptions {
        workers: 4,
        queue_type: QueueType::Quorum,
        ..QueueOptions::default()
    };
    Server::builder(urls)
        .serve(queue, options, move |request: &Request| {
            served.fetch_add(1, Ordering::SeqCst);
            fib::handle_request(request.body(), 10_000)
        })
        .start()
        .expect("start a server on the cluster")
}

/// A classic-queue Fibonacci server of `queue` on the broker at `url`.
fn classic_server(url: &str, queue: &str, options: ServerOptions) -> Server {
    Server::builder(url)
        .options(options)
        .serve(queue, QueueOptions::with_workers(2), |request: &Request| {
            fib::handle_request(request.body(), 1000)
        })
        .start()
        .unwrap()
}

/// What `client --bench` reported.
#[derive(Debug)]
struct BenchReport {
    errors: usize,
    connection_errors: usize,
    mismatched: usize,
}

/// Runs `client --bench` against `queue` on the brokers `urls`: `calls` calls of fib(300) from
/// 4 threads with 2 calls in flight each, every answer checked.
fn bench(urls: &str, queue: &str, calls: usize, extra: &[&str]) -> BenchReport {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", urls, "--queue", queue, "--bench", "--calls"])
        .arg(calls.to_string())
        .args(["--threads", "4", "--inflight", "2"])
        .args(extra)
        .arg("300")
        .output()
        .expect("run the client binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figure = |name: &str| -> u64 {
        stdout
            .split_whitespace()
            .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
            .parse()
            .unwrap()
    };
    BenchReport {
        errors: figure("errors") as usize,
        connection_errors: figure("connection_errors") as usize,
        mismatched: figure("mismatched") as usize,
    }
}

#[test]
fn servers_on_different_nodes_share_the_load() {
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-share");
    let _guard = ClusterQueue(queue.clone());
    let (on_c1, on_c2) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let first = quorum_server(&url(0), &queue, Arc::clone(&on_c1));
    let second = quorum_server(&url(1), &queue, Arc::clone(&on_c2));

    let report = bench(&url(2), &queue, 2000, &[]);
    assert_eq!(report.errors, 0, "{report:?}");
    let (c1, c2) = (on_c1.load(Ordering::SeqCst), on_c2.load(Ordering::SeqCst));
    assert_eq!(c1 + c2, 2000);
    assert!(
        c1 >= 400 && c2 >= 400,
        "unfair split: {c1} on c1, {c2} on c2"
    );
    first.shutdown().unwrap();
    second.shutdown().unwrap();
}

#[test]
fn a_server_rides_out_a_restart_of_its_only_broker_and_declares_its_queue_again() {
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-restart");
    let _guard = ClusterQueue(queue.clone());
    // A classic, non-durable queue, as the tutorial declares it: the restart deletes it.
    let options = ServerOptions {
        max_reconnect_delay: Duration::from_secs(1),
        ..ServerOptions::default()
    };
    let server = classic_server(&url(0), &queue, options);
    let client_options = ClientOptions {
        queue: queue.clone(),
        timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = amqp_rpc::Client::with_options(&url(1), client_options).unwrap();
    assert_eq!(client.call(b"10").unwrap(), b"55");

    let stopped = StoppedNode::stop(0);
    // The queue lived on c1: while c1 is down, nobody has declared it, once c2 has deleted
    // it (c2 does so when it sees c1 go, a moment after c1 has stopped).
    common::wait_until("c2 forgets the queue that lived on c1", || {
        !rabbitmqctl_on(1, &["list_queues", "name", "--no-table-headers"])
            .lines()
            .any(|name| name.trim() == queue)
    });
    let outcome = client.call(b"10");
    assert!(
        matches!(outcome, Err(amqp_rpc::Error::NoRoute { .. })),
        "{outcome:?}"
    );
    drop(stopped);

    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let answered = loop {
        match client.call(b"10") {
            Ok(reply) => break reply,
            Err(error) => {
                assert!(
                    std::time::Instant::now() < give_up,
                    "never served again: {error}"
                );
                thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert_eq!(answered, b"55");
    server.shutdown().unwrap();
}

/// Runs a bench from a client connected first to node c1 while c1 is stopped and started
/// again; the servers start on c2 and c3.
fn bench_through_the_loss_of_c1(retry: bool) -> BenchReport {
    require_cluster();
    let queue = unique_queue("cluster-loss");
    let _guard = ClusterQueue(queue.clone());
    let served = Arc::new(AtomicUsize::new(0));
    let first = quorum_server(&urls_from(1), &queue, Arc::clone(&served));
    let second = quorum_server(&urls_from(2), &queue, Arc::clone(&served));
    let load = {
        let queue = queue.clone();
        let extra: &[&str] = if retry {
            &["--timeout", "30", "--retry"]
        } else {
            &["--timeout", "30"]
        };
        thread::spawn(move || bench(&urls_from(0), &queue, 10_000, extra))
    };
    let served_now = || served.load(Ordering::SeqCst);
    common::wait_until("the load is served", || served_now() >= 500);
    let stopped = StoppedNode::stop(0);
    // More than the 8 calls that were in flight on c1's connection: the client has moved to
    // another node.
    let at_loss = served_now();
    common::wait_until("the load is served again after the loss of c1", || {
        served_now() >= at_loss + 500
    });
    let ran_through_the_loss = !load.is_finished();
    drop(stopped);
    let report = load.join().unwrap();
    first.shutdown().unwrap();
    second.shutdown().unwrap();
    eprintln!("retry={retry}: {report:?}");
    assert!(
        ran_through_the_loss,
        "the load ended before the node was back: {report:?}"
    );
    report
}

#[test]
fn with_retry_every_call_is_answered_through_a_node_loss() {
    let _lock = cluster_lock();
    let report = bench_through_the_loss_of_c1(true);
    assert_eq!(report.mismatched, 0, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
}

#[test]
fn without_retry_only_the_calls_in_flight_on_the_lost_connection_fail() {
    let _lock = cluster_lock();
    let report = bench_through_the_loss_of_c1(false);
    assert_eq!(report.mismatched, 0, "{report:?}");
    assert!(report.errors > 0, "the node loss cost nothing? {report:?}");
    assert_eq!(report.errors, report.connection_errors, "{report:?}");
    // 4 threads with 2 calls in flight each, all on the one connection that was lost.
    assert!(
        report.errors <= 8,
        "more than the calls in flight failed: {report:?}"
    );
}

#[test]
fn amqps_works_with_a_trusted_certificate_and_fails_clearly_without() {
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-tls");
    let _guard = ClusterQueue(queue.clone());
    let ca = format!(
        "{}/tls/ca.pem",
        std::env::var("CLUSTER_DIR").unwrap_or_else(|_| "/tmp/amqp-rpc-cluster".into())
    );
    assert!(
        std::path::Path::new(&ca).exists(),
        "no test CA at {ca}: scripts/cluster up makes it"
    );
    let server = classic_server(&url(0), &queue, ServerOptions::default());

    let client = |trust: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_client"));
        command.args([
            "--url",
            "amqps://guest:guest@localhost:5691/%2f",
            "--queue",
            &queue,
            "30",
        ]);
        if let Some(ca) = trust {
            command.env("SSL_CERT_FILE", ca);
        }
        command.output().unwrap()
    };
    let trusted = client(Some(&ca));
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert!(String::from_utf8_lossy(&trusted.stdout).contains(" [.] Got 832040"));

    let untrusted = client(None);
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success());
    assert!(
        stderr.starts_with("error: TLS handshake with amqps://guest@localhost:5691 failed")
            && stderr.contains("certificate verify failed"),
        "{stderr}"
    );
    server.shutdown().unwrap();
}

/// The largest message the test cluster's nodes accept (`scripts/cluster` sets it).
const MAX_MESSAGE_SIZE: usize = 1024 * 1024;

#[test]
fn a_request_too_large_for_the_broker_is_refused_not_a_lost_connection_and_not_retried() {
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-large-request");
    let _guard = ClusterQueue(queue.clone());
    let server = classic_server(&url(1), &queue, ServerOptions::default());
    for retry in [false, true] {
        let client = amqp_rpc::Client::with_options(
            &url(1),
            ClientOptions {
                queue: queue.clone(),
                retry,
                timeout: Duration::from_secs(20),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let started = std::time::Instant::now();
        let error = client.call(&vec![b'1'; MAX_MESSAGE_SIZE + 1]).unwrap_err();
        assert!(
            matches!(&error, amqp_rpc::Error::Refused { code: 406, .. }),
            "retry={retry}: {error:?}"
        );
        assert!(!error.is_connection_lost() && !error.is_retryable());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "retry={retry}: refused only after {:?}",
            started.elapsed()
        );
        assert_eq!(client.call(b"10").unwrap(), b"55", "the next call works");
    }
    server.shutdown().unwrap();
}

#[test]
fn a_reply_too_large_for_the_broker_is_answered_with_an_error_and_never_loops() {
    let _lock = cluster_lock();
    require_cluster();
    let (queue, other) = (
        unique_queue("cluster-large-reply"),
        unique_queue("cluster-large-reply-other"),
    );
    let _guards = (ClusterQueue(queue.clone()), ClusterQueue(other.clone()));
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    // Through a proxy, to count the server's connections.
    let proxy = common::proxy::FaultProxy::start(&url(1));
    let server = Server::builder(&proxy.url())
        .serve(
            &queue,
            QueueOptions::with_workers(1),
            move |request: &Request| {
                if request.body() == b"huge" {
                    counter.fetch_add(1, Ordering::SeqCst);
                    return Ok(vec![b'x'; MAX_MESSAGE_SIZE + 1]);
                }
                fib::serve(request, 1000)
            },
        )
        .serve(
            &other,
            QueueOptions::with_workers(1),
            |request: &Request| fib::serve(request, 1000),
        )
        .start()
        .unwrap();
    let client_of = |queue: &str| {
        amqp_rpc::Client::with_options(
            &url(1),
            ClientOptions {
                queue: queue.to_string(),
                timeout: Duration::from_secs(20),
                ..ClientOptions::default()
            },
        )
        .unwrap()
    };
    let (client, other_client) = (client_of(&queue), client_of(&other));
    let error = client.call(b"huge").unwrap_err();
    assert_eq!(
        error.remote_kind(),
        Some(amqp_rpc::FailureKind::HandlerFailed),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("the broker refused the reply"),
        "{error}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // The worker that lost its channel was replaced on the same connection; the other
    // queue's worker went on serving.
    for n in 0..10 {
        assert_eq!(client.fib(n).unwrap(), fib::fib(n));
        assert_eq!(other_client.fib(n).unwrap(), fib::fib(n));
    }
    assert_eq!(proxy.connections(), 1, "the server kept its connection");
    server.shutdown().unwrap();
}

/// The test cluster's TLS files (scripts/cluster makes them).
fn tls_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::var("CLUSTER_DIR").unwrap_or_else(|_| "/tmp/amqp-rpc-cluster".into());
    let path = std::path::Path::new(&dir).join("tls").join(name);
    assert!(
        path.exists(),
        "no {}: scripts/cluster up makes it",
        path.display()
    );
    path
}

#[test]
fn tls_is_set_in_the_api_and_the_binaries_and_each_failure_says_which() {
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-tls-options");
    let _guard = ClusterQueue(queue.clone());
    // The server on node c2's plain listener; clients over TLS to c1 (server certificate only)
    // and to c2 (which demands a client certificate and accepts EXTERNAL).
    let server = classic_server(&url(1), &queue, ServerOptions::default());
    let client = |url: &str, flags: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_client"))
            .args(["--url", url, "--queue", &queue])
            .args(flags)
            .arg("30")
            // Nothing trusted by the environment: only what the flags say.
            .env_remove("SSL_CERT_FILE")
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ca, other_ca) = (tls_file("ca.pem"), tls_file("other-ca.pem"));
    let (cert, key) = (tls_file("client.pem"), tls_file("client.key"));
    let path = |file: &std::path::PathBuf| file.to_str().unwrap().to_string();
    let c1 = "amqps://guest:guest@localhost:5691/%2f";
    let c2 = "amqps://guest:guest@localhost:5692/%2f";

    let (ok, stdout, stderr) = client(c1, &["--tls-ca", &path(&ca)]);
    assert!(ok && stdout.contains(" [.] Got 832040"), "{stderr}");

    let (ok, _, stderr) = client(c1, &["--tls-ca", &path(&other_ca)]);
    assert!(!ok);
    assert!(
        stderr.starts_with("error: TLS handshake with amqps://guest@localhost:5691 failed: the broker's certificate is not signed by a trusted CA"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    let (ok, _, stderr) = client(c2, &["--tls-ca", &path(&ca)]);
    assert!(!ok);
    assert!(
        stderr.starts_with("error: TLS handshake with amqps://guest@localhost:5692 failed")
            && stderr.contains("client certificate"),
        "{stderr}"
    );

    let mutual = [
        "--tls-ca",
        &path(&ca),
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
    ];
    let (ok, stdout, stderr) = client(c2, &mutual);
    assert!(
        ok && stdout.contains(" [.] Got 832040"),
        "mutual TLS: {stderr}"
    );
    let external = [&mutual[..], &["--tls-external"]].concat();
    let (ok, stdout, stderr) = client("amqps://localhost:5692/%2f", &external);
    assert!(
        ok && stdout.contains(" [.] Got 832040"),
        "EXTERNAL: {stderr}"
    );

    // The same through the library's options.
    let options = ClientOptions {
        queue: queue.clone(),
        connect: amqp_rpc::ConnectOptions {
            tls: amqp_rpc::TlsOptions {
                ca_file: Some(ca.clone()),
                cert_file: Some(cert.clone()),
                key_file: Some(key.clone()),
                external_auth: true,
                external_user: None,
            },
            ..amqp_rpc::ConnectOptions::default()
        },
        ..ClientOptions::default()
    };
    let library = amqp_rpc::Client::with_options("amqps://localhost:5692/%2f", options).unwrap();
    assert_eq!(library.call(b"10").unwrap(), b"55");
    let missing = amqp_rpc::ClientOptions {
        connect: amqp_rpc::ConnectOptions {
            tls: amqp_rpc::TlsOptions {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..amqp_rpc::TlsOptions::default()
            },
            ..amqp_rpc::ConnectOptions::default()
        },
        ..ClientOptions::default()
    };
    let error = amqp_rpc::Client::with_options(c1, missing).unwrap_err();
    assert!(
        error.is_config() && error.to_string().contains("/nonexistent/ca.pem"),
        "{error}"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_broker_silent_while_it_confirms_the_external_user_fails_the_connect_in_time() {
    let _lock = cluster_lock();
    require_cluster();
    let proxy = FaultProxy::start("amqps://localhost:5692/%2f");
    // How many TLS records the broker sends until the connection is open: amiquip alone, with
    // the client certificate and EXTERNAL, through the proxy.
    proxy.forward_tls_records(usize::MAX);
    let read = |name: &str| std::fs::read(tls_file(name)).unwrap();
    let connector = native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&read("ca.pem")).unwrap())
        .identity(
            native_tls::Identity::from_pkcs8(&read("client.pem"), &read("client.key")).unwrap(),
        )
        .build()
        .unwrap();
    let proxy_port = url::Url::parse(&proxy.url()).unwrap().port().unwrap();
    let stream = std::net::TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    let opened = amiquip::Connection::open_tls_stream(
        connector,
        "127.0.0.1",
        mio::net::TcpStream::from_stream(stream).unwrap(),
        amiquip::ConnectionOptions::default().auth(amiquip::Auth::External),
        amiquip::ConnectionTuning::default(),
    )
    .unwrap();
    let handshakes = proxy.tls_records();
    opened.close().unwrap();

    // Past those, the broker goes silent: right when the client asks it to confirm the user.
    proxy.forward_tls_records(handshakes);
    let mut connect = external(Some(TLS_USER));
    connect.connect_timeout = Duration::from_secs(2);
    let options = ClientOptions {
        queue: unique_queue("cluster-tls-silent"),
        connect,
        ..ClientOptions::default()
    };
    let started = Instant::now();
    // Before, the confirmation waited for the answer to its channel.open until the heartbeats
    // ran out (20 s), and failed as a lost connection.
    let error = Client::with_options(&proxy.url(), options).unwrap_err();
    assert_failed_to_connect_in_time(
        &error,
        started.elapsed(),
        "confirming the client certificate's user",
    );
}

/// The user of the test cluster's client certificate (its CN; node c2 takes the user from it).
const TLS_USER: &str = "amqp-rpc-tls-client";

/// Connection settings for node c2's mutual TLS with EXTERNAL authentication.
fn external(user: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        tls: TlsOptions {
            ca_file: Some(tls_file("ca.pem")),
            cert_file: Some(tls_file("client.pem")),
            key_file: Some(tls_file("client.key")),
            external_auth: true,
            external_user: user.map(String::from),
        },
        ..ConnectOptions::default()
    }
}

#[test]
fn with_external_auth_the_confirmed_external_user_is_the_user_id_and_a_wrong_one_fails_at_connect()
{
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-tls-user");
    let _guard = ClusterQueue(queue.clone());
    let c2 = "amqps://localhost:5692/%2f";
    // The server authenticates by its certificate too, and answers with the caller's user.
    let server = Server::builder(c2)
        .options(ServerOptions {
            connect: external(Some(TLS_USER)),
            ..ServerOptions::default()
        })
        .serve(
            &queue,
            QueueOptions::with_workers(1),
            |request: &Request| {
                Ok::<_, HandlerError>(request.user_id().unwrap_or("no user_id").to_string())
            },
        )
        .start()
        .unwrap();
    let client_options = |user: Option<&str>, server_user: Option<&str>| ClientOptions {
        queue: queue.clone(),
        server_user: server_user.map(String::from),
        timeout: Duration::from_secs(5),
        connect: external(user),
        ..ClientOptions::default()
    };

    // The handler sees the client's user, and the client accepts the reply only because it
    // carries the server's user.
    let client = Client::with_options(c2, client_options(Some(TLS_USER), Some(TLS_USER))).unwrap();
    assert_eq!(client.call(b"who").unwrap(), TLS_USER.as_bytes());
    assert_eq!(client.stats().rejected_replies, 0);
    // Without external_user, requests carry no user_id.
    let anonymous = Client::with_options(c2, client_options(None, None)).unwrap();
    assert_eq!(anonymous.call(b"who").unwrap(), b"no user_id");

    // A wrong name fails at connect, with the broker's answer, which names the real user.
    let error = Client::with_options(c2, client_options(Some("someone-else"), None))
        .expect_err("the broker refuses a user_id that is not the connection's user");
    let text = error.to_string();
    assert!(
        error.is_config() && text.contains("'someone-else'") && text.contains(TLS_USER),
        "{text}"
    );
    // So does a server's, before it serves anything.
    let wrong_server = Server::builder(c2)
        .options(ServerOptions {
            connect: external(Some("someone-else")),
            ..ServerOptions::default()
        })
        .serve(&queue, QueueOptions::with_workers(1), |_: &Request| {
            Ok::<_, HandlerError>("never")
        })
        .start();
    let error = wrong_server.expect_err("a wrong external_user stops the server");
    assert!(error.is_config(), "{error}");
    // And the binary's, in one line.
    let path = |name: &str| tls_file(name).to_str().unwrap().to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", c2, "--queue", &queue, "--tls-ca", &path("ca.pem")])
        .args([
            "--tls-cert",
            &path("client.pem"),
            "--tls-key",
            &path("client.key"),
        ])
        .args(["--tls-external", "--tls-external-user", "someone-else"])
        .args(["--body", "who"])
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    // (amiquip itself logs the channel's close at warn, on a line of its own.)
    let errors: Vec<_> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert!(
        errors.len() == 1
            && errors[0].starts_with(
                "error: invalid configuration: TlsOptions::external_user is 'someone-else', but \
                 the broker at amqps://localhost:5692 authenticated"
            ),
        "{stderr}"
    );
    // external_user means nothing without EXTERNAL: refused rather than ignored.
    let mut plain = external(Some(TLS_USER));
    plain.tls.external_auth = false;
    let error = Client::with_options(
        "amqps://guest:guest@localhost:5691/%2f",
        ClientOptions {
            connect: plain,
            ..ClientOptions::default()
        },
    )
    .expect_err("external_user without external_auth is a configuration error");
    assert!(
        error.is_config() && error.to_string().contains("external_auth"),
        "{error}"
    );
    server.shutdown().unwrap();
}

#[test]
fn headers_nested_to_a_larger_frames_limit_are_refused_by_a_server_on_a_small_stack() {
    use common::raw_amqp::{
        Property, RawProperties, RawPublisher, Verdict, deepest_tables_within, headers_room,
        nested_tables,
    };
    let _cluster = cluster_lock();
    // Node c3 takes frames of 1 MiB (scripts/cluster).
    let node = url(2);
    let queue = unique_queue("large-frame");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_server"));
    command
        .args(["--url", &node, "--queue", &queue, "--workers", "1"])
        .env("RUST_LOG", "error")
        // An eighth of the default stack, for every thread: what amiquip parses nests at most
        // 32 deep, whatever the frame's size (tests/hostile.rs measures what that needs).
        .env("RUST_MIN_STACK", "262144");
    let _server = common::process::spawn_until_ready(command, "Awaiting RPC requests");
    let inbox = common::Inbox::at(&node);
    let mut publisher = RawPublisher::connect_to(&node);
    assert_eq!(publisher.frame_max, 1_048_576, "c3's frame_max");
    let others = (1 + 2) + (1 + inbox.name.len());
    let depth = deepest_tables_within(headers_room(publisher.frame_max, others));
    let properties = RawProperties::new()
        .headers(nested_tables(depth))
        .short(Property::CorrelationId, b"c3")
        .short(Property::ReplyTo, inbox.name.as_bytes());
    assert_eq!(
        publisher.publish(&queue, &properties.encode(), b"10"),
        Verdict::Confirmed
    );
    let reply = inbox.next_reply();
    let error = match reply
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.get("error"))
    {
        Some(amiquip::AmqpValue::LongString(error)) => error.clone(),
        other => panic!("{depth} levels: no error reply: {other:?}"),
    };
    assert!(error.contains("deeper than the 32 levels"), "{error}");
    let client = Client::with_options(
        &node,
        ClientOptions {
            queue: queue.clone(),
            ..ClientOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        client.fib(10).unwrap().to_string(),
        "55",
        "the server serves on"
    );
    let _ = rabbitmqctl_on(2, &["delete_queue", &queue]);
}

#[test]
fn tls_and_external_auth_set_up_from_the_url_alone() {
    let _lock = cluster_lock();
    require_cluster();
    let queue = unique_queue("cluster-url-tls");
    let _guard = ClusterQueue(queue.clone());
    let server = classic_server(&url(1), &queue, ServerOptions::default());
    let path = |name: &str| tls_file(name).to_str().unwrap().to_string();
    // Node c2 demands a client certificate; nothing but the URL says where the files are.
    let files = format!(
        "cacertfile={}&certfile={}&keyfile={}",
        path("ca.pem"),
        path("client.pem"),
        path("client.key")
    );
    let options = || ClientOptions {
        queue: queue.clone(),
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let plain = format!("amqps://guest:guest@localhost:5692/%2f?{files}&verify=verify_peer");
    let client = Client::with_options(&plain, options()).unwrap();
    assert_eq!(client.fib(30).unwrap().to_string(), "832040");
    let external = format!("amqps://localhost:5692/%2f?{files}&auth_mechanism=external");
    let client = Client::with_options(&external, options()).unwrap();
    assert_eq!(client.fib(30).unwrap().to_string(), "832040");
    // The name to check the certificate against, instead of the URL's host.
    let elsewhere = format!(
        "amqps://guest:guest@localhost:5692/%2f?{files}&server_name_indication=other.example"
    );
    let error = Client::with_options(&elsewhere, options()).unwrap_err();
    assert!(
        error.is_tls() && error.to_string().contains("another host"),
        "{error}"
    );
    server.shutdown().unwrap();
}
