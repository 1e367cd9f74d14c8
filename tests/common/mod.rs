//! Helpers shared by the integration tests: finding the broker, naming queues, running servers.
//!
//! Every test uses its own queue (a uuid in its name) so that tests run in parallel without
//! seeing each other's messages, and deletes it when done.
#![allow(dead_code)] // Each test binary uses its own subset of these helpers.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

pub mod logs;
pub mod process;
pub mod proxy;
pub mod raw_amqp;

use amiquip::{
    AmqpProperties, Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery, Publish,
    QueueDeclareOptions, QueueDeleteOptions,
};
use amqp_rpc::{Client, ClientOptions, Handler, QueueOptions, Request, Server, fib};

/// The broker the tests use: `AMQP_URL`, else the local default.
pub fn broker_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| amqp_rpc::DEFAULT_URL.to_string())
}

/// The host and port of an `amqp://` URL.
pub fn host_and_port(url: &str) -> (String, u16) {
    let parsed = url::Url::parse(url).expect("AMQP_URL is not a valid broker URL");
    let host = parsed.host_str().expect("the broker URL has a host");
    (
        host.trim_matches(['[', ']']).to_string(),
        parsed.port().unwrap_or(5672),
    )
}

/// Fails the test, saying how to start a broker, when none accepts connections.
pub fn require_broker() -> String {
    let url = broker_url();
    let (host, port) = host_and_port(&url);
    let reachable = (host.as_str(), port)
        .to_socket_addrs()
        .into_iter()
        .flatten()
        .any(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "no RabbitMQ broker at {}:{} ({url}). These tests need a real broker: start one with \
         `rabbitmq-server -detached` (install it with `apt-get install rabbitmq-server`), or \
         `docker run -d -p 5672:5672 rabbitmq:3`, or run `bash .ci/run`, which does it for you; \
         set AMQP_URL to use another broker.",
        host, port
    );
    url
}

/// A queue name no other test uses.
pub fn unique_queue(purpose: &str) -> String {
    format!("amqp-rpc-test-{purpose}-{}", uuid::Uuid::new_v4())
}

/// A plain amiquip connection for a test's own set-up and checks, and for hand-made peers.
pub fn raw_connection() -> Connection {
    Connection::insecure_open(&require_broker()).expect("connect to the broker")
}

/// Deletes the named queue when dropped, so tests leave nothing behind on the broker.
pub struct QueueGuard(pub String);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if let Ok(mut connection) = Connection::insecure_open(&broker_url())
            && let Ok(channel) = connection.open_channel(None)
        {
            let _ = channel.queue_delete(self.0.as_str(), QueueDeleteOptions::default());
            let _ = connection.close();
        }
    }
}

/// Declares `queue` as the server would, without consuming it.
pub fn declare_queue(channel: &Channel, queue: &str) {
    channel
        .queue_declare(queue, QueueDeclareOptions::default())
        .expect("declare the test queue");
}

/// Starts a server with `handler` on `queue` with `workers` workers.
pub fn start_server<H: Handler>(queue: &str, workers: usize, handler: H) -> Server {
    Server::builder(&require_broker())
        .serve(queue, QueueOptions::with_workers(workers), handler)
        .start()
        .expect("start the server")
}

/// Starts a Fibonacci server on `queue` with `workers` workers.
pub fn start_fib_server(queue: &str, workers: usize) -> Server {
    start_server(queue, workers, |request: &Request| {
        fib::handle_request(request.body(), fib::DEFAULT_MAX_N)
    })
}

/// A client of `queue` that waits at most `timeout` for each reply.
pub fn client_for(queue: &str, timeout: Duration) -> Client {
    client_at(&require_broker(), queue, timeout)
}

/// A client of `queue` on the broker at `url`.
pub fn client_at(url: &str, queue: &str, timeout: Duration) -> Client {
    let options = ClientOptions {
        queue: queue.to_string(),
        timeout,
        ..ClientOptions::default()
    };
    Client::with_options(url, options).expect("connect the client")
}

/// (messages ready, consumers) of `queue`, from a passive declare.
fn queue_counts(queue: &str) -> (u32, u32) {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    let declared = channel
        .queue_declare_passive(queue)
        .expect("the queue exists");
    let counts = declared
        .declared_message_count()
        .zip(declared.declared_consumer_count())
        .expect("a passive declare reports the counts");
    connection.close().unwrap();
    counts
}

/// Messages ready in `queue` (not delivered to any consumer).
pub fn ready_messages(queue: &str) -> u32 {
    queue_counts(queue).0
}

/// Consumers of `queue`, as the broker counts them.
pub fn consumers(queue: &str) -> u32 {
    queue_counts(queue).1
}

/// Requests of `queue` delivered to a server and not yet acked, as the broker counts them.
pub fn unacked_messages(queue: &str) -> u32 {
    queue_column(queue, "messages_unacknowledged")
}

