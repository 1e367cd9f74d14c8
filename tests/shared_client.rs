//! One client shared by many threads: every thread gets exactly its own answers over one
//! connection and one channel, one caller's failure leaves the others alone, a lost connection
//! fails (or, with retry, re-sends) every waiting call, and the last clone closes the
//! connection.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{Client, ClientOptions, Error, HandlerError, Request, fib};
use common::proxy::FaultProxy;
use common::{
    QueueGuard, channels_on, hold_until, queued_messages, require_broker, start_fib_server,
    start_server, unacked_messages, unique_queue, wait_until,
};

fn client_through(proxy: &FaultProxy, queue: &str, timeout: Duration, retry: bool) -> Client {
    let options = ClientOptions {
        queue: queue.to_string(),
        timeout,
        retry,
        ..ClientOptions::default()
    };
    Client::with_options(&proxy.url(), options).expect("connect the client")
}

/// Runs `threads` threads that start together, each calling `work` with its index and a clone
/// of `client`; returns what each returned, in thread order.
fn together<T: Send + 'static>(
    client: &Client,
    threads: usize,
    work: impl Fn(usize, Client) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let start = Arc::new(Barrier::new(threads));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..threads)
        .map(|index| {
            let (client, start, work) = (client.clone(), Arc::clone(&start), Arc::clone(&work));
            thread::spawn(move || {
                start.wait();
                work(index, client)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|handle| handle.join().expect("a calling thread panicked"))
        .collect()
}

#[test]
fn sixty_four_threads_on_one_clone_get_their_own_answers_over_one_channel() {
    let queue = unique_queue("shared-64");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 4);
    let proxy = FaultProxy::start(&require_broker());
    let client = client_through(&proxy, &queue, Duration::from_secs(20), false);
    assert_eq!(client.fib(1).unwrap(), fib::fib(1));
    let names = proxy.broker_connection_names();
    assert_eq!(names.len(), 1);
    let channels_for_one = channels_on(&names[0]).expect("the client's connection is listed");

    let answered = together(&client, 64, |thread, client| {
        for call in 0..20u64 {
            let n = thread as u64 * 100 + call;
            assert_eq!(
                client.fib(n).unwrap(),
                fib::fib(n),
                "thread {thread}, fib({n})"
            );
        }
        20
    });
    assert_eq!(answered.iter().sum::<usize>(), 64 * 20);
    assert_eq!(proxy.connections(), 1, "one connection for all threads");
    assert_eq!(
        channels_on(&names[0]),
        Some(channels_for_one),
        "the broker sees as many channels for 64 threads as for one"
    );
    assert_eq!(channels_for_one, 1);
    client.close().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn a_timeout_and_a_remote_error_leave_the_other_threads_calls_unharmed() {
    let queue = unique_queue("shared-isolation");
    let _guard = QueueGuard(queue.clone());
    let slow_done = Arc::new(AtomicBool::new(false));
    let done = Arc::clone(&slow_done);
    let server = start_server(&queue, 4, move |request: &Request| match request.body() {
        b"slow" => {
            thread::sleep(Duration::from_secs(1));
            done.store(true, Ordering::SeqCst);
            Ok(b"slow".to_vec())
        }
        b"bad" => Err(HandlerError::bad_request("refused on purpose")),
        body => fib::handle_request(body, 10_000),
    });
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: queue.clone(),
            ..ClientOptions::default()
        },
    )
    .unwrap();

    let outcomes = together(&client, 10, |thread, client| match thread {
        0 => {
            let error = client
                .call_with_timeout(b"slow", Duration::from_millis(200))
                .unwrap_err();
            assert!(error.is_timeout(), "{error:?}");
        }
        1 => {
            let error = client.call(b"bad").unwrap_err();
            assert!(
                matches!(&error, Error::Remote { message, .. } if message == "refused on purpose"),
                "{error:?}"
            );
        }
        _ => {
            for call in 0..30u64 {
                let n = thread as u64 * 1000 + call;
                assert_eq!(client.fib(n).unwrap(), fib::fib(n), "thread {thread}");
            }
        }
    });
    assert_eq!(outcomes.len(), 10);

    // The slow reply comes back after its call gave up: it is dropped, and answers no one else.
    wait_until("the slow request was answered and acked", || {
        slow_done.load(Ordering::SeqCst) && unacked_messages(&queue) == 0
    });
    for n in 0..5 {
        assert_eq!(client.fib(n).unwrap(), fib::fib(n));
    }
    server.shutdown().unwrap();
}

