//! A broker that blocks publishers: a resource alarm (here a disk free limit far above the
//! disk's size, the broker's "low on disk") stops it reading from every publishing
//! connection until the alarm clears. A call made then must still end at its timeout, and
//! say why, instead of hanging until the alarm clears.
//!
//! A test binary of its own: the alarm blocks every publisher on the broker, so no other test
//! may run meanwhile (`cargo test` runs test binaries one after another).

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{QueueGuard, client_for, rabbitmqctl, start_fib_server, unique_queue, wait_until};

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

#[test]
fn a_call_while_the_broker_blocks_publishers_ends_at_its_timeout_and_says_why() {
    let queue = unique_queue("alarm");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);
    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"10").unwrap(), b"55");

    let alarm = DiskAlarm::raise();
    let call = {
        let (client, (done, outcome)) = (client.clone(), mpsc::channel());
        thread::spawn(move || {
            let _ = done.send(client.call_with_timeout(b"11", Duration::from_secs(1)));
        });
        outcome
    };
    // Bounded, so that a call that hangs fails the test (and the alarm is cleared) instead of
    // hanging it too: before, the call asked the blocked broker about the queue when it timed
    // out, and waited for the answer until the alarm cleared.
    let error = call
        .recv_timeout(Duration::from_secs(10))
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

    // Once the alarm clears, the client calls on, on the same connection.
    drop(alarm);
    assert_eq!(client.call(b"12").unwrap(), b"144");
    assert_eq!(client.stats().errors.timeout, 1);
    server.shutdown().unwrap();
}