/// Requests in `queue`, ready or delivered and not yet acked, as the broker counts them.
pub fn queued_messages(queue: &str) -> u32 {
    queue_column(queue, "messages")
}

fn queue_column(queue: &str, column: &str) -> u32 {
    let listing = rabbitmqctl(&["list_queues", "name", column, "--no-table-headers", "-q"]);
    listing
        .lines()
        .find_map(|line| {
            let (name, count) = line.split_once('\t')?;
            (name == queue).then(|| count.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("the broker lists no queue {queue}"))
}

/// The channels the broker counts on the connection it names `name`; `None` when it lists no
/// such connection.
pub fn channels_on(name: &str) -> Option<u32> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "name",
        "channels",
        "--no-table-headers",
        "-q",
    ]);
    listing.lines().find_map(|line| {
        let (connection, channels) = line.split_once('\t')?;
        (connection.trim() == name).then(|| channels.trim().parse().unwrap())
    })
}

/// A Fibonacci number that keeps a debug-build server busy for seconds: long enough to see its
/// request taken (an unacked message, polled through `rabbitmqctl`, which itself takes a good
/// part of a second under load) and to signal the server while it computes.
pub const LONG_N: u64 = 3_000_000;

/// Polls `condition` every 20 ms until it holds; fails with `what` after 10 s.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            std::time::Instant::now() < give_up,
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// For a handler that holds its request: returns once `released` is set, however long that
/// takes (the test decides when).
pub fn hold_until(released: &std::sync::atomic::AtomicBool) {
    while !released.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets its flag when dropped: a handler held with [`hold_until`] is let go by a failing test
/// too, whose server could not otherwise stop.
pub struct Release(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A server of `queue` that answers fib(n) and holds the request `slow`: it says on the
/// returned receiver when it has begun one, and answers it once the returned guard is dropped,
/// so that a test can act while the request is surely in flight, however long acting takes.
pub fn start_holding_server(queue: &str) -> (Server, std::sync::mpsc::Receiver<()>, Release) {
    let (begun, slow_begun) = std::sync::mpsc::channel();
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = std::sync::Arc::clone(&released);
    let server = start_server(queue, 2, move |request: &Request| {
        if request.body() == b"slow" {
            let _ = begun.send(());
            hold_until(&held);
            return Ok(b"slow".to_vec());
        }
        fib::handle_request(request.body(), 1000)
    });
    (server, slow_begun, Release(released))
}

/// Runs `rabbitmqctl` with `args`, fails the test if it fails, and returns what it printed.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl (these tests need the broker's own tools)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Has the broker close the connection it names `name` ("127.0.0.1:PORT -> 127.0.0.1:5672"),
/// as an operator would. Only ever called with names of the test's own connections.
pub fn broker_closes_connection(name: &str) {
    let listing = rabbitmqctl(&[
        "list_connections",
        "pid",
        "name",
        "--no-table-headers",
        "-q",
    ]);
    let pid = listing
        .lines()
        .find_map(|line| {
            let (pid, connection) = line.split_once('\t')?;
            (connection.trim() == name).then_some(pid)
        })
        .unwrap_or_else(|| panic!("the broker lists no connection named {name:?}:\n{listing}"));
    rabbitmqctl(&["close_connection", pid, "closed by a test"]);
}

/// The Python interpreter with pika importable; fails the test with how to get it otherwise.
pub fn python_with_pika() -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let found = std::process::Command::new(&python)
        .args(["-c", "import pika"])
        .status()
        .map(|status| status.success())
        .unwrap_or(false);
    assert!(
        found,
        "the interoperability tests need Python 3 with pika: `pip install pika` \
         (or set PYTHON to an interpreter that has it)"
    );
    python
}

/// Python with the `prometheus_client` package, whose parser checks our `/metrics` text.
pub fn python_with_prometheus_client() -> String {
    let python = python_with_pika();
    let found = std::process::Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "the metrics tests need Python's prometheus_client: `pip install prometheus_client` \
         (scripts/test installs it)"
    );
    python
}

