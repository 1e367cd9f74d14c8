//! One client, every service: each call names its destination (a queue, or an exchange and a
//! routing key), and one client, with its one connection, channel and reply queue, calls any
//! number of services; servers bind their queues to exchanges. Every per-call guarantee holds
//! per destination: no route, no exchange, no server, the timeout's queue state.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use amqp_rpc::{
    Binding, Call, Client, ClientOptions, Destination, Error, QueueOptions, Request, Server, fib,
};
use common::process::{our_server, spawn_until_ready, text};
use common::proxy::FaultProxy;
use common::{
    QueueGuard, broker_closes_connection, channels_on, declare_queue, raw_connection,
    require_broker, unique_queue, wait_until,
};

/// Deletes an exchange when dropped, so tests leave nothing behind.
struct ExchangeGuard(String);

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        if let Ok(mut connection) = amiquip::Connection::insecure_open(&common::broker_url())
            && let Ok(channel) = connection.open_channel(None)
        {
            let _ = channel.exchange_delete(self.0.as_str(), false);
            let _ = connection.close();
        }
    }
}

/// Three services on one server: fib on queue `a`, upper-casing on queue `b`, and on queue
/// `c`, reached through the topic exchange `exchange` with keys `svc.*`, "c:" and the body.
fn three_services(url: &str, a: &str, b: &str, c: &str, exchange: &str) -> Server {
    let one = QueueOptions::with_workers(2);
    Server::builder(url)
        .serve(a, one.clone(), |request: &Request| {
            fib::handle_request(request.body(), 1000)
        })
        .serve(b, one.clone(), |request: &Request| {
            Ok(request.body().to_ascii_uppercase())
        })
        .serve(
            c,
            QueueOptions {
                bindings: vec![Binding::topic(exchange, "svc.*")],
                ..one
            },
            |request: &Request| Ok([b"c:".as_slice(), request.body()].concat()),
        )
        .start()
        .expect("start the server")
}

