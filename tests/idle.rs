//! An idle client costs nothing: between calls its session's own thread sleeps until a reply
//! or a call comes, instead of polling. A test binary of its own, so that the one thread named
//! `rpc-client-idle` in the process is this test's.

mod common;

use std::time::Duration;

use common::{QueueGuard, client_for, start_fib_server, unique_queue};

/// The thread ids of this process whose name is `name`.
fn threads_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim_end() == name).then_some(tid)
        })
        .collect()
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
fn an_idle_client_sleeps_and_answers_its_next_call_at_once() {
    let queue = unique_queue("idle");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);
    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"10").unwrap(), b"55");

    let idle = threads_named("rpc-client-idle");
    assert_eq!(idle.len(), 1, "one client, one idle thread: {idle:?}");
    let before = switches(&idle[0]);
    // Not a synchronisation: the span over which the thread's wake-ups are counted. Reading
    // in 10 ms turns, it used to wake about 50 times in it.
    std::thread::sleep(Duration::from_millis(500));
    let woken = switches(&idle[0]) - before;
    assert!(woken <= 5, "the idle thread woke {woken} times in 0.5 s");

    // The call that ends the idle spell takes the reader role from the idle thread.
    assert_eq!(client.call(b"20").unwrap(), b"6765");
    server.shutdown().unwrap();
}
