//! Server processes stopped by signals: SIGTERM drains in-flight work, a second signal exits at
//! once, SIGKILL loses nothing (the broker redelivers), and a soak test with servers killed,
//! terminated and started under load sees every call answered exactly once.
//!
//! These tests use the debug build that `cargo test` makes, in which fib(3,000,000) takes
//! seconds: long enough to see the request taken (an unacked message, polled through
//! `rabbitmqctl`, which itself takes a good part of a second under load) and to signal the
//! server while it computes. fib(1,000,000) was too quick for that on a loaded machine.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::fib;
use common::process::{
    Running, our_client, our_server, our_server_with_workers, send_signal, spawn_until_ready, text,
};
use common::{
    LONG_N, QueueGuard, client_for, publish_request, ready_messages, unacked_messages,
    unique_queue, wait_until,
};

const READY: &str = "Awaiting RPC requests";

/// The decimal digits of fib(n), from Binet's formula: fib(n) rounds φⁿ/√5.
fn digits_of_fib(n: u64) -> usize {
    let phi = (1.0 + 5f64.sqrt()) / 2.0;
    (n as f64 * phi.log10() - 5f64.sqrt().log10()).floor() as usize + 1
}

fn start_server_process(queue: &str, extra: &[&str]) -> Running {
    let mut command = our_server(queue);
    command.args(extra);
    spawn_until_ready(command, READY)
}

/// As [`start_server_process`], with the server's log (its stderr) going to the file whose
/// path comes back.
fn start_logging_server_process(queue: &str, extra: &[&str]) -> (Running, PathBuf) {
    let log_path = std::env::temp_dir().join(format!("{queue}.log"));
    let mut command = our_server(queue);
    command
        .args(extra)
        .stderr(std::fs::File::create(&log_path).unwrap());
    (spawn_until_ready(command, READY), log_path)
}

/// Waits until a server has taken a request of `queue` and not yet acked it.
fn wait_until_taken(queue: &str) {
    wait_until("a server took the request", || unacked_messages(queue) > 0);
}

