//! Opening a tuned AMQP connection from a URL, and closing it within a bound.
//!
//! amiquip's own `Connection::insecure_open` leaves Nagle's algorithm on, which stalls every
//! request/reply exchange for about 40 ms on delayed ACKs. Here the TCP stream is opened by hand
//! with `TCP_NODELAY` and a connect timeout, then handed to amiquip, with or without TLS (see
//! `docs/amiquip.md`). Only [`ConnectOptions`] and [`DEFAULT_URL`] are public; the rest is
//! plumbing for the client and the server.

use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Auth, Connection, ConnectionOptions, ConnectionTuning, Publish};

use crossbeam_channel::RecvTimeoutError;
use log::{debug, warn};

pub(crate) use crate::broker_url::without_password;
use crate::broker_url::{BrokerAddress, ServerName, UrlParams, url_for_display};
use crate::error::{Error, Result};
use crate::headers::MAX_HEADER_DEPTH;
use crate::inbound::{CheckedStream, Transport};

/// The log target under which amiquip logs the AMQP handshake at debug, including the
/// `StartOk` frame with the PLAIN response, **password included**. A program that sets up its
/// own logger must keep this target at `info` or above, whatever level it allows elsewhere:
/// `env_logger::Builder::filter_module(AMIQUIP_HANDSHAKE_LOG_TARGET, LevelFilter::Info)`.
/// This crate's binaries and examples do.
pub const AMIQUIP_HANDSHAKE_LOG_TARGET: &str = "amiquip::io_loop::handshake_state";

/// The URL used when none is given: the local broker's default vhost, as guest.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// TLS settings for `amqps://` URLs, beyond the system's trusted certificate authorities.
/// The broker's certificate and host name are always verified.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// A PEM file of the certificate authority that signed the broker's certificate, trusted
    /// besides the system's (a private CA). Default: `None`.
    pub ca_file: Option<PathBuf>,
    /// A PEM file of this client's certificate, for brokers that demand one (mutual TLS).
    /// Default: `None`.
    pub cert_file: Option<PathBuf>,
    /// The PEM file of [`TlsOptions::cert_file`]'s private key, in PKCS#8 form (`-----BEGIN
    /// PRIVATE KEY-----`; `openssl pkcs8 -topk8 -nocrypt` converts an RSA key). Default:
    /// `None`.
    pub key_file: Option<PathBuf>,
    /// Authenticate with SASL EXTERNAL: the broker takes the user from the client
    /// certificate (RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin); the URL's user and
    /// password are not sent. Needs [`TlsOptions::cert_file`]. Default: `false`, PLAIN.
    pub external_auth: bool,
    /// With [`TlsOptions::external_auth`]: the user the broker takes from the client
    /// certificate, which this crate cannot tell by itself (with RabbitMQ's
    /// `ssl_cert_login_from = common_name`, the certificate's CN; by default, its whole
    /// distinguished name). When set, requests and replies carry it as `user_id`, as they
    /// carry the URL's user with PLAIN, so that handlers see who called
    /// ([`Request::user_id`]) and clients can check [`ClientOptions::server_user`]. The broker
    /// is asked once, at connect, whether it is the connection's user: a wrong name fails
    /// there with [`Error::Config`], whose message has the broker's answer. Default: `None`,
    /// no `user_id` with EXTERNAL.
    ///
    /// [`Request::user_id`]: crate::Request::user_id
    /// [`ClientOptions::server_user`]: crate::ClientOptions::server_user
    pub external_user: Option<String>,
}

