//! `services_client`: calls both procedures of `examples/services.rs` through one client,
//! showing destinations, headers and typed calls.
//!
//!     cargo run --example services -- --prefix demo &
//!     cargo run --example services_client -- --prefix demo
//!
//! prints
//!
//!     fib(30) = 832040
//!     stats of [1.0, 2.0, 4.5]: count 3, sum 7.5, mean Some(2.5)
//!     stats of []: count 0, sum 0, mean None

use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc::{Call, Client, Destination};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Calls PREFIX.fib and PREFIX.stats.
#[derive(Parser, Debug)]
struct Args {
    /// Broker URL.
    #[arg(long, env = "AMQP_URL", default_value = amqp_rpc::DEFAULT_URL, hide_env_values = true)]
    url: String,

    /// The queues are PREFIX.fib and PREFIX.stats.
    #[arg(long, default_value = "services")]
    prefix: String,
}

#[derive(Serialize)]
struct Numbers<'a> {
    numbers: &'a [f64],
}

#[derive(Deserialize)]
struct Summary {
    count: usize,
    sum: f64,
    mean: Option<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.chain());
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> amqp_rpc::Result<()> {
    // One client for every service: each call names where it goes.
    let client = Client::connect(&args.url)?;

    // The tutorial's wire format, to the queue PREFIX.fib, with metadata added: headers and a
    // type a server may log or route on, and a timeout for this call alone.
    let call = Call::new("30")
        .to(format!("{}.fib", args.prefix))
        .with_header("x-request-origin", "services_client example")
        .with_type("fib")
        .with_timeout(Duration::from_secs(5));
    let reply = client.send(&call)?;
    println!("fib(30) = {}", String::from_utf8_lossy(reply.body()));

    // Typed JSON, through the topic exchange PREFIX: send a Serialize value, read back a
    // Deserialize one.
    let stats = Destination::exchange(&args.prefix, "stats.summary");
    for numbers in [&[1.0, 2.0, 4.5][..], &[]] {
        let call = Call::json(&Numbers { numbers })?.to(stats.clone());
        let summary: Summary = client.send(&call)?.json()?;
        println!(
            "stats of {numbers:?}: count {}, sum {}, mean {:?}",
            summary.count, summary.sum, summary.mean
        );
    }
    client.close()
}
