//! The library against the real broker: round trips, reply filtering, timeouts, threads, workers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{Client, ClientOptions, Error, ReplyRoute, Request, fib};
use common::{
    QueueGuard, ReplyId, client_for, declare_queue, raw_connection, require_broker, scripted_peer,
    start_fib_server, start_server, unique_queue,
};

#[test]
fn round_trip_through_the_library() {
    let queue = unique_queue("roundtrip");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 2);
    let client = client_for(&queue, Duration::from_secs(10));

    assert_eq!(client.fib(30).unwrap().to_string(), "832040");
    assert_eq!(
        client.fib(100).unwrap().to_string(),
        "354224848179261915075"
    );
    assert_eq!(client.call(b"10").unwrap(), b"55");
    assert_eq!(client.fib(0).unwrap().to_string(), "0");

    client.close().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn a_reply_with_a_strangers_correlation_id_is_dropped() {
    let queue = unique_queue("stranger");
    let _guard = QueueGuard(queue.clone());
    // A server that answers as if to somebody else first, then truly.
    let peer = scripted_peer(
        &queue,
        vec![vec![
            (ReplyId::Other("somebody-else"), b"wrong"),
            (ReplyId::Own, b"right"),
        ]],
    );
    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"anything").unwrap(), b"right");
    peer.join().unwrap();
}

#[test]
fn without_a_server_the_call_times_out_close_to_its_timeout() {
    let queue = unique_queue("timeout");
    let _guard = QueueGuard(queue.clone());
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, &queue);

    let client = client_for(&queue, Duration::from_secs(10));
    let timeout = Duration::from_millis(700);
    let started = Instant::now();
    let error = client.call_with_timeout(b"30", timeout).unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&error, Error::Timeout { after, .. } if *after == timeout),
        "{error:?}"
    );
    assert!(error.is_timeout());
    assert!(waited >= timeout, "gave up early, after {waited:?}");
    assert!(
        waited < timeout + Duration::from_millis(500),
        "gave up late, after {waited:?}"
    );
    connection.close().unwrap();
}

#[test]
fn many_threads_each_get_their_own_answers() {
    let queue = unique_queue("threads");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 4);
    let threads: Vec<_> = (0..8u64)
        .map(|thread_index| {
            let queue = queue.clone();
            thread::spawn(move || {
                let client = client_for(&queue, Duration::from_secs(10));
                for call in 0..40u64 {
                    let n = thread_index * 100 + call;
                    assert_eq!(client.fib(n).unwrap(), fib::fib(n), "fib({n})");
                }
                client.close().unwrap();
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    server.shutdown().unwrap();
}

#[test]
fn workers_serve_in_parallel() {
    const WORKERS: usize = 4;
    const HANDLER_TIME: Duration = Duration::from_millis(400);
    let queue = unique_queue("parallel");
    let _guard = QueueGuard(queue.clone());
    let running = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let (now, most) = (Arc::clone(&running), Arc::clone(&most_running));
    let server = start_server(&queue, WORKERS, move |request: &Request| {
        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(at_once, Ordering::SeqCst);
        thread::sleep(HANDLER_TIME);
        now.fetch_sub(1, Ordering::SeqCst);
        Ok(request.body().to_vec())
    });

    // Every caller connects first, then all call at once; each times its own call.
    let connected = Arc::new(std::sync::Barrier::new(WORKERS));
    let callers: Vec<_> = (0..WORKERS)
        .map(|index| {
            let (queue, connected) = (queue.clone(), Arc::clone(&connected));
            thread::spawn(move || {
                let client = client_for(&queue, Duration::from_secs(10));
                connected.wait();
                let started = Instant::now();
                let body = index.to_string();
                assert_eq!(client.call(body.as_bytes()).unwrap(), body.as_bytes());
                started.elapsed()
            })
        })
        .collect();
    let slowest = callers
        .into_iter()
        .map(|caller| caller.join().unwrap())
        .max()
        .unwrap();
    assert_eq!(most_running.load(Ordering::SeqCst), WORKERS);
    // Sequential service would make the last call wait WORKERS handler times; parallel, one.
    assert!(
        slowest < HANDLER_TIME * 2,
        "the slowest of {WORKERS} simultaneous calls took {slowest:?}, over two handler times"
    );
    server.shutdown().unwrap();
}

#[test]
fn direct_reply_to_serves_single_and_batched_calls() {
    let queue = unique_queue("direct");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 2);
    let options = ClientOptions {
        queue: queue.clone(),
        reply_route: ReplyRoute::DirectReplyTo,
        ..ClientOptions::default()
    };
    let client = Client::with_options(&require_broker(), options).unwrap();
    assert_eq!(client.fib(30).unwrap().to_string(), "832040");
    let requests: Vec<Vec<u8>> = (0..20u64).map(|n| n.to_string().into_bytes()).collect();
    let borrowed: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    for (n, outcome) in client
        .call_many(&borrowed, Duration::from_secs(10))
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            outcome.unwrap(),
            fib::fib(n as u64).to_string().into_bytes()
        );
    }
    client.close().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn a_urls_query_parameters_reach_the_broker_and_a_misspelt_one_is_refused_by_name() {
    let queue = common::unique_queue("url-params");
    let _guard = common::QueueGuard(queue.clone());
    let server = common::start_fib_server(&queue, 1);
    let proxy = common::proxy::FaultProxy::start(&common::require_broker());
    let url = format!(
        "{}?heartbeat=7&channel_max=64",
        proxy.url().trim_end_matches('/')
    );
    let options = amqp_rpc::ClientOptions {
        queue: queue.clone(),
        ..amqp_rpc::ClientOptions::default()
    };
    let client = amqp_rpc::Client::with_options(&url, options.clone()).unwrap();
    assert_eq!(client.fib(10).unwrap().to_string(), "55");
    let name = proxy.broker_connection_names().remove(0);
    let listing = common::rabbitmqctl(&[
        "list_connections",
        "name",
        "timeout",
        "channel_max",
        "--no-table-headers",
        "-q",
    ]);
    let line = listing
        .lines()
        .find(|line| line.starts_with(&format!("{name}\t")))
        .unwrap_or_else(|| panic!("no connection {name}: {listing}"));
    let columns: Vec<&str> = line.split('\t').map(str::trim).collect();
    assert_eq!(
        columns[1..],
        ["7", "64"],
        "the heartbeat and channel_max asked for: {line}"
    );
    client.close().unwrap();

    let misspelt = format!("{}?hearbeat=7", proxy.url().trim_end_matches('/'));
    let error = amqp_rpc::Client::with_options(&misspelt, options).unwrap_err();
    assert!(error.is_config(), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("unknown query parameter 'hearbeat'"),
        "{error}"
    );
    server.shutdown().unwrap();
}