/// How to open a connection, beyond what the URL says.
///
/// A broker URL may say some of these itself, in its query, as RabbitMQ's "URI Query
/// Parameters" guide lists them: `heartbeat` (seconds), `connection_timeout` (milliseconds),
/// `channel_max`, `frame_max`, `auth_mechanism` (`plain` or `external`), and for `amqps://`
/// `cacertfile`, `certfile`, `keyfile`, `verify` (`verify_peer`, or `verify_none`, which
/// checks no certificate) and `server_name_indication` (the name to check the certificate
/// against and send, or `disable`). What the URL says wins over these options, and over the
/// binaries' flags, for connections to that broker. A parameter this crate does not know, or
/// a value it cannot read, is an [`Error::Config`] that names it.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// How long to wait for the TCP connection and for the AMQP handshake, and again for the
    /// broker's answers while a client sets up its channel and reply queue, or a server its
    /// queues and workers. Default: 5 s.
    pub connect_timeout: Duration,
    /// AMQP heartbeat interval in seconds; a silent peer is noticed after about two intervals.
    /// 0 disables heartbeats. Default: 10.
    pub heartbeat: u16,
    /// The name the connection shows in the broker's management tools. Default: the crate name.
    pub connection_name: String,
    /// TLS settings for `amqps://` URLs.
    pub tls: TlsOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            heartbeat: 10,
            connection_name: env!("CARGO_PKG_NAME").to_string(),
            tls: TlsOptions::default(),
        }
    }
}

/// An open connection, and the user it authenticated as: the `user_id` that the broker lets
/// its messages carry. With EXTERNAL authentication, where the broker takes the user from the
/// client certificate, [`TlsOptions::external_user`] (confirmed by the broker) or `None`.
pub(crate) struct Connected {
    pub(crate) connection: Connection,
    /// The connection's own TCP socket, for [`close`] to cut.
    pub(crate) socket: TcpStream,
    pub(crate) user: Option<String>,
    /// The broker's address, without credentials, for messages.
    pub(crate) addr: String,
}

/// How long [`close`] waits for the broker to confirm before it cuts the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Closes `connection`, waiting at most [`CLOSE_WAIT`] for the broker to confirm; past it,
/// shuts down `socket` (the connection's own), which ends amiquip's I/O thread and the close
/// with it. A broker that blocks the connection for a resource alarm reads nothing from it,
/// the close included, and would otherwise keep the closing thread (a client dropped, a
/// server shutting down) until the alarm clears. The close runs on a short-lived thread of
/// its own, since amiquip's close has no timeout.
///
/// # Errors
///
/// [`Error::ConnectionLost`] or [`Error::Amqp`] when the broker does not confirm the close,
/// and [`Error::Internal`] when the closing thread cannot start.
pub(crate) fn close(connection: Connection, socket: &TcpStream) -> Result<()> {
    close_when_free(move || Some(connection), socket)
}

/// As [`close`], for a connection that `take` gets on the closing thread: it may wait there
/// for another thread's use of the connection to end, which the cut ends too (a channel being
/// opened while the broker does not answer, say). Nothing is closed when `take` finds none.
///
/// # Errors
///
/// As [`close`].
pub(crate) fn close_when_free(
    take: impl FnOnce() -> Option<Connection> + Send + 'static,
    socket: &TcpStream,
) -> Result<()> {
    let closing = move || take().map_or(Ok(()), Connection::close);
    let (outcome, cut) = bounded("rpc-close", Instant::now() + CLOSE_WAIT, socket, closing)?;
    if cut {
        warn!(
            "the broker did not confirm closing the connection within {} s (does a resource \
             alarm block it, or has it stopped answering?): cut it",
            CLOSE_WAIT.as_secs()
        );
    }
    Ok(outcome?)
}

/// Runs `work` on a short-lived thread named `name` and waits for it until `deadline`; past
/// it, shuts down `socket` (the connection's own), which fails at once whatever amiquip
/// request `work` waits in, and waits for `work` to return. amiquip's requests wait for the
/// broker without a bound: this is how a caller bounds them. Returns what `work` returned,
/// and whether the socket was cut.
///
/// # Errors
///
/// [`Error::Internal`] when the thread cannot start, or panics.
pub(crate) fn bounded<T: Send + 'static>(
    name: &str,
    deadline: Instant,
    socket: &TcpStream,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<(T, bool)> {
    let (done_sender, done) = crossbeam_channel::bounded(1);
    let worker = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = done_sender.send(work());
        })
        .map_err(|e| Error::Internal(format!("cannot start thread {name}: {e}")))?;
    let outcome = match done.recv_deadline(deadline) {
        Ok(outcome) => Some((outcome, false)),
        Err(RecvTimeoutError::Timeout) => {
            let _ = socket.shutdown(Shutdown::Both);
            done.recv().ok().map(|outcome| (outcome, true))
        }
        Err(RecvTimeoutError::Disconnected) => None,
    };
    let _ = worker.join();
    outcome.ok_or_else(|| Error::Internal(format!("thread {name} panicked")))
}