/// `GET path` from the HTTP server at `address`: the status code and the body; `None` when
/// nothing listens there.
pub fn http_get(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The path of one of the pika peer scripts in `tests/pika/`.
pub fn pika_script(name: &str) -> String {
    format!("{}/tests/pika/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The command that runs the pika peer `script` (in `tests/pika/`) with `python` against the
/// test broker and `queue`, the first two arguments of every peer; a caller adds the rest.
pub fn pika_peer(python: &str, script: &str, queue: &str) -> std::process::Command {
    let mut command = std::process::Command::new(python);
    command.args([&pika_script(script), &broker_url(), queue]);
    command
}

/// Publishes `body` to `queue` from a plain amiquip client and returns the raw reply delivery,
/// so that a test can read exactly what went over the wire.
pub fn raw_reply(queue: &str, body: &[u8]) -> amiquip::Delivery {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    let (reply_queue, consumer) = consume_reply_queue(&channel);
    let properties = AmqpProperties::default()
        .with_reply_to(reply_queue)
        .with_correlation_id("raw".to_string());
    channel
        .basic_publish(
            "",
            Publish::with_properties(body, queue.to_string(), properties),
        )
        .unwrap();
    let reply = match consumer.receiver().recv_timeout(Duration::from_secs(10)) {
        Ok(ConsumerMessage::Delivery(delivery)) => delivery,
        other => panic!("no reply: {other:?}"),
    };
    end_consumer(consumer);
    connection.close().unwrap();
    reply
}

/// Declares a server-named, exclusive queue on `channel` and consumes it without acks, as a
/// tutorial client does its reply queue: the queue's name, and the consumer.
pub fn consume_reply_queue(channel: &Channel) -> (String, amiquip::Consumer<'_>) {
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();
    let consumer = queue
        .consume(ConsumerOptions {
            no_ack: true,
            ..ConsumerOptions::default()
        })
        .unwrap();
    (queue.name().to_string(), consumer)
}

/// A server-named, exclusive queue of the test's own, on a plain amiquip connection, where
/// hostile requests have their replies sent.
pub struct Inbox {
    connection: Option<Connection>,
    /// Kept open: dropping a channel closes it.
    _channel: amiquip::Channel,
    pub name: String,
    pub replies: crossbeam_channel::Receiver<ConsumerMessage>,
}

impl Inbox {
    /// An inbox on the broker at `url`.
    pub fn at(url: &str) -> Inbox {
        let mut connection = Connection::insecure_open(url).expect("connect to the broker");
        let channel = connection.open_channel(None).unwrap();
        let (name, consumer) = consume_reply_queue(&channel);
        let replies = consumer.receiver().clone();
        // Ended with its connection, never dropped early (docs/amiquip.md).
        std::mem::forget(consumer);
        Inbox {
            connection: Some(connection),
            _channel: channel,
            name,
            replies,
        }
    }

    /// The next reply, within 10 s.
    pub fn next_reply(&self) -> Delivery {
        match self.replies.recv_timeout(Duration::from_secs(10)) {
            Ok(ConsumerMessage::Delivery(reply)) => reply,
            other => panic!("no reply within 10 s: {other:?}"),
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// Ends `consumer` the safe way (docs/amiquip.md): cancels it, reads a clone of its receiver
/// until the cancel is confirmed or the stream ends, leaving deliveries that raced the cancel
/// unacked (the broker takes them back with the channel), and only then drops it.
pub fn end_consumer(consumer: amiquip::Consumer) {
    let messages = consumer.receiver().clone();
    consumer.cancel().unwrap();
    for message in messages.iter() {
        if !matches!(message, ConsumerMessage::Delivery(_)) {
            break;
        }
    }
    drop(consumer);
}

/// Publishes a request to `queue` whose reply nobody will read, without a deadline, as a
/// tutorial peer that does not wait would.
pub fn publish_request(queue: &str, body: &[u8]) {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    let properties = AmqpProperties::default()
        // A server-named-looking queue that does not exist: the reply is dropped unread.
        .with_reply_to(format!("amq.gen-unread-{}", uuid::Uuid::new_v4()))
        .with_correlation_id("unread".to_string());
    channel
        .basic_publish(
            "",
            Publish::with_properties(body, queue.to_string(), properties),
        )
        .unwrap();
    connection.close().unwrap();
}

/// Which correlation id a scripted reply carries.
pub enum ReplyId {
    /// The request's own.
    Own,
    /// Somebody else's.
    Other(&'static str),
}

/// A hand-written server on `queue` (declared here) that answers its i-th request with the
/// replies of `script[i]`, in order, acks it, and stops after the last.
pub fn scripted_peer(
    queue: &str,
    script: Vec<Vec<(ReplyId, &'static [u8])>>,
) -> std::thread::JoinHandle<()> {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, queue);
    let queue = queue.to_string();
    std::thread::spawn(move || {
        let consumer = channel
            .basic_consume(queue.as_str(), ConsumerOptions::default())
            .unwrap();
        let deliveries = consumer.receiver().clone();
        for replies in script {
            let ConsumerMessage::Delivery(request) = deliveries.recv().unwrap() else {
                panic!("expected a request");
            };
            let reply_to = request.properties.reply_to().clone().unwrap();
            let own_id = request.properties.correlation_id().clone().unwrap();
            for (id, body) in replies {
                let id = match id {
                    ReplyId::Own => own_id.clone(),
                    ReplyId::Other(other) => other.to_string(),
                };
                let properties = AmqpProperties::default().with_correlation_id(id);
                channel
                    .basic_publish(
                        "",
                        Publish::with_properties(body, reply_to.clone(), properties),
                    )
                    .unwrap();
            }
            consumer.ack(request).unwrap();
        }
        end_consumer(consumer);
        connection.close().unwrap();
    })
}
