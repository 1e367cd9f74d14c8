//! `server`: answers Fibonacci requests on a RabbitMQ queue, as the tutorial's `rpc_server.py`.

mod common;

use std::io::Write;
use std::process::ExitCode;

use amqp_rpc::{
    Binding, ExchangeKind, QueueOptions, QueueType, Request, Server, ServerOptions, fib,
};
use clap::Parser;
use log::debug;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Answers Fibonacci requests (n in decimal, fib(n) in decimal back) on a RabbitMQ queue.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    broker: common::BrokerArgs,

    /// The queue to serve.
    #[arg(long, env = "RPC_QUEUE", default_value = amqp_rpc::DEFAULT_QUEUE)]
    queue: String,

    /// Also bind the queue to EXCHANGE for requests with routing key KEY (a pattern, for a
    /// topic exchange); repeatable. The server declares the exchange (durable, of
    /// --exchange-type) and the binding.
    #[arg(long = "bind", value_name = "EXCHANGE:KEY", value_parser = parse_binding)]
    bindings: Vec<(String, String)>,

    /// The kind of exchange --bind declares.
    #[arg(long, value_enum, default_value_t = ExchangeArg::Topic)]
    exchange_type: ExchangeArg,

    /// Worker threads, each with its own channel [default: two per CPU core, at least 4].
    #[arg(long, env = "RPC_WORKERS")]
    workers: Option<usize>,

    /// Unacknowledged requests each worker may hold (AMQP prefetch); 1 keeps a slow request
    /// from holding others back.
    #[arg(long, env = "RPC_PREFETCH", default_value_t = 1)]
    prefetch: u16,

    /// The kind of queue to declare: classic (as the tutorial) or quorum (replicated across a
    /// cluster's nodes; survives losing a minority of them).
    #[arg(long, env = "RPC_QUEUE_TYPE", value_enum, default_value_t = QueueKind::Classic)]
    queue_type: QueueKind,

    /// Deliveries without an answer (its servers died handling it) after which a request is
    /// answered with an error instead of running again, on classic and quorum queues; 0 for no
    /// limit.
    #[arg(long, env = "RPC_DELIVERY_LIMIT", default_value_t = 5)]
    delivery_limit: u32,

    /// Quorum queues: the exchange that receives requests dropped by the delivery limit.
    #[arg(long, env = "RPC_DEAD_LETTER_EXCHANGE")]
    dead_letter_exchange: Option<String>,

    /// Quorum queues: the routing key for dead-lettered requests [default: their own].
    #[arg(long, env = "RPC_DEAD_LETTER_ROUTING_KEY")]
    dead_letter_routing_key: Option<String>,

    /// Largest n answered; larger requests get an error reply.
    #[arg(long, env = "RPC_MAX_N", default_value_t = fib::DEFAULT_MAX_N)]
    max_n: u64,

    /// AMQP heartbeat in seconds (0 turns it off): a dead broker is noticed after about two.
    #[arg(long, default_value_t = 10)]
    heartbeat: u16,

    /// Largest request body served, in bytes; larger ones get a bad-request error reply.
    #[arg(long, env = "RPC_MAX_BODY", default_value_t = amqp_rpc::DEFAULT_MAX_BODY)]
    max_body: usize,

    /// Also answer requests whose reply_to is NAME (or starts with PREFIX, given as PREFIX*);
    /// repeatable. Server-named queues and direct reply-to are always answered.
    #[arg(long = "allow-reply-to", value_name = "PATTERN")]
    allow_reply_to: Vec<String>,

    /// Serve /metrics (Prometheus) and /health (200 while serving) over HTTP on HOST:PORT;
    /// port 0 picks a free one, printed at start-up.
    #[arg(long, env = "RPC_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,

    /// Seconds that SIGTERM/SIGINT lets in-flight requests finish; those still running then go
    /// back to the queue.
    #[arg(long, env = "RPC_DRAIN_TIMEOUT", default_value_t = 30.0, value_parser = common::parse_seconds)]
    drain_timeout: f64,
}

/// `--exchange-type` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ExchangeArg {
    Topic,
    Direct,
    Fanout,
    Headers,
}

fn parse_binding(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((exchange, key)) if !exchange.is_empty() => {
            Ok((exchange.to_string(), key.to_string()))
        }
        _ => Err(format!(
            "'{text}' is not EXCHANGE:KEY (an exchange's name, a colon, a key)"
        )),
    }
}

/// `--queue-type` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum QueueKind {
    Classic,
    Quorum,
}

fn main() -> ExitCode {
    common::main_with("info", || run(Args::parse()))
}

fn run(args: Args) -> amqp_rpc::Result<()> {
    let queue_options = QueueOptions {
        workers: args.workers.unwrap_or_else(amqp_rpc::default_workers),
        prefetch: args.prefetch,
        queue_type: match args.queue_type {
            QueueKind::Classic => QueueType::Classic,
            QueueKind::Quorum => QueueType::Quorum,
        },
        delivery_limit: (args.delivery_limit > 0).then_some(args.delivery_limit),
        dead_letter_exchange: args.dead_letter_exchange,
        dead_letter_routing_key: args.dead_letter_routing_key,
        max_body: args.max_body,
        reply_to: amqp_rpc::DEFAULT_REPLY_TO
            .map(String::from)
            .into_iter()
            .chain(args.allow_reply_to)
            .collect(),
        bindings: args
            .bindings
            .into_iter()
            .map(|(exchange, routing_key)| Binding {
                exchange,
                routing_key,
                kind: match args.exchange_type {
                    ExchangeArg::Topic => ExchangeKind::Topic,
                    ExchangeArg::Direct => ExchangeKind::Direct,
                    ExchangeArg::Fanout => ExchangeKind::Fanout,
                    ExchangeArg::Headers => ExchangeKind::Headers,
                },
            })
            .collect(),
    };
    let mut options = ServerOptions {
        drain_timeout: common::seconds(args.drain_timeout),
        metrics_addr: args.metrics_addr,
        ..ServerOptions::default()
    };
    options.connect.heartbeat = args.heartbeat;
    options.connect.tls = args.broker.tls();
    // Installed first, so that a signal during start-up is not lost: it stops the server as
    // soon as it has started.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| amqp_rpc::Error::Config(format!("cannot install signal handlers: {e}")))?;
    let max_n = args.max_n;
    let server = Server::builder(&args.broker.url_list())
        .options(options)
        .serve(&args.queue, queue_options, move |request: &Request| {
            debug!(
                " [.] fib({})",
                String::from_utf8_lossy(request.body()).trim()
            );
            fib::handle_request(request.body(), max_n)
        })
        .start()?;
    // A closed stdout (a supervisor that stopped reading) must not stop a running server.
    let mut stdout = std::io::stdout();
    if let Some(address) = server.metrics_addr() {
        let _ = writeln!(stdout, " [x] Metrics on http://{address}/metrics");
    }
    let _ = writeln!(stdout, " [x] Awaiting RPC requests");
    let _ = stdout.flush();

    let shutdown = server.shutdown_handle();
    std::thread::spawn(move || {
        let mut received = signals.forever();
        if received.next().is_some() {
            shutdown.shutdown();
        }
        if let Some(signal) = received.next() {
            eprintln!("second signal: exiting without waiting for in-flight requests");
            std::process::exit(128 + signal);
        }
    });
    server.wait()
}
