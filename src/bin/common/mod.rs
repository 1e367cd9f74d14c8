//! What both binaries do around their work: set up logging, report errors, pick an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The flags that say which broker to use and how, shared by both binaries.
#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// Broker URL: amqp://user:password@host:port/vhost (amqps:// for TLS) [default: the
    /// local broker's default vhost, as guest]. Give it several times (AMQP_URL:
    /// comma-separated) for the nodes of a cluster: the first that answers is used, and after
    /// a connection loss whichever answers next.
    // Neither the default nor AMQP_URL's value is shown in --help: both hold a password.
    #[arg(
        long = "url",
        env = "AMQP_URL",
        default_value = amqp_rpc::DEFAULT_URL,
        hide_default_value = true,
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub urls: Vec<String>,

    /// amqps://: a PEM file of the CA that signed the broker's certificate, trusted besides
    /// the system's.
    #[arg(long, env = "AMQP_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// amqps://: this client's certificate (PEM), for brokers that demand one.
    #[arg(long, env = "AMQP_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// amqps://: the private key of --tls-cert, PEM in PKCS#8 form (BEGIN PRIVATE KEY).
    #[arg(long, env = "AMQP_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// amqps://: authenticate with SASL EXTERNAL, as the user the client certificate names,
    /// instead of the URL's user and password.
    #[arg(long, env = "AMQP_TLS_EXTERNAL", requires = "tls_cert")]
    pub tls_external: bool,

    /// With --tls-external: the user the broker takes from the client certificate (its CN
    /// with RabbitMQ's ssl_cert_login_from = common_name), for requests and replies to carry
    /// as user_id; the broker confirms it at connect.
    #[arg(
        long,
        env = "AMQP_TLS_EXTERNAL_USER",
        value_name = "NAME",
        requires = "tls_external"
    )]
    pub tls_external_user: Option<String>,
}

impl BrokerArgs {
    /// The TLS settings of these flags.
    pub fn tls(&self) -> amqp_rpc::TlsOptions {
        amqp_rpc::TlsOptions {
            ca_file: self.tls_ca.clone(),
            cert_file: self.tls_cert.clone(),
            key_file: self.tls_key.clone(),
            external_auth: self.tls_external,
            external_user: self.tls_external_user.clone(),
        }
    }

    /// The URLs as the library takes them: separated by commas.
    pub fn url_list(&self) -> String {
        self.urls.join(",")
    }
}

/// Parses a positive number of seconds (`0.5`, `30`, `1e20`).
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(seconds),
        _ => Err(format!("'{text}' is not a positive number of seconds")),
    }
}

/// A number of seconds from [`parse_seconds`] as a duration; more than a `Duration` holds
/// counts as forever.
pub fn seconds(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

/// Sets up `env_logger` (`RUST_LOG`, else `default_level`), runs `run`, and reports its error as
/// `error: message: cause...` on stderr with a failing exit code.
pub fn main_with(default_level: &str, run: impl FnOnce() -> amqp_rpc::Result<()>) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        // amiquip logs the handshake's StartOk frame, the password included, at debug: never
        // let it through, whatever RUST_LOG says.
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
