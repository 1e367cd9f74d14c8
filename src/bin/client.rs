//! `client`: asks a server for fib(N), as the tutorial's `rpc_client.py`, or benchmarks it.

mod common;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use amqp_rpc::bench::{self, BenchOptions};
use amqp_rpc::{Client, ClientOptions, ReplyRoute, fib};
use clap::Parser;

/// Asks an RPC server on RabbitMQ for fib(N) and prints the answer.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    broker: common::BrokerArgs,

    /// Seconds to wait for a reply before giving up.
    #[arg(long, env = "RPC_TIMEOUT", default_value_t = 10.0, value_parser = parse_seconds)]
    timeout: f64,

    /// Have replies sent through RabbitMQ's direct reply-to (amq.rabbitmq.reply-to) instead of
    /// an exclusive reply queue.
    #[arg(long, env = "RPC_DIRECT_REPLY_TO")]
    direct_reply_to: bool,

    /// Send a request again when its connection is lost before the reply arrives, once
    /// reconnected, within the timeout. Safe for Fibonacci, which is idempotent.
    #[arg(long, env = "RPC_RETRY")]
    retry: bool,

    /// Benchmark instead: make --calls calls of fib(N), check every answer, and print
    /// `slowest_us=S connection_errors=C mismatched=M`, then, last, the summary line
    /// `calls=K errors=E calls_per_s=X p50_us=Y p99_us=Z`.
    #[arg(long)]
    bench: bool,

    /// With --bench: calls in all.
    #[arg(long, default_value_t = 10_000, requires = "bench")]
    calls: usize,

    /// With --bench: threads, each with its own channel on one shared connection, making calls
    /// one after another.
    #[arg(long, default_value_t = 1, requires = "bench")]
    threads: usize,

    /// With --bench: calls each thread keeps in flight at once (sent in batches of this size).
    #[arg(long, default_value_t = 1, requires = "bench")]
    inflight: usize,

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
        queue: args.broker.queue.clone(),
        timeout: Duration::from_secs_f64(args.timeout),
        retry: args.retry,
        reply_route: if args.direct_reply_to {
            ReplyRoute::DirectReplyTo
        } else {
            ReplyRoute::ExclusiveQueue
        },
        ..ClientOptions::default()
    };
    if args.bench {
        return run_bench(&args, &options);
    }
    let mut client = Client::with_options(&args.broker.url_list(), options)?;
    println!(" [x] Requesting fib({})", args.n);
    let answer = client.fib(args.n)?;
    println!(" [.] Got {answer}");
    client.close()
}

fn run_bench(args: &Args, client: &ClientOptions) -> amqp_rpc::Result<()> {
    let options = BenchOptions {
        calls: args.calls,
        threads: args.threads,
        inflight: args.inflight,
        request: args.n.to_string().into_bytes(),
        expected_reply: Some(fib::fib(args.n).to_string().into_bytes()),
    };
    let started = Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let mut drawn = false;
    let report = bench::run(&args.broker.url_list(), client, &options, |done, total| {
        // A progress bar only for runs long enough to wonder about, and only for a person.
        if show_progress && started.elapsed() > Duration::from_secs(1) {
            let filled = done * 40 / total.max(1);
            eprint!(
                "\r[{}{}] {done}/{total} calls",
                "#".repeat(filled),
                " ".repeat(40 - filled)
            );
            let _ = std::io::stderr().flush();
            drawn = true;
        }
    })?;
    if drawn {
        eprintln!();
    }
    println!(
        "slowest_us={} connection_errors={} mismatched={}",
        report.percentile_us(1.0),
        report.connection_errors,
        report.mismatched
    );
    println!("{report}");
    Ok(())
}
