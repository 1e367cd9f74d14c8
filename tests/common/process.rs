//! Running the binaries and the pika peers as child processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use super::require_broker;

/// A child process that is killed if the test ends without stopping it.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` and waits until it prints `ready_line` on stdout.
pub fn spawn_until_ready(command: Command, ready_line: &str) -> Running {
    spawn_and_read_until(command, ready_line).0
}

/// Starts `command`, waits until it prints `ready_line` on stdout, and returns the lines it
/// printed before.
pub fn spawn_and_read_until(mut command: Command, ready_line: &str) -> (Running, Vec<String>) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the process");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut before = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(ready_line) => break,
            Some(Ok(line)) => before.push(line),
            _ => panic!("the process ended before printing {ready_line:?}"),
        }
    }
    (running, before)
}

/// The stdout and stderr of a finished process, as text.
pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs the `client` binary against `queue` with extra `args`.
pub fn our_client(queue: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", &require_broker(), "--queue", queue])
        .args(args)
        .output()
        .expect("run the client binary")
}

/// The `server` binary, set up to serve `queue` with two workers.
pub fn our_server(queue: &str) -> Command {
    our_server_with_workers(queue, 2)
}

/// The `server` binary, set up to serve `queue` with `workers` workers.
pub fn our_server_with_workers(queue: &str, workers: usize) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_server"));
    command
        .args(["--url", &require_broker(), "--queue", queue])
        .args(["--workers", &workers.to_string()]);
    command
}

/// An example program built by `cargo test` (which builds every example) beside the binaries.
pub fn example(name: &str) -> Command {
    let binaries = std::path::Path::new(env!("CARGO_BIN_EXE_client"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = binaries.join("examples").join(name);
    assert!(
        path.exists(),
        "no example {name} at {}: `cargo test` builds the examples; run it, or \
         `cargo build --examples`, first",
        path.display()
    );
    let mut command = Command::new(path);
    command.args(["--url", &require_broker()]);
    command
}

/// Sends `signal` (as `kill` names it: TERM, INT, KILL) to `child`.
pub fn send_signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}