#[test]
fn a_refused_request_is_logged_by_the_server_and_reported_by_the_client() {
    let queue = unique_queue("binary-remote-error");
    let _guard = QueueGuard(queue.clone());
    let (mut server, log_path) = start_logging_server_process(&queue, &["--max-n", "50"]);

    let output = our_client(&queue, &["51"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert_eq!(
        stderr.trim(),
        "error: server error (bad-request): n=51 is larger than this server's limit of 50"
    );

    send_signal(&server.0, "TERM");
    assert!(server.0.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains("limit of 50")),
        "the server logs the refused request at warn:\n{log}"
    );
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_zero() {
    let queue = unique_queue("sigterm");
    let _guard = QueueGuard(queue.clone());
    let mut server = start_server_process(&queue, &["--max-n", &LONG_N.to_string()]);
    let client = Command::new(env!("CARGO_BIN_EXE_client"))
        .args([
            "--url",
            &common::broker_url(),
            "--queue",
            &queue,
            "--timeout",
            "60",
        ])
        .arg(LONG_N.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_taken(&queue);
    send_signal(&server.0, "TERM");
    let exit = server.0.wait().unwrap();
    assert!(exit.success(), "the server exited with {exit}");

    let output = client.wait_with_output().unwrap();
    let (stdout, _) = text(&output);
    assert!(output.status.success());
    let digits = stdout
        .lines()
        .last()
        .unwrap()
        .trim_start_matches(" [.] Got ");
    assert!(digits.bytes().all(|b| b.is_ascii_digit()), "a number");
    assert_eq!(
        digits.len(),
        digits_of_fib(LONG_N),
        "fib({LONG_N})'s digits"
    );
    assert_eq!(ready_messages(&queue), 0);
}

#[test]
fn a_second_signal_exits_at_once() {
    let queue = unique_queue("second-signal");
    let _guard = QueueGuard(queue.clone());
    let (mut server, log_path) = start_logging_server_process(&queue, &["--max-n", "20000000"]);
    // fib(20,000,000) keeps the worker busy for far longer than this test waits.
    publish_request(&queue, b"20000000");
    wait_until_taken(&queue);

    // Ctrl-C first, as a person at a terminal would, then a SIGTERM.
    send_signal(&server.0, "INT");
    wait_until("the server says it finishes its request first", || {
        std::fs::read_to_string(&log_path)
            .is_ok_and(|log| log.contains("shutting down: finishing in-flight requests"))
    });
    let _ = std::fs::remove_file(&log_path);
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the first signal waits for the request"
    );
    send_signal(&server.0, "TERM");
    let started = Instant::now();
    let exit = server.0.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        exit.code(),
        Some(128 + 15),
        "exit code after a second SIGTERM"
    );
}

#[test]
fn a_request_whose_server_is_killed_is_answered_by_another() {
    let queue = unique_queue("sigkill");
    let _guard = QueueGuard(queue.clone());
    let max_n = LONG_N.to_string();
    let mut doomed = start_server_process(&queue, &["--max-n", &max_n]);
    // Between the kill and the rescuer, nobody consumes: this caller waits it out rather than
    // fail as "no server" after the default grace, since a server restarting is the point.
    let caller = {
        let options = amqp_rpc::ClientOptions {
            queue: queue.clone(),
            timeout: Duration::from_secs(60),
            no_server_grace: Duration::ZERO,
            ..amqp_rpc::ClientOptions::default()
        };
        let client = amqp_rpc::Client::with_options(&common::require_broker(), options).unwrap();
        thread::spawn(move || client.fib(LONG_N))
    };
    // The expected answer, computed meanwhile.
    let expected = thread::spawn(|| fib::fib(LONG_N));
    wait_until_taken(&queue);
    send_signal(&doomed.0, "KILL");
    doomed.0.wait().unwrap();

    let _rescuer = start_server_process(&queue, &["--max-n", &max_n]);
    let answer = caller
        .join()
        .unwrap()
        .expect("the request survives its server");
    assert_eq!(answer, expected.join().unwrap());
}

/// A server binary of `queue` with one worker and `extra` flags, logging at debug (its
/// handler's " [.] fib(n)" lines) to the file whose path comes back.
///
/// One worker: when a server dies, a quorum queue may hand the request it held to the
/// server's other workers in the moment before their channels close too, and counts each
/// (`x-delivery-count` went from none to 2 when a server of two workers was killed).
fn start_debug_logging_server(queue: &str, extra: &[&str]) -> (Running, PathBuf) {
    let log_path = std::env::temp_dir().join(format!("{queue}-{}.log", uuid::Uuid::new_v4()));
    let mut command = our_server_with_workers(queue, 1);
    command
        .args(extra)
        .env("RUST_LOG", "server=debug,amqp_rpc=info")
        .stderr(std::fs::File::create(&log_path).unwrap());
    (spawn_until_ready(command, READY), log_path)
}

/// True once the server logging to `log_path` has begun computing fib(`n`).
fn began_computing(log_path: &std::path::Path, n: u64) -> bool {
    let line = format!(" [.] fib({n})");
    std::fs::read_to_string(log_path).is_ok_and(|log| log.contains(&line))
}

/// A request whose handling kills its server (here, SIGKILL while it computes) twice, on a
/// queue with `--delivery-limit 2`: the third server answers it with an error instead of
/// running it, and serves the next call as usual.
fn a_request_that_killed_its_servers_is_refused_at_the_delivery_limit(queue_type: &str) {
    // Minutes of work for a debug build: the servers are surely computing when killed.
    const DEADLY_N: u64 = 1_000_000_000;
    let queue = unique_queue(&format!("delivery-limit-{queue_type}"));
    let _guard = QueueGuard(queue.clone());
    let flags = [
        "--delivery-limit",
        "2",
        "--queue-type",
        queue_type,
        "--max-n",
        "2000000000",
    ];
    // Between a kill and the next server, nobody consumes: the caller waits it out.
    let client = amqp_rpc::Client::with_options(
        &common::require_broker(),
        amqp_rpc::ClientOptions {
            queue: queue.clone(),
            timeout: Duration::from_secs(120),
            no_server_grace: Duration::ZERO,
            ..amqp_rpc::ClientOptions::default()
        },
    )
    .unwrap();
    let mut logs = Vec::new();
    let (mut first, log) = start_debug_logging_server(&queue, &flags);
    logs.push(log);
    let caller = {
        let client = client.clone();
        thread::spawn(move || client.fib(DEADLY_N))
    };
    for killed in 1..=2 {
        let log = logs.last().unwrap().clone();
        wait_until(&format!("server {killed} runs the request"), || {
            began_computing(&log, DEADLY_N)
        });
        send_signal(&first.0, "KILL");
        first.0.wait().unwrap();
        let (next, log) = start_debug_logging_server(&queue, &flags);
        first = next;
        logs.push(log);
    }
    let error = caller
        .join()
        .unwrap()
        .expect_err("refused, not run a third time");
    assert_eq!(
        error.remote_kind(),
        Some(amqp_rpc::FailureKind::HandlerFailed),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("delivered 2 times without being answered"),
        "{error}"
    );
    assert!(
        !began_computing(logs.last().unwrap(), DEADLY_N),
        "the third server did not run it"
    );
    assert_eq!(client.fib(10).unwrap().to_string(), "55", "and serves on");
    send_signal(&first.0, "TERM");
    assert!(first.0.wait().unwrap().success());
    for log in logs {
        let _ = std::fs::remove_file(log);
    }
}

#[test]
fn a_request_that_killed_its_servers_is_refused_at_the_delivery_limit_on_a_classic_queue() {
    a_request_that_killed_its_servers_is_refused_at_the_delivery_limit("classic");
}

#[test]
fn a_request_that_killed_its_servers_is_refused_at_the_delivery_limit_on_a_quorum_queue() {
    a_request_that_killed_its_servers_is_refused_at_the_delivery_limit("quorum");
}

#[test]
fn soak_servers_killed_terminated_and_started_under_load_lose_and_mix_up_nothing() {
    const CALLERS: u64 = 4;
    let queue = unique_queue("soak");
    let _guard = QueueGuard(queue.clone());
    let mut first = start_server_process(&queue, &[]);
    let mut second = start_server_process(&queue, &[]);

    let stop = Arc::new(AtomicBool::new(false));
    // Calls started, answered rightly, answered with another call's answer, and failed.
    let tally: Arc<[AtomicUsize; 4]> = Arc::default();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (queue, stop, tally) = (queue.clone(), Arc::clone(&stop), Arc::clone(&tally));
            thread::spawn(move || {
                let client = client_for(&queue, Duration::from_secs(30));
                let mut calls = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // Big enough to be mid-computation when a server dies, unique per call.
                    let n = 20_000 + caller * 10_000 + calls % 10_000;
                    tally[0].fetch_add(1, Ordering::SeqCst);
                    let outcome = match client.fib(n) {
                        Ok(answer) if answer == fib::fib(n) => 1,
                        Ok(_) => 2,
                        Err(error) => {
                            eprintln!("caller {caller}, call {calls}: {error}");
                            3
                        }
                    };
                    tally[outcome].fetch_add(1, Ordering::SeqCst);
                    calls += 1;
                }
            })
        })
        .collect();

    // Each phase lasts until a few more calls have been answered: the load goes on through
    // every event.
    let answered = || tally[1].load(Ordering::SeqCst);
    let more_answers = |what: &str| {
        let before = answered();
        wait_until(what, || answered() >= before + 10);
    };
    more_answers("calls are answered by two servers");
    send_signal(&first.0, "KILL");
    first.0.wait().unwrap();
    more_answers("calls are answered after a SIGKILL");
    let _third = start_server_process(&queue, &[]);
    more_answers("calls are answered with a server started");
    send_signal(&second.0, "TERM");
    assert!(second.0.wait().unwrap().success());
    more_answers("calls are answered after a SIGTERM");
    stop.store(true, Ordering::SeqCst);

    for caller in callers {
        caller.join().unwrap();
    }
    let [started, right, wrong, failed] =
        tally.each_ref().map(|count| count.load(Ordering::SeqCst));
    eprintln!("soak: {started} calls, {right} answered rightly");
    assert_eq!(wrong, 0, "calls answered with another call's answer");
    assert_eq!(failed, 0, "calls that failed");
    assert_eq!(right, started, "every call started was answered");
    assert!(right >= 40, "too few calls to mean anything: {right}");
}