/// [`Error::Connect`] for a connection cut by [`bounded`]: the broker at `addr` did not answer in
/// time while the client or server was `doing` something after the handshake.
pub(crate) fn unanswered(addr: String, doing: &str) -> Error {
    Error::Connect {
        addr,
        source: std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the broker did not answer in time while {doing}"),
        )),
    }
}

/// The brokers to connect to: one URL, or the nodes of a cluster as several URLs separated by
/// commas.
///
/// Each connection attempt tries them in turn, starting after the one that answered last, so
/// that after a connection loss the next connection goes to whichever node answers next.
#[derive(Debug)]
pub(crate) struct Brokers {
    addresses: Vec<BrokerAddress>,
    /// Index of the broker to try first next time.
    next: AtomicUsize,
}

impl Brokers {
    /// Parses one URL, or several separated by commas.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the list is empty or a URL is bad (see [`BrokerAddress::parse`]).
    pub(crate) fn parse(urls: &str) -> Result<Brokers> {
        let addresses = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(BrokerAddress::parse)
            .collect::<Result<Vec<_>>>()?;
        if addresses.is_empty() {
            return Err(Error::Config("no broker URL given".into()));
        }
        Ok(Brokers {
            addresses,
            next: AtomicUsize::new(0),
        })
    }

    /// The brokers, in the order given.
    #[cfg(test)]
    fn addresses(&self) -> &[BrokerAddress] {
        &self.addresses
    }

    /// Connects to the first broker that answers, trying each once.
    ///
    /// # Errors
    ///
    /// The last broker's error when none answers; see [`open_address`]. An
    /// [`Error::Config`] at once, without trying the other brokers: wrong settings are wrong
    /// on every one.
    pub(crate) fn connect(&self, options: &ConnectOptions) -> Result<Connected> {
        self.connect_by(options, None)
    }

    /// As [`Brokers::connect`], but gives up at `deadline`: each broker gets at most the time
    /// left, so that a call's timeout covers its reconnection too.
    ///
    /// # Errors
    ///
    /// As [`Brokers::connect`]; when the deadline has passed before a broker could be tried,
    /// [`Error::Connect`] with a timed-out cause.
    pub(crate) fn connect_by(
        &self,
        options: &ConnectOptions,
        deadline: Option<Instant>,
    ) -> Result<Connected> {
        let count = self.addresses.len();
        let first = self.next.load(Ordering::Relaxed) % count;
        let mut last_error = None;
        for index in (first..count).chain(0..first) {
            let address = &self.addresses[index];
            let mut options = with_url_params(options, &address.params);
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(last_error.unwrap_or_else(|| {
                        connect_error(
                            address,
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the call's deadline passed before connecting",
                            ),
                        )
                    }));
                }
                options.connect_timeout = options.connect_timeout.min(left);
            }
            match open_address(address, &options)
                .and_then(|(connection, socket)| with_user(connection, socket, address, &options))
            {
                Ok(connected) => {
                    self.next.store(index + 1, Ordering::Relaxed);
                    return Ok(connected);
                }
                // Wrong settings are wrong on every broker.
                Err(error) if error.is_config() => return Err(error),
                Err(error) => {
                    if count > 1 {
                        warn!("{}; trying the next broker", error.chain());
                    }
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("there is at least one broker"))
    }
}