#[test]
fn one_client_of_32_threads_calls_three_services_over_one_connection_and_one_channel() {
    let (a, b, c) = (
        unique_queue("svc-a"),
        unique_queue("svc-b"),
        unique_queue("svc-c"),
    );
    let exchange = unique_queue("services");
    let _guards = [&a, &b, &c].map(|queue| QueueGuard(queue.clone()));
    let _exchange = ExchangeGuard(exchange.clone());
    let server = three_services(&require_broker(), &a, &b, &c, &exchange);
    let proxy = FaultProxy::start(&require_broker());
    // The client's default is none of them: every call names its destination.
    let client = Client::with_options(&proxy.url(), ClientOptions::default()).unwrap();

    let start = Arc::new(Barrier::new(32));
    let threads: Vec<_> = (0..32u64)
        .map(|thread| {
            let (client, start) = (client.clone(), Arc::clone(&start));
            let (a, b, exchange) = (a.clone(), b.clone(), exchange.clone());
            thread::spawn(move || {
                start.wait();
                for call in 0..10u64 {
                    let n = thread * 10 + call;
                    let body = n.to_string();
                    let fib_reply = client.send(&Call::new(body.clone()).to(a.as_str()));
                    assert_eq!(
                        fib_reply.unwrap().body(),
                        fib::fib(n).to_string().as_bytes()
                    );
                    let word = format!("thread{thread}-call{call}");
                    let upper = client.send(&Call::new(word.clone()).to(b.as_str()));
                    assert_eq!(upper.unwrap().body(), word.to_uppercase().as_bytes());
                    let routed = Destination::exchange(&exchange, format!("svc.{thread}"));
                    let through = client.send(&Call::new(body.clone()).to(routed));
                    assert_eq!(through.unwrap().body(), format!("c:{n}").as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a calling thread");
    }
    assert_eq!(client.stats().replies, 32 * 10 * 3);
    assert_eq!(proxy.connections(), 1, "one connection");
    let names = proxy.broker_connection_names();
    assert_eq!(channels_on(&names[0]), Some(1), "one channel");
    client.close().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn each_destination_fails_on_its_own_no_route_no_exchange_no_server_and_timeouts() {
    let (served, unserved) = (unique_queue("dest-served"), unique_queue("dest-unserved"));
    let (a, b) = (unique_queue("dest-a"), unique_queue("dest-b"));
    let exchange = unique_queue("dest-exchange");
    let _guards = [&served, &unserved, &a, &b].map(|queue| QueueGuard(queue.clone()));
    let _exchange = ExchangeGuard(exchange.clone());
    let server = three_services(&require_broker(), &served, &a, &b, &exchange);
    let mut connection = raw_connection();
    declare_queue(&connection.open_channel(None).unwrap(), &unserved);
    connection.close().unwrap();
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: served.clone(),
            timeout: Duration::from_secs(10),
            ..ClientOptions::default()
        },
    )
    .unwrap();

    // Nothing bound for the key: returned by the broker, at once.
    let unbound = Destination::exchange(&exchange, "other.key");
    let error = client
        .send(&Call::new("1").to(unbound.clone()))
        .unwrap_err();
    assert!(
        matches!(&error, Error::NoRoute { destination } if *destination == unbound),
        "{error:?}"
    );
    assert!(error.to_string().contains("no queue is bound"), "{error}");
    // No such exchange: refused before it is sent, the shared channel unharmed.
    let missing = unique_queue("no-such-exchange");
    let error = client
        .send(&Call::new("1").to(Destination::exchange(&missing, "k")))
        .unwrap_err();
    assert!(
        matches!(&error, Error::NoExchange { exchange } if *exchange == missing),
        "{error:?}"
    );
    assert!(error.is_no_route());
    // No server on one queue, while the default is served, in one batch.
    let calls = [
        Call::new("10"),
        Call::new("11").to(unserved.as_str()),
        Call::new("12"),
    ];
    let outcomes = client.send_many(&calls);
    assert_eq!(outcomes[0].as_ref().unwrap().body(), b"55");
    assert_eq!(outcomes[2].as_ref().unwrap().body(), b"144");
    assert!(
        matches!(&outcomes[1], Err(Error::NoServer { queue }) if *queue == unserved),
        "{:?}",
        outcomes[1]
    );
    // A timeout says what the broker knew of its own queue.
    let timed_out = Call::new("1")
        .to(unserved.as_str())
        .with_timeout(Duration::from_millis(500));
    match client.send(&timed_out).unwrap_err() {
        Error::Timeout {
            destination,
            state: Some(state),
            ..
        } => {
            assert_eq!(destination, Destination::queue(&unserved));
            assert_eq!(state.consumers, 0);
        }
        other => panic!("expected a timeout with the queue's state: {other:?}"),
    }
    assert_eq!(
        client.call(b"10").unwrap(),
        b"55",
        "and the client calls on"
    );
    assert_eq!(
        client.stats().reconnections,
        0,
        "no failure broke the session"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_server_declares_its_exchange_and_bindings_again_after_a_lost_connection() {
    let queue = unique_queue("rebind");
    let exchange = unique_queue("rebind-exchange");
    let _guard = QueueGuard(queue.clone());
    let _exchange = ExchangeGuard(exchange.clone());
    let proxy = FaultProxy::start(&require_broker());
    let server = Server::builder(&proxy.url())
        .serve(
            &queue,
            QueueOptions {
                bindings: vec![
                    Binding::topic(&exchange, "math.fib"),
                    Binding::topic(&exchange, "math.fibonacci"),
                ],
                ..QueueOptions::with_workers(1)
            },
            |request: &Request| fib::handle_request(request.body(), 1000),
        )
        .start()
        .unwrap();
    let client = Client::connect(&require_broker()).unwrap();
    let through = |key: &str| Call::new("10").to(Destination::exchange(&exchange, key));
    assert_eq!(client.send(&through("math.fib")).unwrap().body(), b"55");

    // The exchange goes (an operator's mistake), then the server's connection.
    let mut connection = raw_connection();
    connection
        .open_channel(None)
        .unwrap()
        .exchange_delete(exchange.as_str(), false)
        .unwrap();
    connection.close().unwrap();
    // The client knew the exchange: its request went, and the broker closed the channel for
    // it, failing the call with its reason. The next call connects again, and asks.
    let error = client.send(&through("math.fib")).unwrap_err();
    assert!(error.to_string().contains("no exchange"), "{error}");
    let error = client.send(&through("math.fib")).unwrap_err();
    assert!(matches!(error, Error::NoExchange { .. }), "{error:?}");
    broker_closes_connection(&proxy.broker_connection_names()[0]);
    wait_until("the server serves again", || {
        server.stats().reconnections == 1 && server.health().is_serving()
    });
    for key in ["math.fib", "math.fibonacci"] {
        assert_eq!(client.send(&through(key)).unwrap().body(), b"55", "{key}");
    }
    server.shutdown().unwrap();
}

#[test]
fn the_binaries_call_through_an_exchange_and_bench_several_queues() {
    let queue = unique_queue("bin-bind");
    let other = unique_queue("bin-other");
    let exchange = unique_queue("bin-exchange");
    let _guards = [&queue, &other].map(|queue| QueueGuard(queue.clone()));
    let _exchange = ExchangeGuard(exchange.clone());
    let server = |queue: &str, extra: &[&str]| {
        let mut command = our_server(queue);
        command.args(extra);
        spawn_until_ready(command, "Awaiting RPC requests")
    };
    let binding = format!("{exchange}:math.*");
    let _bound = server(&queue, &["--bind", &binding]);
    let _other = server(&other, &[]);
    let client = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_client"))
            .args(["--url", &require_broker()])
            .args(args)
            .output()
            .unwrap()
    };
    let output = client(&["--exchange", &exchange, "--routing-key", "math.fib", "30"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains(" [.] Got 832040"), "{stdout}");
    let output = client(&[
        "--exchange",
        &exchange,
        "--routing-key",
        "math.fib",
        "--body",
        "10",
    ]);
    assert_eq!(text(&output).0, "55");

    let output = client(&[
        "--queue",
        &queue,
        "--queue",
        &other,
        "--bench",
        "--calls",
        "400",
        "--threads",
        "4",
        "20",
    ]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let per_destination: HashSet<&str> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("destination=\"")?.split('"').next())
        .collect();
    assert_eq!(
        per_destination,
        HashSet::from([
            format!("queue '{queue}'").as_str(),
            format!("queue '{other}'").as_str()
        ]),
        "{stdout}"
    );
    for line in lines.iter().filter(|line| line.starts_with("destination=")) {
        assert!(line.contains(" calls=200 errors=0 "), "{line}");
    }
    assert!(
        lines.last().unwrap().starts_with("calls=400 errors=0 "),
        "the summary comes last: {stdout}"
    );
}
