//! `client`: asks a server for fib(N), as the tutorial's `rpc_client.py`, calls any other
//! service with `--body`, or benchmarks a server with `--bench`.

mod bench;
#[path = "../common/mod.rs"]
mod common;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use amqp_rpc::{Call, Client, ClientOptions, Destination, ReplyRoute, fib};
use bench::BenchOptions;
use clap::Parser;

/// Asks an RPC server on RabbitMQ for fib(N) and prints the answer; with --body, sends any
/// request and prints the reply body as it is.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    broker: common::BrokerArgs,

    /// The server queue. With --bench, give it several times (RPC_QUEUE: comma-separated) to
    /// spread the calls over several queues from one client, each reported on its own line.
    #[arg(
        long = "queue",
        env = "RPC_QUEUE",
        default_value = amqp_rpc::DEFAULT_QUEUE,
        value_delimiter = ','
    )]
    queues: Vec<String>,

    /// Call through this exchange instead of a queue, with --routing-key.
    #[arg(long, env = "RPC_EXCHANGE", requires = "routing_key")]
    exchange: Option<String>,

    /// With --exchange: the routing key of the calls.
    #[arg(long, env = "RPC_ROUTING_KEY", requires = "exchange")]
    routing_key: Option<String>,

    /// Seconds to wait for a reply before giving up; connecting takes at most as long (and at
    /// most 5).
    #[arg(long, env = "RPC_TIMEOUT", default_value_t = 10.0, value_parser = common::parse_seconds)]
    timeout: f64,

    /// The largest reply accepted, in bytes; a Fibonacci call accepts at least fib(N)'s digits.
    #[arg(long, env = "RPC_MAX_REPLY", value_name = "BYTES", default_value_t = amqp_rpc::DEFAULT_MAX_REPLY)]
    max_reply: usize,

    /// Seconds after which a call still unanswered asks the broker whether any server consumes
    /// the queue; if none does, then nor a second later, the call fails. 0 turns the check off.
    #[arg(long, env = "RPC_NO_SERVER_GRACE", default_value_t = 1.0, value_parser = parse_grace)]
    no_server_grace: f64,

    /// Have replies sent through RabbitMQ's direct reply-to (amq.rabbitmq.reply-to) instead of
    /// an exclusive reply queue.
    #[arg(long, env = "RPC_DIRECT_REPLY_TO")]
    direct_reply_to: bool,

    /// Send a request again when its connection is lost before the reply arrives, once
    /// reconnected, within the timeout. Safe for Fibonacci, which is idempotent.
    #[arg(long, env = "RPC_RETRY")]
    retry: bool,

    /// Benchmark instead: make --calls calls of fib(N), check every answer, and print
    /// `slowest_us=S connection_errors=C mismatched=M elapsed_ms=T`, the client's statistics
    /// (`stats: calls=... replies=... timeouts=...`), then, last, the summary line
    /// `calls=K errors=E calls_per_s=X p50_us=Y p99_us=Z`.
    #[arg(long)]
    bench: bool,

    /// With --bench: calls in all.
    #[arg(long, default_value_t = 10_000, requires = "bench")]
    calls: usize,

    /// With --bench: threads, all calling through one shared client (one connection, one
    /// channel), each making its calls one after another.
    #[arg(long, default_value_t = 1, requires = "bench")]
    threads: usize,

    /// With --bench: calls each thread keeps in flight at once (sent in batches of this size).
    #[arg(long, default_value_t = 1, requires = "bench")]
    inflight: usize,

    /// Accept replies only from servers running as this broker user (their verified user_id);
    /// replies from anyone else are dropped and logged at warn.
    #[arg(long, env = "RPC_SERVER_USER", value_name = "NAME")]
    server_user: Option<String>,

    /// Send TEXT as the request body instead of a Fibonacci request, and print the reply body
    /// as it is.
    #[arg(long, value_name = "TEXT", conflicts_with = "bench")]
    body: Option<String>,

    /// With --body: a request header, NAME=VALUE (a string); repeat for more.
    #[arg(long = "header", value_name = "NAME=VALUE", requires = "body", value_parser = parse_header)]
    headers: Vec<(String, String)>,

    /// With --body: the request's content type (such as application/json).
    #[arg(long, value_name = "TYPE", requires = "body")]
    content_type: Option<String>,

    /// Which Fibonacci number to ask for (a non-negative integer).
    #[arg(
        allow_negative_numbers = true,
        required_unless_present = "body",
        conflicts_with = "body"
    )]
    n: Option<u64>,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not NAME=VALUE")),
    }
}

fn parse_grace(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(0.0) => Ok(0.0),
        _ => common::parse_seconds(text),
    }
}

fn main() -> ExitCode {
    common::main_with("warn", || run(Args::parse()))
}

