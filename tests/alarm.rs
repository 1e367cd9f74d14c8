//! A broker that stops reading or answering, with its connections open. A resource alarm
//! (here a disk free limit far above the disk's size, the broker's "low on disk") stops it
//! reading from every publishing connection until the alarm clears; a paused broker (here
//! stopped with `SIGSTOP`, as a paused machine or a network that TCP has not yet seen fail
//! looks) answers nothing. A call made then must still end at its timeout, and say why, and a
//! client or server must still close, instead of hanging until the broker is back.
//!
//! A test binary of its own: the alarm and the pause stop every client of the broker, so no
//! other test may run meanwhile (`cargo test` runs test binaries one after another), and its
//! own tests take turns.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{Error, QueueOptions, Request, Server, ServerOptions};
use common::{
    QueueGuard, client_for, hold_until, publish_request, rabbitmqctl, require_broker,
    start_fib_server, start_holding_server, unacked_messages, unique_queue, wait_until,
};

/// Held by each test for its whole run: one test's alarm would block the other's calls.
static ALONE: Mutex<()> = Mutex::new(());

/// The broker's disk alarm, raised while this lives.
struct DiskAlarm;

impl DiskAlarm {
    fn raise() -> DiskAlarm {
        rabbitmqctl(&["set_disk_free_limit", "1000000GB"]);
        let alarm = DiskAlarm;
        wait_until("the broker raises its disk alarm", || {
            rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("disk")
        });
        alarm
    }
}

impl Drop for DiskAlarm {
    /// Puts the broker's configured limit back, which clears the alarm.
    fn drop(&mut self) {
        rabbitmqctl(&[
            "eval",
            "{ok, Limit} = application:get_env(rabbit, disk_free_limit), \
             rabbit_disk_monitor:set_disk_free_limit(Limit).",
        ]);
    }
}

/// Runs `work` on a thread of its own and returns its outcome, or `None` if it has not ended
/// within `bound`: a call that hangs fails the test (and the alarm is cleared) instead of
/// hanging it too.
fn within<T: Send + 'static>(
    bound: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done, outcome) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(work());
    });
    outcome.recv_timeout(bound).ok()
}

#[test]
fn while_the_broker_blocks_publishers_calls_end_at_their_timeout_and_clients_close() {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let queue = unique_queue("alarm");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);
    let client = client_for(&queue, Duration::from_secs(10));
    let doomed = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"10").unwrap(), b"55");
    assert_eq!(doomed.call(b"10").unwrap(), b"55");

    let alarm = DiskAlarm::raise();
    for caller in [&client, &doomed] {
        let caller = caller.clone();
        // Before, a call that timed out asked the blocked broker about the queue, and waited
        // for the answer until the alarm cleared.
        let error = within(Duration::from_secs(10), move || {
            caller.call_with_timeout(b"11", Duration::from_secs(1))
        })
        .expect("the call ends at its timeout, not when the alarm clears")
        .unwrap_err();
        assert!(error.is_blocked(), "{error:?}");
        assert!(error.is_timeout() && error.is_retryable(), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("timed out after 1.000 s"), "{message}");
        assert!(
            message.contains("blocking this client's connection (low on disk)"),
            "{message}"
        );
    }
    // Now that the client knows, a call is not even sent: it would wait in memory, unread.
    let error = client
        .call_with_timeout(b"13", Duration::from_secs(1))
        .unwrap_err();
    assert!(
        matches!(&error, Error::Blocked { after: None, .. }),
        "{error:?}"
    );
    assert!(error.is_retryable() && !error.is_timeout(), "{error:?}");
    let message = error.to_string();
    assert!(message.starts_with("not sent to queue"), "{message}");
    assert!(message.contains("(low on disk)"), "{message}");

    // The broker does not read the close either: the client cuts the connection after a while
    // instead of waiting for the alarm to clear.
    let closed = within(Duration::from_secs(15), move || doomed.close())
        .expect("closing a blocked client ends, not when the alarm clears");
    assert!(closed.is_err_and(|error| error.is_connection_lost()));

    // Once the alarm clears, the other client calls on, on the same connection, as soon as
    // it has heard so.
    drop(alarm);
    wait_until("the client calls on", || {
        client.call(b"12").is_ok_and(|reply| reply == b"144")
    });
    assert_eq!(client.stats().errors.timeout, 1);
    server.shutdown().unwrap();
}

