//! An idle client and an idle server cost nothing: between calls, the client's own thread and
//! the server's workers sleep until a reply, a request or a call comes, instead of polling. A
//! test binary of its own, so that the threads it counts by name are this test's.

mod common;

use std::time::Duration;

use common::{QueueGuard, client_for, logs, start_fib_server, unique_queue, wait_until};

/// The thread id of this process's one thread named `name`.
fn thread_named(name: &str) -> String {
    let found: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim_end() == name).then_some(tid)
        })
        .collect();
    assert_eq!(found.len(), 1, "threads named {name}: {found:?}");
    found.into_iter().next().unwrap()
}

/// How many times the thread `tid` has been switched out, voluntarily (to sleep) or not.
fn switches(tid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .filter(|line| line.contains("ctxt_switches:"))
        .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn an_idle_client_and_an_idle_server_sleep_and_answer_the_next_call_at_once() {
    logs::capture();
    let queue = unique_queue("idle");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);
    let idle_worker = format!("worker of queue '{queue}' idle");
    wait_until("the worker sleeps", || {
        logs::times_logged(&idle_worker) == 1
    });
    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"10").unwrap(), b"55");
    // The worker sleeps again only once it has served the call and no other request came.
    wait_until("the worker sleeps again", || {
        logs::times_logged(&idle_worker) == 2
    });

    let (client_thread, worker) = (
        thread_named("rpc-client-idle"),
        thread_named("rpc-worker-0"),
    );
    let before = (switches(&client_thread), switches(&worker));
    // Not a synchronisation: the span over which the threads' wake-ups are counted. Polling,
    // the client's thread woke about 50 times in it, and the worker at least 10 (a park
    // per 50 ms poll).
    std::thread::sleep(Duration::from_millis(500));
    let woken = (
        switches(&client_thread) - before.0,
        switches(&worker) - before.1,
    );
    assert!(
        woken.0 <= 5 && woken.1 <= 3,
        "in 0.5 s the client's idle thread woke {} times, the worker {}",
        woken.0,
        woken.1
    );

    // The call that ends the idle spell takes the reader role from the client's thread and
    // wakes the worker.
    assert_eq!(client.call(b"20").unwrap(), b"6765");
    server.shutdown().unwrap();
}
