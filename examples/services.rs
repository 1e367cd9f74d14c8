//! `services`: one process serving two procedures on one connection.
//!
//!     cargo run --example services -- --prefix demo
//!
//! - `PREFIX.fib`: the tutorial's Fibonacci, in its wire format (`n` in decimal, fib(n) in
//!   decimal back), so the tutorial's clients in any language can call it;
//! - `PREFIX.stats`: typed JSON, `{"numbers": [1.5, 2.5]}` in, `{"count": 2, "sum": 4.0,
//!   "mean": 2.0}` out (`mean` is `null` for an empty list); its queue is also bound to the
//!   topic exchange `PREFIX` for routing keys `stats.*`, as a nameko-style service would be.
//!
//! Prints ` [x] Awaiting RPC requests` once both queues are consumed; SIGINT or SIGTERM
//! drains both and exits 0. `examples/services_client.rs` and `examples/gateway.rs` call
//! both, each through one client.

mod common;

use std::process::ExitCode;

use amqp_rpc::{Binding, QueueOptions, Request, Server, fib, json};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Serves PREFIX.fib (the tutorial's Fibonacci) and PREFIX.stats (JSON statistics).
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    broker: common::BrokerArgs,

    /// The queues are PREFIX.fib and PREFIX.stats.
    #[arg(long, default_value = "services")]
    prefix: String,

    /// The largest n PREFIX.fib answers.
    #[arg(long, default_value_t = fib::DEFAULT_MAX_N)]
    max_n: u64,
}

/// A `stats` request.
#[derive(Deserialize)]
struct Numbers {
    numbers: Vec<f64>,
}

/// A `stats` reply.
#[derive(Serialize)]
struct Summary {
    count: usize,
    sum: f64,
    mean: Option<f64>,
}

fn summarise(input: Numbers) -> Summary {
    let count = input.numbers.len();
    // `Sum` for floats starts from -0.0, which JSON would show as `-0.0` for an empty list.
    let sum = input
        .numbers
        .iter()
        .fold(0.0, |total, number| total + number);
    Summary {
        count,
        sum,
        mean: (count > 0).then(|| sum / count as f64),
    }
}

fn main() -> ExitCode {
    common::main_with(|| {
        let args = Args::parse();
        let signals = common::signals()?;
        let max_n = args.max_n;
        let server = Server::builder(&args.broker.url)
            .serve(
                format!("{}.fib", args.prefix),
                QueueOptions::with_workers(4),
                move |request: &Request| fib::serve(request, max_n),
            )
            .serve(
                format!("{}.stats", args.prefix),
                QueueOptions {
                    bindings: vec![Binding::topic(&args.prefix, "stats.*")],
                    ..QueueOptions::with_workers(2)
                },
                json::handler(|input: Numbers, _: &Request| Ok(summarise(input))),
            )
            .start()?;
        common::serve_until_signalled(server, signals)
    })
}
