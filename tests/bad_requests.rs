//! Bad requests, failing handlers and unanswerable messages: the server answers what it can,
//! never dies of a request, and never lets a request loop; the client fails fast and precisely.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, ConsumerMessage, ConsumerOptions, Publish};
use amqp_rpc::{Error, FailureKind, HandlerError, QueueOptions, QueueType, Request, Server, fib};
use common::{
    QueueGuard, ReplyId, client_for, declare_queue, queued_messages, raw_connection,
    ready_messages, scripted_peer, start_server, unique_queue, wait_until,
};

const MAX_N: u64 = 1000;

fn fib_handler(request: &Request) -> Result<Vec<u8>, HandlerError> {
    fib::handle_request(request.body(), MAX_N)
}

#[test]
fn malformed_requests_get_a_one_line_error_reply_and_the_server_goes_on() {
    let queue = unique_queue("malformed");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 2, fib_handler);
    let client = client_for(&queue, Duration::from_secs(10));

    let huge = vec![b'7'; 1_000_000];
    let past_max = (MAX_N + 1).to_string();
    let bad: [&[u8]; 11] = [
        b"abc",
        b"",
        b"-5",
        b"3.5",
        b"1e3",
        b"30abc",
        b"\xff\xfe\x00",
        b"18446744073709551616",
        past_max.as_bytes(),
        &huge,
        b"3 0",
    ];
    for body in bad {
        let shown = String::from_utf8_lossy(&body[..body.len().min(20)]).into_owned();
        match client.call(body) {
            Err(Error::Remote { message, kind }) => {
                assert_eq!(kind, Some(FailureKind::BadRequest), "{message}");
                assert!(
                    !message.is_empty() && !message.contains('\n'),
                    "{message:?}"
                );
            }
            other => panic!("request {shown:?}: expected an error reply, got {other:?}"),
        }
        // The same worker pool still answers good requests.
        assert_eq!(client.fib(30).unwrap().to_string(), "832040");
    }
    let error = client.call(past_max.as_bytes()).unwrap_err();
    assert!(error.is_remote());
    assert!(error.to_string().contains("limit of 1000"), "{error}");
    assert_eq!(ready_messages(&queue), 0, "every request was acked");
    server.shutdown().unwrap();
}

#[test]
fn surrounding_whitespace_is_ignored() {
    let queue = unique_queue("whitespace");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 1, fib_handler);
    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b" 30\n").unwrap(), b"832040");
    assert_eq!(client.call(b"\t10\r\n").unwrap(), b"55");
    assert!(client.call(b"1 0").unwrap_err().is_remote());
    server.shutdown().unwrap();
}

#[test]
fn a_panicking_handler_gets_an_error_reply_and_the_pool_keeps_its_size() {
    const WORKERS: usize = 2;
    let queue = unique_queue("panic");
    let _guard = QueueGuard(queue.clone());
    let running = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let (now, most) = (Arc::clone(&running), Arc::clone(&most_running));
    let server = start_server(&queue, WORKERS, move |request: &Request| {
        if request.body() == b"boom" {
            panic!("asked to fail");
        }
        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(at_once, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(300));
        now.fetch_sub(1, Ordering::SeqCst);
        Ok(request.body().to_vec())
    });

    let client = client_for(&queue, Duration::from_secs(10));
    for _ in 0..(WORKERS * 3) {
        let error = client.call(b"boom").unwrap_err();
        assert!(
            matches!(&error, Error::Remote { message, kind: Some(FailureKind::HandlerFailed) } if message.contains("panicked") && message.contains("asked to fail")),
            "{error:?}"
        );
    }
    // Every worker still serves: as many slow calls run at once as there are workers. The
    // calls start together, so that they overlap however slowly the threads start.
    let start = Arc::new(std::sync::Barrier::new(WORKERS));
    let callers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (queue, start) = (queue.clone(), Arc::clone(&start));
            thread::spawn(move || {
                let client = client_for(&queue, Duration::from_secs(10));
                start.wait();
                client.call(b"slow")
            })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.join().unwrap().unwrap(), b"slow");
    }
    assert_eq!(most_running.load(Ordering::SeqCst), WORKERS);
    server.shutdown().unwrap();
}