/// `options` with what a broker URL's query says in their place: the URL wins, for
/// connections to its broker. `channel_max`, `frame_max`, `verify` and
/// `server_name_indication` have no option of their own, and are read where the connection is
/// opened.
fn with_url_params(options: &ConnectOptions, params: &UrlParams) -> ConnectOptions {
    let mut options = options.clone();
    if let Some(heartbeat) = params.heartbeat {
        options.heartbeat = heartbeat;
    }
    if let Some(timeout) = params.connection_timeout {
        options.connect_timeout = timeout;
    }
    if let Some(external) = params.external_auth {
        options.tls.external_auth = external;
    }
    let tls = &mut options.tls;
    for (file, from_url) in [
        (&mut tls.ca_file, &params.ca_file),
        (&mut tls.cert_file, &params.cert_file),
        (&mut tls.key_file, &params.key_file),
    ] {
        if from_url.is_some() {
            file.clone_from(from_url);
        }
    }
    options
}

/// `connection` with the user it authenticated as: the URL's, or with EXTERNAL
/// [`TlsOptions::external_user`], once the broker has confirmed it. The confirmation waits for
/// the broker's answers, which amiquip does without a bound, so it runs within
/// `options.connect_timeout` (the time the call has left, when a call connects).
///
/// # Errors
///
/// Those of [`confirm_external_user`]; [`Error::Connect`] when the broker does not answer in
/// time.
fn with_user(
    connection: Connection,
    socket: TcpStream,
    address: &BrokerAddress,
    options: &ConnectOptions,
) -> Result<Connected> {
    let tls = &options.tls;
    let connected = |connection, socket, user| Connected {
        connection,
        socket,
        user,
        addr: url_for_display(address),
    };
    if !(address.tls && tls.external_auth) {
        return Ok(connected(
            connection,
            socket,
            Some(address.username.clone()),
        ));
    }
    let Some(user) = tls.external_user.clone() else {
        return Ok(connected(connection, socket, None));
    };
    let (host, port) = (address.host.clone(), address.port);
    let confirm_by = Instant::now() + options.connect_timeout;
    let ((connection, confirmed), cut) =
        bounded("rpc-external-user", confirm_by, &socket, move || {
            let mut connection = connection;
            let confirmed = confirm_external_user(&mut connection, &user, &host, port);
            (connection, confirmed.map(|()| user))
        })?;
    match confirmed {
        // Cut, it may still have ended well, just too late: the connection is gone.
        _ if cut => Err(unanswered(
            url_for_display(address),
            "confirming the client certificate's user",
        )),
        Ok(user) => Ok(connected(connection, socket, Some(user))),
        Err(error) => {
            let _ = close(connection, &socket);
            Err(error)
        }
    }
}

/// Has the broker confirm that `user` is the user it authenticated `connection` as, by its
/// client certificate ([`TlsOptions::external_user`]): RabbitMQ checks a message's `user_id`
/// before routing it and closes the channel when it is not the connection's user, so a
/// message that goes nowhere (the default exchange has no queue named "") is published with
/// that `user_id`, followed by a `basic.qos`, which waits for the broker's answer and fails if
/// the channel was closed meanwhile. Three round trips (open, `basic.qos`, close), once per
/// connection.
///
/// # Errors
///
/// [`Error::Config`] when the broker says the user is another, with its words (they name the
/// real user); the errors of a lost connection otherwise.
fn confirm_external_user(
    connection: &mut Connection,
    user: &str,
    host: &str,
    port: u16,
) -> Result<()> {
    let channel = connection.open_channel(None)?;
    let probe = Publish {
        body: b"",
        routing_key: String::new(),
        mandatory: false,
        immediate: false,
        properties: AmqpProperties::default().with_user_id(user.to_string()),
    };
    match channel
        .basic_publish("", probe)
        .and_then(|()| channel.qos(0, 0, false))
    {
        Ok(()) => Ok(channel.close()?),
        // The address without a user: with EXTERNAL, the URL's user plays no part.
        Err(amiquip::Error::ServerClosedChannel { message, .. }) => Err(Error::Config(format!(
            "TlsOptions::external_user is '{user}', but the broker at amqps://{host}:{port} \
             authenticated the client certificate as another user: {message}"
        ))),
        Err(other) => Err(Error::from_amqp(other)),
    }
}

