//! Interoperability with the RabbitMQ tutorial's pika peers, and the binaries end to end.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use amqp_rpc::{Client, ClientOptions};
use common::{
    QueueGuard, broker_url, pika_script, python_with_pika, require_broker, start_fib_server,
    unique_queue,
};

/// A child process that is killed if the test ends without stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` and waits until it prints `ready_line` on stdout.
fn spawn_until_ready(mut command: Command, ready_line: &str) -> Running {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the process");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(ready_line) => break,
            Some(Ok(_)) => continue,
            _ => panic!("the process ended before printing {ready_line:?}"),
        }
    }
    running
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn our_client(queue: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", &require_broker(), "--queue", queue])
        .args(args)
        .output()
        .expect("run the client binary")
}

fn our_server(queue: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_server"));
    command.args([
        "--url",
        &require_broker(),
        "--queue",
        queue,
        "--workers",
        "2",
    ]);
    command
}

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

    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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

    let output = Command::new(python)
        .args([&pika_script("rpc_client.py"), &broker_url(), &queue, "30"])
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
    let mut command = Command::new(python);
    command.args([&pika_script("rpc_server.py"), &broker_url(), &queue]);
    let _server = spawn_until_ready(command, "Awaiting RPC requests");

    let options = ClientOptions {
        queue: queue.clone(),
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let mut client = Client::with_options(&require_broker(), options).unwrap();
    assert_eq!(client.fib(30).unwrap().to_string(), "832040");

    let output = our_client(&queue, &["20"]);
    assert!(text(&output).0.contains(" [.] Got 6765\n"));
}