/// A server that holds every `hold...` request until `released`, then answers it with its own
/// body; other requests are Fibonacci.
fn holding_server(queue: &str, released: &Arc<AtomicBool>) -> amqp_rpc::Server {
    let released = Arc::clone(released);
    start_server(queue, 4, move |request: &Request| {
        if request.body().starts_with(b"hold") {
            hold_until(&released);
            return Ok(request.body().to_vec());
        }
        fib::handle_request(request.body(), 1000)
    })
}

#[test]
fn a_cut_connection_fails_every_waiting_call_promptly_and_the_next_calls_work() {
    const WAITING: usize = 32;
    let queue = unique_queue("shared-cut");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(false));
    let server = holding_server(&queue, &released);
    let proxy = Arc::new(FaultProxy::start(&require_broker()));
    let client = client_through(&proxy, &queue, Duration::from_secs(20), false);

    let cut_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let waiting = {
        let (client, cut_at) = (client.clone(), Arc::clone(&cut_at));
        thread::spawn(move || {
            together(&client, WAITING, move |thread, client| {
                let error = client
                    .call(format!("hold {thread}").as_bytes())
                    .unwrap_err();
                let noticed = Instant::now();
                (error, noticed)
            })
            .into_iter()
            .map(|(error, noticed)| (error, noticed - cut_at.lock().unwrap().expect("cut")))
            .collect::<Vec<_>>()
        })
    };
    wait_until("every call is published", || {
        queued_messages(&queue) == WAITING as u32
    });
    *cut_at.lock().unwrap() = Some(Instant::now());
    proxy.cut_all();
    let failures = waiting.join().unwrap();
    released.store(true, Ordering::SeqCst);
    assert_eq!(failures.len(), WAITING);
    for (error, after) in &failures {
        assert!(error.is_connection_lost(), "{error:?}");
        assert!(
            *after < Duration::from_secs(5),
            "noticed only {after:?} after the cut"
        );
    }

    // The next calls connect again, from any thread.
    let answers = together(&client, 8, |thread, client| {
        client.fib(thread as u64).unwrap()
    });
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer, fib::fib(n as u64));
    }
    assert_eq!(proxy.connections(), 2, "one reconnection for all threads");
    server.shutdown().unwrap();
}

#[test]
fn with_retry_every_call_waiting_on_a_cut_connection_is_answered() {
    const WAITING: usize = 32;
    let queue = unique_queue("shared-cut-retry");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(false));
    let server = holding_server(&queue, &released);
    let proxy = FaultProxy::start(&require_broker());
    let client = client_through(&proxy, &queue, Duration::from_secs(20), true);

    let waiting = {
        let client = client.clone();
        thread::spawn(move || {
            together(&client, WAITING, |thread, client| {
                let body = format!("hold {thread}");
                (body.clone().into_bytes(), client.call(body.as_bytes()))
            })
        })
    };
    wait_until("every call is published", || {
        queued_messages(&queue) == WAITING as u32
    });
    proxy.cut_all();
    // Released once the client has reconnected and sent every call again.
    wait_until("every call is sent again", || {
        proxy.connections() == 2 && queued_messages(&queue) >= 2 * WAITING as u32 - 4
    });
    released.store(true, Ordering::SeqCst);
    for (body, outcome) in waiting.join().unwrap() {
        assert_eq!(outcome.unwrap(), body, "each call gets its own answer");
    }
    server.shutdown().unwrap();
}

#[test]
fn a_clone_dropped_on_another_thread_leaves_the_others_working_and_the_last_drop_closes() {
    let queue = unique_queue("shared-drop");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 2);
    let proxy = FaultProxy::start(&require_broker());
    let client = client_through(&proxy, &queue, Duration::from_secs(10), false);
    let name = proxy.broker_connection_names().remove(0);

    let calls = Arc::new(AtomicUsize::new(0));
    let elsewhere = {
        let (clone, calls) = (client.clone(), Arc::clone(&calls));
        thread::spawn(move || {
            assert_eq!(clone.fib(10).unwrap(), fib::fib(10));
            calls.fetch_add(1, Ordering::SeqCst);
            drop(clone);
        })
    };
    elsewhere.join().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(client.fib(20).unwrap(), fib::fib(20));

    // Closing a clone that is not the last leaves the connection to the others.
    let other = client.clone();
    other.close().unwrap();
    assert_eq!(client.fib(21).unwrap(), fib::fib(21));
    assert!(channels_on(&name).is_some(), "the connection is still open");

    drop(client);
    wait_until("the broker no longer lists the connection", || {
        channels_on(&name).is_none()
    });
    assert_eq!(proxy.connections(), 1);
    server.shutdown().unwrap();
}