/// How many frames a channel may queue for amiquip's I/O thread before the next send blocks
/// (amiquip's default is 16). A publish is at least three frames (method, header, body), so a
/// batch of 32 calls sent with `Client::send_many` used to block every few publishes, waiting
/// for the I/O thread. Measured on 2 cores, 32 calls in flight from one thread against our
/// server, medians of 7 interleaved rounds: 8,467 calls/s and 28 µs of client CPU a call with
/// 16; 8,627 and 23 µs with 128; 8,642 and 23 µs with 1,024. Sequential calls and 8 threads
/// were unchanged. 128 keeps what may wait here small: at most 128 frames of up to the
/// negotiated frame size (128 KiB with RabbitMQ's defaults) per channel, beside the I/O thread's
/// own 16 MiB of unsent bytes.
const FRAMES_QUEUED_PER_CHANNEL: usize = 128;

/// Opens an AMQP connection to one broker with `TCP_NODELAY` set.
///
/// # Errors
///
/// [`Error::Authentication`] for refused credentials, [`Error::Tls`] for a failed TLS
/// handshake; [`Error::Connect`] when no TCP connection or AMQP handshake completes within the
/// timeout;
/// [`Error::ConnectionLost`] when the broker drops the connection during the handshake;
/// [`Error::Amqp`] when it refuses it otherwise (an unknown vhost).
/// The connection, and its TCP socket (a second handle on it) for [`close`] to cut.
fn open_address(
    address: &BrokerAddress,
    options: &ConnectOptions,
) -> Result<(Connection, TcpStream)> {
    warn_once_if_threads_are_too_small();
    let external = address.tls && options.tls.external_auth;
    // Read before connecting: a missing file is a configuration error, not a network one.
    let connector = if address.tls {
        Some(tls_connector(address, &options.tls)?)
    } else {
        None
    };
    let stream = connect_tcp(address, options.connect_timeout)?;
    let auth = if external {
        Auth::External
    } else {
        Auth::Plain {
            username: address.username.clone(),
            password: address.password.clone(),
        }
    };
    let socket = stream
        .try_clone()
        .map_err(|source| connect_error(address, source))?;
    let stream = mio::net::TcpStream::from_stream(stream)
        .map_err(|source| connect_error(address, source))?;
    // The TLS and AMQP handshakes share one connect timeout, as they did when amiquip ran both.
    let handshake_by = Instant::now() + options.connect_timeout;
    let transport = match connector {
        Some(connector) => Transport::Tls(Box::new(tls_handshake(
            connector,
            address,
            stream,
            &socket,
            handshake_by,
        )?)),
        None => Transport::Plain(stream),
    };
    let mut amqp_options = ConnectionOptions::<Auth>::default()
        .auth(auth)
        .virtual_host(address.vhost.clone())
        .heartbeat(options.heartbeat)
        .connection_timeout(Some(handshake_by.saturating_duration_since(Instant::now())))
        .information(Some(options.connection_name.clone()));
    if let Some(channels) = address.params.channel_max {
        amqp_options = amqp_options.channel_max(channels);
    }
    if let Some(bytes) = address.params.frame_max {
        amqp_options = amqp_options.frame_max(bytes);
    }
    let tuning = ConnectionTuning::default().mem_channel_bound(FRAMES_QUEUED_PER_CHANNEL);
    // Everything the broker sends is checked before amiquip parses it: see `inbound.rs`.
    let connection =
        Connection::insecure_open_stream(CheckedStream::new(transport), amqp_options, tuning);
    let connection = connection.map_err(|error| match error {
        // A refused handshake is not a lost connection: say which broker refused it.
        amiquip::Error::InvalidCredentials => Error::Authentication {
            addr: url_for_display(address),
            user: address.username.clone(),
        },
        // With TLS 1.3 a broker that wants a client certificate says so only after the
        // handshake, by closing (or resetting) the connection with an alert, which amiquip
        // sees as a close while reading or a reset while writing.
        amiquip::Error::UnexpectedSocketClose
        | amiquip::Error::IoErrorReadingSocket { .. }
        | amiquip::Error::IoErrorWritingSocket { .. }
            if address.tls && options.tls.cert_file.is_none() =>
        {
            Error::Tls {
                addr: url_for_display(address),
                reason: "the broker closed the connection during the handshake: it may require \
                         a client certificate (--tls-cert and --tls-key)"
                    .into(),
            }
        }
        amiquip::Error::ConnectionTimeout => connect_error(
            address,
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the AMQP handshake did not complete in time",
            ),
        ),
        // A broker that drops the connection mid-handshake (while it restarts, say) counts as a
        // lost connection, which retrying callers try again; other refusals are AMQP errors.
        other => Error::from_amqp(other),
    })?;
    debug!("connected to {}", url_for_display(address));
    Ok((connection, socket))
}