#[test]
fn a_request_without_reply_to_is_acked_and_never_requeued() {
    let queue = unique_queue("no-reply-to");
    let _guard = QueueGuard(queue.clone());
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    // One worker with qos(1): had the request been left unacked, nothing else would be served.
    let server = start_server(&queue, 1, move |request: &Request| {
        counter.fetch_add(1, Ordering::SeqCst);
        fib_handler(request)
    });

    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    channel
        .basic_publish("", Publish::new(b"30", queue.clone()))
        .unwrap();
    connection.close().unwrap();

    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"10").unwrap(), b"55");
    // A request put back in the queue would stay there, taken and put back again: an empty
    // queue, unacked requests included, shows that both were acked.
    wait_until("the queue empties: the request was not requeued", || {
        queued_messages(&queue) == 0
    });
    assert_eq!(
        handled.load(Ordering::SeqCst),
        1,
        "only the answerable request ran"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_call_to_a_queue_nobody_declared_fails_at_once_with_no_route() {
    let queue = unique_queue("no-route");
    let client = client_for(&queue, Duration::from_secs(10));
    let started = Instant::now();
    let error = client.call(b"30").unwrap_err();
    assert!(
        matches!(&error, Error::NoRoute { destination } if *destination == amqp_rpc::Destination::queue(&queue)),
        "{error:?}"
    );
    // Returned by the broker, not given up on after the call's 10 s timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The client is still usable afterwards.
    assert!(matches!(client.call(b"1"), Err(Error::NoRoute { .. })));
}

#[test]
fn a_request_nobody_served_in_time_expires_on_the_broker() {
    let queue = unique_queue("expiry");
    let _guard = QueueGuard(queue.clone());
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, &queue);
    connection.close().unwrap();

    let client = client_for(&queue, Duration::from_secs(10));
    let error = client
        .call_with_timeout(b"30", Duration::from_millis(300))
        .unwrap_err();
    assert!(error.is_timeout());
    wait_until("the broker drops the expired request", || {
        ready_messages(&queue) == 0
    });

    // A server that starts now never sees it.
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let server = start_server(&queue, 1, move |request: &Request| {
        counter.fetch_add(1, Ordering::SeqCst);
        fib_handler(request)
    });
    assert_eq!(client.call(b"10").unwrap(), b"55");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    server.shutdown().unwrap();
}

#[test]
fn a_duplicate_reply_is_ignored() {
    let queue = unique_queue("duplicate");
    let _guard = QueueGuard(queue.clone());
    // The first request is answered twice (as after a redelivery), the second once.
    let peer = scripted_peer(
        &queue,
        vec![
            vec![(ReplyId::Own, b"first"), (ReplyId::Own, b"first")],
            vec![(ReplyId::Own, b"second")],
        ],
    );
    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"1").unwrap(), b"first");
    assert_eq!(client.call(b"2").unwrap(), b"second");
    peer.join().unwrap();
}

#[test]
fn call_many_returns_each_outcome_in_request_order() {
    let queue = unique_queue("many");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 2, fib_handler);
    let client = client_for(&queue, Duration::from_secs(10));
    let requests: Vec<Vec<u8>> = (0..40u64)
        .map(|n| {
            if n == 7 {
                b"bad".to_vec()
            } else {
                n.to_string().into_bytes()
            }
        })
        .collect();
    let borrowed: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
    let outcomes = client.call_many(&borrowed, Duration::from_secs(10));
    assert_eq!(outcomes.len(), requests.len());
    for (n, outcome) in outcomes.into_iter().enumerate() {
        if n == 7 {
            assert!(outcome.unwrap_err().is_remote());
        } else {
            assert_eq!(
                outcome.unwrap(),
                fib::fib(n as u64).to_string().into_bytes()
            );
        }
    }
    server.shutdown().unwrap();
}

#[test]
fn a_poison_request_on_a_quorum_queue_is_dead_lettered_after_its_delivery_limit() {
    const LIMIT: u32 = 2;
    let queue = unique_queue("poison");
    let graveyard = unique_queue("poison-dead");
    let _guards = (QueueGuard(queue.clone()), QueueGuard(graveyard.clone()));
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, &graveyard);

    // The server declares the queue; then it goes, and the request meets only "servers" that
    // die holding it.
    let options = QueueOptions {
        workers: 1,
        queue_type: QueueType::Quorum,
        delivery_limit: Some(LIMIT),
        dead_letter_exchange: Some(String::new()),
        dead_letter_routing_key: Some(graveyard.clone()),
        ..QueueOptions::default()
    };
    Server::builder(&common::require_broker())
        .serve(&queue, options, fib_handler)
        .start()
        .unwrap()
        .shutdown()
        .unwrap();
    let properties = AmqpProperties::default().with_reply_to("nobody".into());
    channel
        .basic_publish(
            "",
            Publish::with_properties(b"30", queue.clone(), properties),
        )
        .unwrap();

    let mut deliveries = 0;
    loop {
        let mut doomed = raw_connection();
        let doomed_channel = doomed.open_channel(None).unwrap();
        doomed_channel.qos(0, 1, false).unwrap();
        let consumer = doomed_channel
            .basic_consume(queue.as_str(), ConsumerOptions::default())
            .unwrap();
        let received = consumer.receiver().recv_timeout(Duration::from_secs(1));
        // Dies holding the request, as a crashed server would: the whole connection goes with
        // it (so no cancel first), and the broker takes the request back, unacked.
        drop(consumer);
        drop(doomed_channel);
        drop(doomed);
        match received {
            Ok(ConsumerMessage::Delivery(_)) => deliveries += 1,
            _ => break,
        }
        assert!(deliveries <= 10, "the request keeps coming back");
    }
    assert_eq!(
        deliveries,
        LIMIT as usize + 1,
        "one delivery and {LIMIT} redeliveries"
    );
    assert_eq!(ready_messages(&queue), 0);
    assert_eq!(ready_messages(&graveyard), 1, "dead-lettered, not lost");
    connection.close().unwrap();
}
