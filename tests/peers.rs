//! Interoperability with the RabbitMQ tutorial's pika peers, and the binaries end to end.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{our_client, our_server, send_signal, spawn_until_ready, text};
use common::{
    QueueGuard, broker_url, client_for, pika_peer, python_with_pika, start_fib_server,
    start_server, unique_queue,
};

#[test]
fn the_binaries_round_trip_and_the_server_stops_on_sigterm() {
    let queue = unique_queue("binaries");
    let _guard = QueueGuard(queue.clone());
    let mut server = spawn_until_ready(our_server(&queue), "Awaiting RPC requests");

    let output = our_client(&queue, &["30"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "client failed: {stderr}");
    assert_eq!(stdout, " [x] Requesting fib(30)\n [.] Got 832040\n");

    let output = our_client(&queue, &["100"]);
    assert!(text(&output).0.contains(" [.] Got 354224848179261915075\n"));

    send_signal(&server.0, "TERM");
    let started = Instant::now();
    let exit = server.0.wait().unwrap();
    assert!(exit.success(), "the server exited with {exit}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_client_binary_reports_failures_on_stderr_with_a_nonzero_exit() {
    let queue = unique_queue("no-server");
    let output = our_client(&queue, &["--timeout", "2", "5"]);
    let (_, stderr) = text(&output);
    assert!(!output.status.success());
    assert!(stderr.starts_with("error: no route to queue"), "{stderr}");

    let output = our_client(&queue, &["-5"]);
    assert!(!output.status.success());
    assert!(text(&output).1.contains("invalid value '-5'"));

    let output = Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", "amqp://guest:guest@127.0.0.1:1/%2f", "5"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output)
            .1
            .starts_with("error: could not connect to amqp://guest@127.0.0.1:1")
    );
}

#[test]
fn help_explains_every_flag() {
    for (binary, flags) in [
        (
            env!("CARGO_BIN_EXE_client"),
            &["--url", "--queue", "--timeout", "AMQP_URL"][..],
        ),
        (
            env!("CARGO_BIN_EXE_server"),
            &["--url", "--queue", "--workers", "--max-n", "AMQP_URL"][..],
        ),
    ] {
        let output = Command::new(binary).arg("--help").output().unwrap();
        let (stdout, _) = text(&output);
        assert!(output.status.success());
        for flag in flags {
            assert!(
                stdout.contains(flag),
                "{binary} --help lacks {flag}:\n{stdout}"
            );
        }
    }
}

#[test]
fn a_pika_tutorial_client_gets_its_answer_from_our_server() {
    let python = python_with_pika();
    let queue = unique_queue("pika-client");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 2);

    let output = pika_peer(&python, "rpc_client.py", &queue)
        .arg("30")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "pika client failed: {stderr}");
    assert!(stdout.contains(" [.] Got 832040\n"), "{stdout}");
    server.shutdown().unwrap();
}

#[test]
fn our_client_gets_its_answer_from_a_pika_tutorial_server() {
    let python = python_with_pika();
    let queue = unique_queue("pika-server");
    let _guard = QueueGuard(queue.clone());
    let command = pika_peer(&python, "rpc_server.py", &queue);
    let _server = spawn_until_ready(command, "Awaiting RPC requests");

    let client = client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.fib(30).unwrap().to_string(), "832040");

    let output = our_client(&queue, &["20"]);
    assert!(text(&output).0.contains(" [.] Got 6765\n"));

    // The pika server answers direct reply-to without knowing it.
    let output = our_client(&queue, &["--direct-reply-to", "21"]);
    assert!(
        text(&output).0.contains(" [.] Got 10946\n"),
        "{:?}",
        text(&output)
    );
}

/// Reads `calls=K errors=E calls_per_s=X p50_us=Y p99_us=Z` into its five numbers.
fn bench_figures(line: &str) -> [f64; 5] {
    let names = ["calls", "errors", "calls_per_s", "p50_us", "p99_us"];
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), names.len(), "{line:?}");
    let mut figures = [0.0; 5];
    for ((field, name), figure) in fields.iter().zip(names).zip(&mut figures) {
        let (key, value) = field.split_once('=').unwrap();
        assert_eq!(key, name, "{line:?}");
        *figure = value.parse().unwrap();
    }
    figures
}

#[test]
fn the_bench_mode_prints_its_summary_line_last() {
    let queue = unique_queue("bench");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 2);
    let output = our_client(
        &queue,
        &[
            "--bench",
            "--calls",
            "203",
            "--threads",
            "2",
            "--inflight",
            "4",
            "25",
        ],
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let [calls, errors, per_second, p50, p99] = bench_figures(stdout.lines().last().unwrap());
    assert_eq!((calls, errors), (203.0, 0.0));
    assert!(per_second > 0.0 && p50 > 0.0 && p99 >= p50);
    assert!(
        !stderr.contains("calls\r") && !stderr.contains('['),
        "no progress bar off a terminal"
    );
    server.shutdown().unwrap();
}

#[test]
fn the_bench_mode_draws_a_progress_bar_on_a_terminal_when_it_runs_long() {
    let queue = unique_queue("bench-progress");
    let _guard = QueueGuard(queue.clone());
    // Sequential calls of at least 5 ms each: 300 of them last well over the one second after
    // which the bar appears, however fast the machine.
    let server = start_server(&queue, 2, |request: &amqp_rpc::Request| {
        std::thread::sleep(Duration::from_millis(5));
        amqp_rpc::fib::handle_request(request.body(), 100)
    });
    // `script` gives the client a terminal.
    let command = format!(
        "{} --url '{}' --queue '{}' --bench --calls 300 10",
        env!("CARGO_BIN_EXE_client"),
        broker_url(),
        queue
    );
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script (util-linux)");
    let (screen, _) = text(&output);
    assert!(output.status.success(), "{screen}");
    assert!(
        screen.contains("] 300/300 calls"),
        "no finished bar: {screen:?}"
    );
    assert!(screen.contains("calls=300 errors=0"), "{screen:?}");
    server.shutdown().unwrap();
}

#[test]
fn the_bench_mode_counts_errors_instead_of_stopping() {
    let queue = unique_queue("bench-no-server");
    let output = our_client(&queue, &["--bench", "--calls", "7", "25"]);
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    let [calls, errors, ..] = bench_figures(stdout.lines().last().unwrap());
    assert_eq!((calls, errors), (7.0, 7.0));
}
