//! `gateway`: a front end whose pool of threads answers its own requests by calling two
//! back-end services, all through one shared client: one connection, one channel and one
//! reply queue, however many threads call and whichever service they call.
//!
//!     cargo run --example services -- --prefix demo &
//!     printf 'fib 30\nstats 1 2 4.5\nfib 90\n' | cargo run --example gateway -- --prefix demo
//!
//! Each line of its input is one request to the gateway: `fib N` (answered by the queue
//! `PREFIX.fib`) or `stats X Y...` (answered through the topic exchange `PREFIX`, routing key
//! `stats.summary`). The threads take the requests as they come and answer each on its own
//! line, in input order:
//!
//!     1 fib 30: 832040
//!     2 stats 1 2 4.5: count 3, mean 2.5
//!     3 fib 90: 2880067194370816120
//!
//! A request the gateway cannot answer gets its error on its line; the others are unharmed.

use std::io::BufRead;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use amqp_rpc::{Call, Client, ClientOptions, Destination};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Answers `fib N` and `stats X Y...` lines from stdin by calling PREFIX.fib and PREFIX's
/// stats.summary, from a pool of threads sharing one client.
#[derive(Parser, Debug)]
struct Args {
    /// Broker URL.
    #[arg(long, env = "AMQP_URL", default_value = amqp_rpc::DEFAULT_URL, hide_env_values = true)]
    url: String,

    /// The services are the queue PREFIX.fib and the topic exchange PREFIX.
    #[arg(long, default_value = "services")]
    prefix: String,

    /// Threads answering requests.
    #[arg(long, default_value_t = 8)]
    threads: usize,

    /// Seconds a back-end call may take.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Serialize)]
struct Numbers {
    numbers: Vec<f64>,
}

#[derive(Deserialize)]
struct Summary {
    count: usize,
    mean: Option<f64>,
}

/// Where each back-end service is.
struct Services {
    fib: Destination,
    stats: Destination,
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
    let options = ClientOptions {
        timeout: Duration::from_secs(args.timeout),
        ..ClientOptions::default()
    };
    let client = Client::with_options(&args.url, options)?;
    let services = std::sync::Arc::new(Services {
        fib: Destination::queue(format!("{}.fib", args.prefix)),
        stats: Destination::exchange(&args.prefix, "stats.summary"),
    });
    let (requests, taken) = crossbeam_channel::unbounded::<(usize, String)>();
    let (answers, answered) = crossbeam_channel::unbounded::<(usize, String)>();
    let pool: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let (client, services) = (client.clone(), std::sync::Arc::clone(&services));
            let (taken, answers) = (taken.clone(), answers.clone());
            thread::spawn(move || {
                for (number, line) in taken {
                    let answer = answer(&client, &services, &line)
                        .unwrap_or_else(|error| format!("error: {error}"));
                    let _ = answers.send((number, format!("{number} {line}: {answer}")));
                }
            })
        })
        .collect();
    drop(answers);
    for (number, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| amqp_rpc::Error::Config(format!("cannot read stdin: {e}")))?;
        let _ = requests.send((number + 1, line.trim().to_string()));
    }
    drop(requests);
    let mut lines: Vec<(usize, String)> = answered.iter().collect();
    lines.sort();
    for (_, line) in lines {
        println!("{line}");
    }
    for thread in pool {
        let _ = thread.join();
    }
    client.close()
}

/// Answers one request line by calling the service it names.
fn answer(client: &Client, services: &Services, line: &str) -> amqp_rpc::Result<String> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("fib") => {
            let n = words.next().unwrap_or_default();
            let reply = client.send(&Call::new(n).to(services.fib.clone()))?;
            Ok(String::from_utf8_lossy(reply.body()).into_owned())
        }
        Some("stats") => {
            let numbers = words
                .map(|word| word.parse::<f64>())
                .collect::<Result<Vec<f64>, _>>()
                .map_err(|e| amqp_rpc::Error::InvalidRequest(format!("not a number: {e}")))?;
            let call = Call::json(&Numbers { numbers })?.to(services.stats.clone());
            let summary: Summary = client.send(&call)?.json()?;
            Ok(match summary.mean {
                Some(mean) => format!("count {}, mean {mean}", summary.count),
                None => format!("count {}, no mean", summary.count),
            })
        }
        _ => Err(amqp_rpc::Error::InvalidRequest(format!(
            "'{line}' is neither fib N nor stats X Y..."
        ))),
    }
}
