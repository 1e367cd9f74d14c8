//! What the serving examples share: the broker flag, logging, and serving until a signal.

use std::io::Write;
use std::process::ExitCode;

use amqp_rpc::Server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Where the broker is.
#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// Broker URL (amqp://user:password@host:port/vhost); several, comma-separated, for a
    /// cluster's nodes.
    #[arg(long, env = "AMQP_URL", default_value = amqp_rpc::DEFAULT_URL, hide_env_values = true)]
    pub url: String,
}

/// Logs to stderr (`RUST_LOG`, else warnings), runs `run`, and reports its error as
/// `error: ...` with a failing exit code.
pub fn main_with(run: impl FnOnce() -> amqp_rpc::Result<()>) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        // amiquip logs the handshake, password included, at debug: keep it out.
        .filter_module(
            amqp_rpc::AMIQUIP_HANDSHAKE_LOG_TARGET,
            log::LevelFilter::Info,
        )
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.chain());
            ExitCode::FAILURE
        }
    }
}

/// Prints the tutorial's ready line, then serves until SIGINT or SIGTERM, after which the
/// server drains its in-flight requests and this returns.
///
/// `signals` must be installed before the server starts, so that none is lost during start-up.
pub fn serve_until_signalled(server: Server, mut signals: Signals) -> amqp_rpc::Result<()> {
    // A closed stdout must not stop a running server.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, " [x] Awaiting RPC requests");
    let _ = stdout.flush();
    let shutdown = server.shutdown_handle();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            shutdown.shutdown();
        }
    });
    server.wait()
}

/// Installs the SIGINT and SIGTERM handlers.
pub fn signals() -> amqp_rpc::Result<Signals> {
    Signals::new([SIGINT, SIGTERM])
        .map_err(|e| amqp_rpc::Error::Config(format!("cannot install signal handlers: {e}")))
}
