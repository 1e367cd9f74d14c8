//! `client`: asks a server for fib(N), as the tutorial's `rpc_client.py`.

mod common;

use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc::{Client, ClientOptions};
use clap::Parser;

/// Asks an RPC server on RabbitMQ for fib(N) and prints the answer.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    broker: common::BrokerArgs,

    /// Seconds to wait for the reply before giving up.
    #[arg(long, env = "RPC_TIMEOUT", default_value_t = 10.0, value_parser = parse_seconds)]
    timeout: f64,

    /// Which Fibonacci number to ask for (a non-negative integer).
    #[arg(allow_negative_numbers = true)]
    n: u64,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(seconds),
        _ => Err(format!("'{text}' is not a positive number of seconds")),
    }
}

fn main() -> ExitCode {
    common::main_with("warn", || run(Args::parse()))
}

fn run(args: Args) -> amqp_rpc::Result<()> {
    let options = ClientOptions {
        queue: args.broker.queue,
        timeout: Duration::from_secs_f64(args.timeout),
        ..ClientOptions::default()
    };
    let mut client = Client::with_options(&args.broker.url, options)?;
    println!(" [x] Requesting fib({})", args.n);
    let answer = client.fib(args.n)?;
    println!(" [.] Got {answer}");
    client.close()
}