#[test]
fn binets_formula_counts_the_digits_of_fibonacci_numbers() {
    for n in [10, 100, 1000, 30_000] {
        assert_eq!(digits_of_fib(n), fib::fib(n).to_string().len(), "fib({n})");
    }
}

#[test]
fn the_client_binary_takes_a_fibonacci_reply_of_any_size_the_server_sends() {
    // fib(1000) has 209 digits: over a 100-byte limit, which a Fibonacci call raises to fit,
    // as it raises the default 4 MiB for fib(30,000,000)'s 6 MB.
    let queue = unique_queue("reply-size");
    let _guard = QueueGuard(queue.clone());
    let _server = start_server_process(&queue, &[]);
    let output = our_client(&queue, &["--max-reply", "100", "1000"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains(&fib::fib(1000).to_string()), "{stdout}");
    let output = our_client(&queue, &["--max-reply", "100", "--body", "1000"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("a reply of 209 bytes is over this client's limit of 100 bytes"),
        "{stderr}"
    );
}

#[test]
fn the_client_binary_ends_within_its_timeout_when_its_connect_hangs() {
    // A listener that takes connections and never speaks AMQP.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let _held = thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", &format!("amqp://guest:guest@{address}/%2f")])
        .args(["--timeout", "2", "10"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.contains("could not connect"), "{stderr}");
    assert!(
        took < Duration::from_millis(3500),
        "took {took:?} for a 2 s timeout (the connect timeout is 5 s)"
    );
}

#[test]
fn a_process_whose_threads_are_too_small_for_amiquip_is_warned_once() {
    let queue = unique_queue("small-stack");
    let run = |stack: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_client"))
            .args(["--url", &common::require_broker(), "--queue", &queue])
            .args(["--timeout", "1", "1"])
            .env("RUST_MIN_STACK", stack)
            .output()
            .unwrap();
        text(&output).1
    };
    // Below what amiquip's I/O thread needs for headers nested 32 deep (256 KiB in a debug
    // build, 64 KiB in a release one), yet enough for an ordinary call.
    let stack = if cfg!(debug_assertions) {
        "200000"
    } else {
        "50000"
    };
    let small = run(stack);
    let warning = format!("RUST_MIN_STACK is {stack} bytes, below");
    assert_eq!(small.matches(&warning).count(), 1, "{small}");
    let large = run("4194304");
    assert!(!large.contains("RUST_MIN_STACK"), "{large}");
}