/// Runs the TLS handshake on `stream` until `deadline`, so that the stream handed to amiquip
/// is TLS already and what comes out of it can be checked ([`CheckedStream`]). `socket` is the
/// same socket: the handshake runs with it in blocking mode, on a thread of its own, and past
/// the deadline the socket is cut, which ends it (see [`bounded`]).
///
/// # Errors
///
/// [`Error::Tls`] when the handshake fails (usually a certificate nobody trusts here,
/// [`TlsOptions::ca_file`], or a missing one); [`Error::Connect`] when it does not complete in
/// time or the socket fails.
fn tls_handshake(
    connector: native_tls::TlsConnector,
    address: &BrokerAddress,
    stream: mio::net::TcpStream,
    socket: &TcpStream,
    deadline: Instant,
) -> Result<native_tls::TlsStream<mio::net::TcpStream>> {
    let failed = |source| connect_error(address, source);
    // Blocking is a property of the socket, shared by both handles on it.
    socket.set_nonblocking(false).map_err(failed)?;
    // The name the certificate must carry, and TLS sends: the URL's host, or its
    // server_name_indication (see `tls_connector` for `disable`).
    let host = match &address.params.server_name {
        Some(ServerName::Name(name)) => name.clone(),
        _ => address.host.clone(),
    };
    let (handshake, cut) = bounded("rpc-tls", deadline, socket, move || {
        connector.connect(&host, stream)
    })?;
    match handshake {
        _ if cut => Err(failed(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the TLS handshake did not complete in time",
        ))),
        Ok(tls) => {
            socket.set_nonblocking(true).map_err(failed)?;
            Ok(tls)
        }
        Err(native_tls::HandshakeError::Failure(error)) => Err(Error::Tls {
            addr: url_for_display(address),
            reason: explain_tls_failure(&error.to_string()),
        }),
        // A blocking socket would block only once it timed out, which it never does here.
        Err(native_tls::HandshakeError::WouldBlock(_)) => Err(failed(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "the TLS handshake stopped waiting for the broker",
        ))),
    }
}

/// The stack amiquip's I/O thread needs to parse headers nested [`MAX_HEADER_DEPTH`] deep,
/// the deepest that reach it (see `inbound.rs`), with room to spare: measured with the
/// hostile tests' deepest accepted headers, between 128 and 256 KiB in a debug build, between
/// 32 and 64 KiB in a release build. The default thread stack (2 MiB) holds it many times
/// over, whatever the broker's frame_max.
const IO_THREAD_STACK: usize = if cfg!(debug_assertions) {
    256 * 1024
} else {
    64 * 1024
};

/// Warns, once per process, when `RUST_MIN_STACK` (which sets the stack of amiquip's I/O
/// thread, spawned without a size) is below [`IO_THREAD_STACK`]: a message the broker
/// delivers could then overflow it and abort the process.
fn warn_once_if_threads_are_too_small() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let set = std::env::var("RUST_MIN_STACK").ok();
        if let Some(bytes) = set
            .as_deref()
            .and_then(|text| text.trim().parse::<usize>().ok())
            && bytes < IO_THREAD_STACK
        {
            warn!(
                "RUST_MIN_STACK is {bytes} bytes, below the {IO_THREAD_STACK} that amiquip's I/O \
                 thread needs to parse headers nested {MAX_HEADER_DEPTH} deep: a message could \
                 overflow it and abort the process; unset it, or raise it"
            );
        }
    });
}