fn run(args: Args) -> amqp_rpc::Result<()> {
    let timeout = common::seconds(args.timeout);
    let connect = amqp_rpc::ConnectOptions::default();
    if args.queues.len() > 1 && !args.bench {
        return Err(amqp_rpc::Error::Config(
            "several --queue are for --bench; a call goes to one".into(),
        ));
    }
    let options = ClientOptions {
        queue: args.queues[0].clone(),
        timeout,
        no_server_grace: common::seconds(args.no_server_grace),
        server_user: args.server_user.clone(),
        // The reply to fib(N) is N / 4.8 bytes: `client N` works for every N a server takes.
        max_reply: match (args.n, &args.body) {
            (Some(n), None) => args.max_reply.max(fib::reply_size(n)),
            _ => args.max_reply,
        },
        connect: amqp_rpc::ConnectOptions {
            tls: args.broker.tls(),
            // A broker that takes the connection and never speaks holds the command no
            // longer than its timeout.
            connect_timeout: connect.connect_timeout.min(timeout),
            ..connect
        },
        retry: args.retry,
        reply_route: if args.direct_reply_to {
            ReplyRoute::DirectReplyTo
        } else {
            ReplyRoute::ExclusiveQueue
        },
        ..ClientOptions::default()
    };
    match (&args.body, args.n) {
        (Some(body), _) => call_any(&args, body, options),
        (None, Some(n)) if args.bench => run_bench(&args, n, &options),
        (None, Some(n)) => call_fib(&args, n, options),
        (None, None) => unreachable!("clap requires N without --body"),
    }
}

/// Where the calls go: the exchange, or each queue given.
fn destinations(args: &Args) -> Vec<Destination> {
    match (&args.exchange, &args.routing_key) {
        (Some(exchange), Some(key)) => vec![Destination::exchange(exchange, key)],
        _ => args.queues.iter().map(Destination::queue).collect(),
    }
}

/// The tutorial's client: asks for fib(n) and prints it.
fn call_fib(args: &Args, n: u64, options: ClientOptions) -> amqp_rpc::Result<()> {
    let client = Client::with_options(&args.broker.url_list(), options)?;
    println!(" [x] Requesting fib({n})");
    let call = Call::new(n.to_string()).to(destinations(args).remove(0));
    let reply = client.send(&call)?;
    let answer = fib::parse_reply(reply.body())?;
    println!(" [.] Got {answer}");
    client.close()
}

/// Sends `body` with the headers and content type given, and prints the reply body as it is.
fn call_any(args: &Args, body: &str, options: ClientOptions) -> amqp_rpc::Result<()> {
    let client = Client::with_options(&args.broker.url_list(), options)?;
    let mut call = Call::new(body).to(destinations(args).remove(0));
    for (name, value) in &args.headers {
        call = call.with_header(name.as_str(), value.as_str());
    }
    if let Some(content_type) = &args.content_type {
        call = call.with_content_type(content_type.as_str());
    }
    let reply = client.send(&call)?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(reply.body())
        .and_then(|()| stdout.flush())
        .map_err(|e| amqp_rpc::Error::Config(format!("cannot write the reply: {e}")))?;
    client.close()
}

fn run_bench(args: &Args, n: u64, client: &ClientOptions) -> amqp_rpc::Result<()> {
    let options = BenchOptions {
        calls: args.calls,
        threads: args.threads,
        inflight: args.inflight,
        request: n.to_string().into_bytes(),
        expected_reply: Some(fib::fib_decimal(n)),
        destinations: destinations(args),
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
        "slowest_us={} connection_errors={} mismatched={} elapsed_ms={}",
        report.percentile_us(1.0),
        report.connection_errors,
        report.mismatched,
        report.elapsed.as_millis()
    );
    println!("{}", stats_line(&report.stats));
    for (destination, each) in &report.destinations {
        println!(
            "destination={destination:?} {each}",
            destination = destination.to_string()
        );
    }
    println!("{report}");
    Ok(())
}

/// The client's statistics on one line of `name=value` fields.
fn stats_line(stats: &amqp_rpc::ClientStats) -> String {
    let errors = &stats.errors;
    let micros = |latency: Duration| latency.as_micros();
    format!(
        "stats: calls={} replies={} errors={} timeouts={} no_route={} no_server={} \
         remote_errors={} connection_lost={} overloaded={} late_replies={} stray_replies={} \
         retries={} reconnections={} latency_p50_us={} latency_p90_us={} latency_p99_us={} \
         latency_max_us={}",
        stats.calls,
        stats.replies,
        errors.total(),
        errors.timeout,
        errors.no_route,
        errors.no_server,
        errors.remote.total(),
        errors.connection_lost,
        errors.overloaded,
        stats.late_replies,
        stats.stray_replies,
        stats.retries,
        stats.reconnections,
        micros(stats.latency.p50),
        micros(stats.latency.p90),
        micros(stats.latency.p99),
        micros(stats.latency.max),
    )
}
