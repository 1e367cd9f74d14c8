//! Lost connections: cut by the network (a fault-injecting proxy), closed by the broker
//! (`rabbitmqctl close_connection`, only ever for the test's own connections), or gone silent,
//! also right after the handshake. Calls fail promptly and the next call works; servers
//! reconnect and serve again.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{
    Client, ClientOptions, Error, HandlerError, QueueOptions, Request, Server, ServerOptions, fib,
};
use common::proxy::{FaultProxy, assert_failed_to_connect_in_time};
use common::{
    QueueGuard, broker_closes_connection, client_at, client_for, require_broker,
    start_holding_server, start_server, unique_queue,
};

/// Answers `n` with fib(n), but takes two seconds over the request `slow`.
fn slow_or_fib(request: &Request) -> Result<Vec<u8>, HandlerError> {
    if request.body() == b"slow" {
        thread::sleep(Duration::from_secs(2));
        return Ok(b"slow".to_vec());
    }
    fib::handle_request(request.body(), 1000)
}

/// Makes a call with a 20 s timeout while `break_it` breaks its connection, once the server
/// has begun the request (`slow_begun`), and checks that it fails promptly with a lost
/// connection.
fn assert_call_fails_promptly(
    client: &mut Client,
    slow_begun: mpsc::Receiver<()>,
    break_it: impl FnOnce() + Send,
) {
    thread::scope(|scope| {
        scope.spawn(move || {
            slow_begun
                .recv_timeout(Duration::from_secs(10))
                .expect("the server begins the slow request");
            break_it();
        });
        let started = Instant::now();
        let error = client
            .call_with_timeout(b"slow", Duration::from_secs(20))
            .unwrap_err();
        let waited = started.elapsed();
        assert!(error.is_connection_lost(), "{error:?}");
        assert!(
            waited < Duration::from_secs(10),
            "noticed only after {waited:?}"
        );
    });
}

#[test]
fn a_cut_connection_fails_the_waiting_call_and_the_next_call_reconnects() {
    let queue = unique_queue("client-cut");
    let _guard = QueueGuard(queue.clone());
    let (server, slow_begun, release) = start_holding_server(&queue);
    let proxy = FaultProxy::start(&require_broker());
    let mut client = client_at(&proxy.url(), &queue, Duration::from_secs(10));
    assert_eq!(client.call(b"30").unwrap(), b"832040");

    assert_call_fails_promptly(&mut client, slow_begun, || proxy.cut_all());
    assert_eq!(client.call(b"30").unwrap(), b"832040");
    assert_eq!(proxy.connections(), 2, "the second call connected again");
    drop(release);
    server.shutdown().unwrap();
}

#[test]
fn a_connection_the_broker_closes_fails_the_waiting_call_and_the_next_call_reconnects() {
    let queue = unique_queue("client-closed");
    let _guard = QueueGuard(queue.clone());
    let (server, slow_begun, release) = start_holding_server(&queue);
    let proxy = FaultProxy::start(&require_broker());
    let mut client = client_at(&proxy.url(), &queue, Duration::from_secs(10));
    let names = proxy.broker_connection_names();
    assert_eq!(names.len(), 1);

    assert_call_fails_promptly(&mut client, slow_begun, || {
        broker_closes_connection(&names[0]);
    });
    assert_eq!(client.call(b"10").unwrap(), b"55");
    drop(release);
    server.shutdown().unwrap();
}

#[test]
fn a_silent_broker_is_noticed_by_heartbeats() {
    let queue = unique_queue("silent");
    let _guard = QueueGuard(queue.clone());
    let (server, slow_begun, release) = start_holding_server(&queue);
    let proxy = FaultProxy::start(&require_broker());
    let mut options = ClientOptions {
        queue: queue.clone(),
        ..ClientOptions::default()
    };
    options.connect.heartbeat = 1;
    let mut client = Client::with_options(&proxy.url(), options).unwrap();

    // No byte crosses any more, and nothing closes: only missed heartbeats can tell.
    assert_call_fails_promptly(&mut client, slow_begun, || proxy.freeze());
    drop(release);
    server.shutdown().unwrap();
}

/// Calls until a call succeeds or `within` passes; returns whether one did.
fn eventually_answers(client: &mut Client, within: Duration) -> bool {
    let give_up = Instant::now() + within;
    while Instant::now() < give_up {
        match client.call_with_timeout(b"10", Duration::from_secs(1)) {
            Ok(reply) => return reply == b"55",
            Err(Error::Timeout { .. } | Error::NoRoute { .. } | Error::NoServer { .. }) => {}
            Err(other) => panic!("unexpected error while the server reconnects: {other:?}"),
        }
    }
    false
}