/// A TLS connector that trusts the system's CAs and `tls.ca_file`, and presents
/// `tls.cert_file` when given.
fn tls_connector(address: &BrokerAddress, tls: &TlsOptions) -> Result<native_tls::TlsConnector> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the TLS {what} {}: {e}",
                path.display()
            ))
        })
    };
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = &tls.ca_file {
        let certificate =
            native_tls::Certificate::from_pem(&read(path, "CA file")?).map_err(|e| {
                Error::Config(format!(
                    "the TLS CA file {} is not a PEM certificate: {e}",
                    path.display()
                ))
            })?;
        builder.add_root_certificate(certificate);
    }
    if tls.external_user.is_some() && !tls.external_auth {
        return Err(Error::Config(
            "TlsOptions::external_user names the user of EXTERNAL authentication: it needs \
             external_auth"
                .into(),
        ));
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let identity = native_tls::Identity::from_pkcs8(
                &read(cert, "certificate file")?,
                &read(key, "key file")?,
            )
            .map_err(|e| {
                Error::Config(format!(
                    "the TLS certificate {} and key {} are not a PEM certificate and its \
                     PKCS#8 key: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
            builder.identity(identity);
        }
        (None, None) if tls.external_auth => {
            return Err(Error::Config(
                "EXTERNAL authentication needs a client certificate and key".into(),
            ));
        }
        (None, None) => {}
        _ => {
            return Err(Error::Config(
                "a TLS client certificate needs both a certificate and a key file".into(),
            ));
        }
    }
    if address.params.verify_peer == Some(false) {
        warn!(
            "{}: verify=verify_none, as its URL says: the broker's certificate is not checked, \
             and anyone between can read and change the traffic",
            url_for_display(address)
        );
        builder.danger_accept_invalid_certs(true);
    }
    if address.params.server_name == Some(ServerName::Disabled) {
        // Without a name sent, none can be checked.
        builder.use_sni(false).danger_accept_invalid_hostnames(true);
    }
    builder.build().map_err(|e| Error::Tls {
        addr: url_for_display(address),
        reason: format!("cannot set up TLS: {e}"),
    })
}

/// OpenSSL's reason for a failed handshake, with what it most likely means in front.
fn explain_tls_failure(reason: &str) -> String {
    let meaning = if reason.contains("certificate has expired") {
        "the broker's certificate has expired"
    } else if reason.contains("hostname mismatch") || reason.contains("IP address mismatch") {
        "the broker's certificate is for another host name"
    } else if reason.contains("certificate verify failed") {
        "the broker's certificate is not signed by a trusted CA (trust its CA: --tls-ca)"
    } else if reason.contains("certificate required") || reason.contains("handshake failure") {
        "the broker requires a client certificate (--tls-cert and --tls-key)"
    } else {
        return reason.to_string();
    };
    format!("{meaning}: {reason}")
}

/// Tries each address the host resolves to, in order, and returns the first that connects.
fn connect_tcp(address: &BrokerAddress, timeout: Duration) -> Result<TcpStream> {
    let resolved: Vec<SocketAddr> = (address.host.as_str(), address.port)
        .to_socket_addrs()
        .map_err(|source| connect_error(address, source))?
        .collect();
    let mut last_error = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the host name resolved to no address",
    );
    for socket_addr in resolved {
        match TcpStream::connect_timeout(&socket_addr, timeout) {
            Ok(stream) => {
                stream
                    .set_nodelay(true)
                    .map_err(|source| connect_error(address, source))?;
                return Ok(stream);
            }
            Err(error) => {
                debug!("connecting to {socket_addr} failed: {error}");
                last_error = error;
            }
        }
    }
    Err(connect_error(address, last_error))
}

fn connect_error(address: &BrokerAddress, source: std::io::Error) -> Error {
    Error::Connect {
        addr: url_for_display(address),
        source: std::sync::Arc::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_is_split_on_commas() {
        let brokers = Brokers::parse("amqp://a:1, amqp://b:2,,amqp://c:3").unwrap();
        let hosts: Vec<_> = brokers
            .addresses()
            .iter()
            .map(|a| a.host.as_str())
            .collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        assert!(matches!(Brokers::parse(" , "), Err(Error::Config(_))));
        assert!(matches!(
            Brokers::parse("amqp://a,http://b"),
            Err(Error::Config(_))
        ));
    }
}