#[test]
fn a_server_whose_connection_the_broker_blocks_still_shuts_down() {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let queue = unique_queue("alarm-server");
    let _guard = QueueGuard(queue.clone());
    let released = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&released);
    let server = Server::builder(&require_broker())
        .options(ServerOptions {
            drain_timeout: Duration::from_secs(1),
            ..ServerOptions::default()
        })
        .serve(&queue, QueueOptions::with_workers(1), move |_: &Request| {
            hold_until(&held);
            Ok(b"done".to_vec())
        })
        .start()
        .unwrap();
    publish_request(&queue, b"held");
    wait_until("the handler holds the request", || {
        unacked_messages(&queue) == 1
    });

    let alarm = DiskAlarm::raise();
    // The reply is the server's first publish under the alarm: the broker blocks its
    // connection, and reads neither the ack, nor the channel's close, nor the connection's.
    released.store(true, Ordering::SeqCst);
    wait_until("the broker blocks the server's connection", || {
        rabbitmqctl(&["list_connections", "state", "--no-table-headers", "-q"])
            .lines()
            .any(|state| state.trim() == "blocked")
    });
    // Within the drain timeout and the wait for the close, then the connection is cut.
    within(Duration::from_secs(20), move || server.shutdown())
        .expect("the server stops, not when the alarm clears")
        .expect("a stop is not an error, even with its connection cut");
    drop(alarm);
}

/// The machine's broker, its process stopped (`SIGSTOP`) while this lives, as a broker that
/// stops answering without closing its connections (a paused machine, a network that TCP has
/// not yet seen fail) looks to its clients; continued (`SIGCONT`) when dropped, by a failing
/// test too.
struct PausedBroker(String);

impl PausedBroker {
    /// The broker, not yet paused.
    fn find() -> PausedBroker {
        let pid = rabbitmqctl(&["eval", "os:getpid()."])
            .trim()
            .trim_matches('"')
            .to_string();
        assert!(
            pid.parse::<u32>().is_ok(),
            "the broker's process id: {pid:?}"
        );
        PausedBroker(pid)
    }

    fn pause(&self) {
        signal("STOP", &self.0);
    }
}

impl Drop for PausedBroker {
    fn drop(&mut self) {
        signal("CONT", &self.0);
    }
}

fn signal(name: &str, pid: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), pid])
        .status();
    if !sent.as_ref().is_ok_and(|status| status.success()) {
        // Not a panic: this may run while a failing test unwinds.
        eprintln!("could not send SIG{name} to the broker ({pid}): {sent:?}");
    }
}

#[test]
fn a_call_to_a_broker_that_stops_answering_ends_at_its_timeout() {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let queue = unique_queue("paused");
    let _guard = QueueGuard(queue.clone());
    let (server, handler_holds, release) = start_holding_server(&queue);
    let timeout = Duration::from_secs(5);
    let client = client_for(&queue, timeout);
    let broker = PausedBroker::find();
    let caller = client.clone();
    let call = thread::spawn(move || {
        let began = std::time::Instant::now();
        (caller.call(b"slow"), began.elapsed())
    });
    // The broker is paused as soon as the server holds the request, well before the call
    // times out.
    handler_holds
        .recv_timeout(timeout)
        .expect("the handler holds the request");
    broker.pause();
    // Before, the call timed out on time, then asked the broker about the queue, and waited
    // for its answer until the broker came back.
    let (outcome, took) = within(timeout + Duration::from_secs(3), move || {
        call.join().unwrap()
    })
    .expect("the call ends near its timeout, not when the broker answers again");
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    let error = outcome.unwrap_err();
    assert!(
        matches!(&error, Error::Timeout { state: None, .. }),
        "{error:?}"
    );
    // The question about the queue is still out, on a channel it was opening: the close cuts
    // the connection after its 5 s wait instead of waiting for either until the heartbeats
    // run out (20 s).
    let closed = within(Duration::from_secs(8), move || client.close())
        .expect("closing the client ends, not when the broker answers again");
    assert!(closed.is_err_and(|error| error.is_connection_lost()));
    drop(broker);
    drop(release);
    server.shutdown().unwrap();
}

