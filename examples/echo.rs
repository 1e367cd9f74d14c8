//! `echo`: serves a queue with a handler that describes, as JSON, each request it gets.
//!
//!     cargo run --example echo -- --queue echo
//!
//! The reply body is one JSON object with the keys `body` (lossy UTF-8), `headers` (each
//! header's value rendered as a string), `content_type`, `content_encoding`, `correlation_id`,
//! `message_id`, `type`, `app_id`, `user_id`, `redelivered` and `queue` (`null` where absent).
//! The reply's content type is `application/json`, and it carries back, as its own headers,
//! every request header whose name starts with `x-echo-`. SIGINT or SIGTERM drains and exits 0.

mod common;

use std::process::ExitCode;

use amqp_rpc::{HandlerError, QueueOptions, Reply, Request, Server};
use clap::Parser;
use serde_json::{Map, Value, json};

/// Answers every request on a queue with a JSON description of it.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    broker: common::BrokerArgs,

    /// The queue to serve.
    #[arg(long, env = "RPC_QUEUE")]
    queue: String,
}

fn main() -> ExitCode {
    common::main_with(|| {
        let args = Args::parse();
        let signals = common::signals()?;
        let server = Server::builder(&args.broker.url)
            .serve(&args.queue, QueueOptions::default(), describe)
            .start()?;
        common::serve_until_signalled(server, signals)
    })
}

fn describe(request: &Request) -> Result<Reply, HandlerError> {
    let headers: Map<String, Value> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), Value::String(value.to_string())))
        .collect();
    let description = json!({
        "body": String::from_utf8_lossy(request.body()),
        "headers": headers,
        "content_type": request.content_type(),
        "content_encoding": request.content_encoding(),
        "correlation_id": request.correlation_id(),
        "message_id": request.message_id(),
        "type": request.message_type(),
        "app_id": request.app_id(),
        "user_id": request.user_id(),
        "redelivered": request.is_redelivered(),
        "queue": request.queue(),
    });
    let mut reply = Reply::from_json(&description)?;
    for (name, value) in request.headers().iter() {
        if name.starts_with("x-echo-") {
            reply = reply.with_header(name, value.clone());
        }
    }
    Ok(reply)
}