/// Starts a server (heartbeat 1 s) whose connection goes through a proxy, checks that it
/// serves, breaks its connection with `break_it`, and checks that it serves again. Returns how
/// many connections the server made through the proxy.
fn assert_server_recovers(purpose: &str, break_it: impl FnOnce(&FaultProxy)) -> usize {
    let queue = unique_queue(purpose);
    let _guard = QueueGuard(queue.clone());
    let proxy = FaultProxy::start(&require_broker());
    let mut options = ServerOptions::default();
    options.connect.heartbeat = 1;
    let server = Server::builder(&proxy.url())
        .options(options)
        .serve(&queue, QueueOptions::with_workers(2), slow_or_fib)
        .start()
        .unwrap();
    let mut client = client_for(&queue, Duration::from_secs(5));
    assert_eq!(client.call(b"10").unwrap(), b"55");

    break_it(&proxy);
    assert!(eventually_answers(&mut client, Duration::from_secs(20)));
    server.shutdown().unwrap();
    proxy.connections()
}

#[test]
fn a_server_whose_connection_is_cut_reconnects_and_serves_again() {
    let connections = assert_server_recovers("server-cut", FaultProxy::cut_all);
    assert_eq!(connections, 2, "the server connected again, once");
}

#[test]
fn a_server_whose_connection_the_broker_closes_reconnects_and_serves_again() {
    let connections = assert_server_recovers("server-closed", |proxy| {
        for name in proxy.broker_connection_names() {
            broker_closes_connection(&name);
        }
    });
    assert_eq!(connections, 2, "the server connected again, once");
}

#[test]
fn a_server_whose_broker_goes_silent_notices_by_heartbeats_and_reconnects() {
    // Silence without a close: only missed heartbeats can tell.
    let connections = assert_server_recovers("server-silent", |proxy| {
        proxy.freeze();
        thread::sleep(Duration::from_secs(4));
        proxy.thaw();
    });
    // Attempts made while the proxy was frozen count too.
    assert!(connections >= 2, "the server connected again");
}

#[test]
fn shutdown_lets_the_request_in_flight_finish_and_stops_consuming() {
    let queue = unique_queue("graceful");
    let _guard = QueueGuard(queue.clone());
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let server = start_server(&queue, 2, move |request: &Request| {
        counter.fetch_add(1, Ordering::SeqCst);
        slow_or_fib(request)
    });
    let in_flight = {
        let queue = queue.clone();
        thread::spawn(move || client_for(&queue, Duration::from_secs(10)).call(b"slow"))
    };
    while handled.load(Ordering::SeqCst) == 0 {
        thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    server.shutdown().unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "did not wait for the request"
    );
    assert_eq!(in_flight.join().unwrap().unwrap(), b"slow");

    // Nobody consumes any more: a new request waits in the queue until it times out.
    let client = client_for(&queue, Duration::from_secs(10));
    let error = client
        .call_with_timeout(b"10", Duration::from_millis(300))
        .unwrap_err();
    assert!(error.is_timeout(), "{error:?}");
}

#[test]
fn a_broker_that_stops_answering_after_the_handshake_fails_the_connect_in_time() {
    let proxy = FaultProxy::start(&require_broker());
    proxy.go_silent_after_handshakes();
    let mut options = ClientOptions {
        queue: unique_queue("silent-setup"),
        ..ClientOptions::default()
    };
    options.connect.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    // Before, the connect waited for the answer to its channel.open until the heartbeats ran
    // out (20 s), and failed as a lost connection.
    let error = Client::with_options(&proxy.url(), options).unwrap_err();
    assert_failed_to_connect_in_time(&error, started.elapsed(), "did not answer");
}

#[test]
fn a_call_that_reconnects_to_a_broker_that_stops_answering_after_the_handshake_ends_in_time() {
    let queue = unique_queue("silent-reconnect");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 1, slow_or_fib);
    let proxy = FaultProxy::start(&require_broker());
    let client = client_at(&proxy.url(), &queue, Duration::from_secs(10));
    assert_eq!(client.call(b"10").unwrap(), b"55");

    proxy.go_silent_after_handshakes();
    proxy.cut_all();
    // A call may still find the cut connection, and fail as lost; the next connects again.
    // Before, that one waited for the answer to its channel.open until the heartbeats ran out
    // (20 s), whatever its timeout.
    let mut outcomes = (0..2).map(|_| {
        let started = Instant::now();
        let error = client
            .call_with_timeout(b"10", Duration::from_secs(2))
            .unwrap_err();
        (error, started.elapsed())
    });
    let (error, waited) = outcomes
        .find(|(error, _)| !error.is_connection_lost())
        .expect("a call after the lost one connects again");
    assert_failed_to_connect_in_time(&error, waited, "did not answer");
    server.shutdown().unwrap();
}

#[test]
fn a_server_whose_broker_stops_answering_after_the_handshake_fails_to_start_in_time() {
    // Never declared: the server waits for its channel before it declares.
    let queue = unique_queue("silent-server-setup");
    let proxy = FaultProxy::start(&require_broker());
    proxy.go_silent_after_handshakes();
    let mut options = ServerOptions::default();
    options.connect.connect_timeout = Duration::from_secs(2);
    let started = Instant::now();
    // Before, the server waited for the answer to its first channel.open until the heartbeats
    // ran out (20 s).
    let error = Server::builder(&proxy.url())
        .options(options)
        .serve(&queue, QueueOptions::with_workers(2), slow_or_fib)
        .start()
        .unwrap_err();
    assert_failed_to_connect_in_time(&error, started.elapsed(), "did not answer");
}