#[test]
fn an_idle_server_shuts_down_soon_while_the_broker_stops_answering() {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let queue = unique_queue("paused-server");
    let _guard = QueueGuard(queue.clone());
    let server = Server::builder(&require_broker())
        .options(ServerOptions {
            // No heartbeats: nothing else would end the waits on the broker.
            connect: amqp_rpc::ConnectOptions {
                heartbeat: 0,
                ..amqp_rpc::ConnectOptions::default()
            },
            ..ServerOptions::default()
        })
        .serve(
            &queue,
            QueueOptions::with_workers(2),
            |request: &Request| Ok(request.body().to_vec()),
        )
        .start()
        .unwrap();
    let broker = PausedBroker::find();
    broker.pause();
    // No request is in flight: the drain waits 5 s for the broker to confirm the workers'
    // cancels, then 5 s for the close, not the 30 s drain timeout. Before, it waited for the
    // whole drain timeout, and 5 s more.
    let began = std::time::Instant::now();
    within(Duration::from_secs(20), move || server.shutdown())
        .expect("the server stops well within its drain timeout")
        .expect("a stop is not an error, even with its connection cut");
    let took = began.elapsed();
    drop(broker);
    assert!(took < Duration::from_secs(13), "took {took:?}");
}

#[test]
fn large_requests_to_a_broker_that_stops_answering_end_near_their_timeouts() {
    let _alone = ALONE.lock().unwrap_or_else(PoisonError::into_inner);
    let queue = unique_queue("paused-large");
    let _guard = QueueGuard(queue.clone());
    let timeout = Duration::from_secs(2);
    let client = client_for(&queue, timeout);
    let broker = PausedBroker::find();
    broker.pause();
    // 64 MiB in all: past the kernel's socket buffers and amiquip's 16 MiB of unsent bytes,
    // after which a publish waits for the broker to read.
    let body = Arc::new(vec![b'1'; 4 << 20]);
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (client, body) = (client.clone(), Arc::clone(&body));
            thread::spawn(move || {
                (0..2)
                    .map(|_| {
                        let began = Instant::now();
                        let outcome = client.call(&body);
                        (outcome.map(|_| ()), began.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Before, the callers behind a publish that waited for the broker waited with it, until
    // the heartbeats ran out: up to 17 s.
    let outcomes = within(Duration::from_secs(10), move || {
        callers
            .into_iter()
            .flat_map(|caller| caller.join().unwrap())
            .collect::<Vec<_>>()
    })
    .expect("every call ends while the broker is paused");
    for (outcome, took) in &outcomes {
        assert!(outcome.is_err(), "a paused broker answered");
        // The timeout, the second a publish may be stuck past it, and slack for a loaded
        // machine.
        assert!(
            *took < timeout + Duration::from_millis(1500),
            "a call ended {took:?} after it began: {outcome:?}"
        );
    }
    // One publish was stuck, and the client cut its connection: the next calls connect again
    // once the broker answers.
    drop(broker);
    let server = start_fib_server(&queue, 1);
    assert_eq!(client.call(b"10").unwrap(), b"55");
    server.shutdown().unwrap();
}
