//! Security: no password in any error, help text, log line or debug output; replies only to
//! queues a client could own; bounded, sanitised input on the client.

mod common;

use std::process::Command;
use std::time::Duration;

use amqp_rpc::{Client, ClientOptions, Error, HandlerError, QueueOptions, Request, Server, fib};
use common::process::text;
use common::{
    QueueGuard, declare_queue, end_consumer, host_and_port, rabbitmqctl, raw_connection,
    ready_messages, require_broker, start_fib_server, start_server, unique_queue,
};

/// A broker user made for one test, with full permissions on the default vhost; deleted when
/// dropped.
struct TestUser {
    name: String,
    password: String,
}

impl TestUser {
    fn new() -> TestUser {
        TestUser::with_permissions(".*", ".*", ".*")
    }

    /// A user with exactly these configure, write and read permissions on the default vhost.
    fn with_permissions(configure: &str, write: &str, read: &str) -> TestUser {
        let id = uuid::Uuid::new_v4();
        let user = TestUser {
            name: format!("amqp-rpc-test-{id}"),
            password: format!("pw-{id}"),
        };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &user.name,
            configure,
            write,
            read,
        ]);
        user
    }

    fn url(&self) -> String {
        let (host, port) = host_and_port(&require_broker());
        format!("amqp://{}:{}@{host}:{port}/%2f", self.name, self.password)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

#[test]
fn no_password_shows_in_errors_for_bad_urls_refused_connections_or_refused_credentials() {
    let secret = "s3cret-pw";
    let (host, port) = host_and_port(&require_broker());
    for url in [
        format!("amqp://user:{secret}@127.0.0.1:1/%2f"),
        format!("amqp://user:{secret}@{host}:99999/%2f"),
        format!("amqp://user:{secret}@{host}:{port}/a/b"),
        format!("http://user:{secret}@{host}:{port}/"),
        format!("amqp://guest:{secret}@{host}:{port}/%2f"),
    ] {
        let error = Client::connect(&url).expect_err("cannot connect");
        for shown in [error.chain(), format!("{error:?}")] {
            assert!(!shown.contains(secret), "{url}: {shown}");
        }
    }
}

#[test]
fn no_password_shows_when_clients_servers_or_builders_are_debug_printed() {
    let user = TestUser::new();
    let queue = unique_queue("debug");
    let _guard = QueueGuard(queue.clone());
    // Two brokers, as a cluster's URL list: both passwords must go.
    let urls = format!("{},{}", user.url(), user.url());
    let builder = Server::builder(&urls).serve(
        &queue,
        QueueOptions::with_workers(1),
        |request: &Request| Ok(request.body().to_vec()),
    );
    let shown = format!("{builder:?}");
    assert!(
        shown.contains(&queue) && shown.contains(&user.name),
        "{shown}"
    );
    assert!(!shown.contains(&user.password), "{shown}");
    let server = builder.start().unwrap();
    let options = ClientOptions {
        queue: queue.clone(),
        ..ClientOptions::default()
    };
    let client = Client::with_options(&urls, options).unwrap();
    assert_eq!(client.call(b"echo").unwrap(), b"echo");
    for shown in [
        format!("{client:?}"),
        format!("{server:?}"),
        format!("{:?}", server.shutdown_handle()),
    ] {
        assert!(!shown.contains(&user.password), "{shown}");
    }
    assert!(format!("{client:?}").contains(&user.name));
    assert!(format!("{server:?}").contains("Serving"));
    server.shutdown().unwrap();
}

#[test]
fn the_binaries_show_no_password_in_help_or_in_logs_at_trace() {
    let user = TestUser::new();
    let queue = unique_queue("secret-logs");
    let _guard = QueueGuard(queue.clone());
    let server = start_fib_server(&queue, 1);

    // --help shows neither AMQP_URL's value nor the default URL's password.
    let help = Command::new(env!("CARGO_BIN_EXE_client"))
        .arg("--help")
        .env("AMQP_URL", user.url())
        .output()
        .unwrap();
    let (stdout, _) = text(&help);
    assert!(help.status.success());
    assert!(stdout.contains("AMQP_URL"), "{stdout}");
    assert!(!stdout.contains(&user.password), "{stdout}");
    assert!(!stdout.contains("guest:guest"), "{stdout}");

    // A successful call with everything logged: amiquip's handshake line is kept out.
    let call = Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--queue", &queue, "10"])
        .env("AMQP_URL", user.url())
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&call);
    assert!(call.status.success(), "{stderr}");
    assert!(stdout.contains(" [.] Got 55"), "{stdout}");
    assert!(stderr.contains("TRACE"), "logging was on: {stderr}");
    assert!(
        !stderr.contains(&user.password),
        "the password leaked:\n{stderr}"
    );

    // Refused credentials, at trace.
    let wrong = user.url().replace(&user.password, "wrong-pw-1234");
    let refused = Command::new(env!("CARGO_BIN_EXE_client"))
        .args(["--url", &wrong, "--queue", &queue, "10"])
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let (_, stderr) = text(&refused);
    assert!(!refused.status.success());
    assert!(stderr.contains("invalid credentials"), "{stderr}");
    assert!(
        !stderr.contains("wrong-pw-1234"),
        "the password leaked:\n{stderr}"
    );

    // A malformed URL and a refused connection, at trace, from both binaries.
    let (host, _) = host_and_port(&require_broker());
    for url in [
        format!("amqp://guest:{}@{host}:99999/%2f", user.password),
        format!("amqp://guest:{}@127.0.0.1:1/%2f", user.password),
    ] {
        for binary in [env!("CARGO_BIN_EXE_client"), env!("CARGO_BIN_EXE_server")] {
            let mut command = Command::new(binary);
            command
                .args(["--url", &url, "--queue", &queue])
                .env("RUST_LOG", "trace");
            if binary.ends_with("client") {
                command.arg("10");
            }
            let output = command.output().unwrap();
            let (stdout, stderr) = text(&output);
            assert!(!output.status.success(), "{binary} {url}");
            assert!(stderr.contains("error: "), "{stderr}");
            assert!(
                !stdout.contains(&user.password) && !stderr.contains(&user.password),
                "{binary} leaked the password:\n{stderr}"
            );
        }
    }
    server.shutdown().unwrap();
}

#[test]
fn replies_go_only_to_queues_a_client_could_own_unless_allowed() {
    let queue = unique_queue("reply-to");
    let victim = unique_queue("victim");
    let _guards = (QueueGuard(queue.clone()), QueueGuard(victim.clone()));
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    declare_queue(&channel, &victim);
    let publish_to_victim = |channel: &amiquip::Channel| {
        let properties = amiquip::AmqpProperties::default()
            .with_reply_to(victim.clone())
            .with_correlation_id("forged".into());
        channel
            .basic_publish(
                "",
                amiquip::Publish::with_properties(b"10", queue.clone(), properties),
            )
            .unwrap();
    };

    let server = start_fib_server(&queue, 1);
    publish_to_victim(&channel);
    common::wait_until("the server refuses the forged request", || {
        server.stats().queues[0].refused_reply_to == 1
    });
    // One worker, which had finished with the forged request before serving this call.
    let client = common::client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"11").unwrap(), b"89");
    assert_eq!(
        ready_messages(&victim),
        0,
        "nothing written into the victim queue"
    );
    assert_eq!(server.stats().queues[0].requests, 2);
    server.shutdown().unwrap();

    // Allowed by a pattern, the same request is answered there.
    let allowing = Server::builder(&require_broker())
        .serve(
            &queue,
            QueueOptions {
                workers: 1,
                reply_to: vec!["amq.gen-*".into(), "amqp-rpc-test-victim-*".into()],
                ..QueueOptions::default()
            },
            |request: &Request| fib::serve(request, 1000),
        )
        .start()
        .unwrap();
    publish_to_victim(&channel);
    assert_eq!(client.call(b"12").unwrap(), b"144");
    common::wait_until("the reply lands in the named queue", || {
        ready_messages(&victim) == 1
    });
    allowing.shutdown().unwrap();
    connection.close().unwrap();
}

#[test]
fn a_reply_over_the_clients_limit_is_an_invalid_reply() {
    const BIG: usize = 2_100_000;
    let queue = unique_queue("max-reply");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 1, |_: &Request| Ok(vec![b'7'; BIG]));
    let limited = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: queue.clone(),
            max_reply: 1024 * 1024,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let error = limited.call(b"").unwrap_err();
    assert!(error.is_invalid_reply(), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("2100000 bytes is over this client's limit"),
        "{error}"
    );
    // The default limit lets a reply as large as fib(10,000,000)'s through.
    assert_eq!(
        common::client_for(&queue, Duration::from_secs(10))
            .call(b"")
            .unwrap()
            .len(),
        BIG
    );
    server.shutdown().unwrap();
}

#[test]
fn a_servers_error_message_reaches_the_caller_without_control_characters() {
    let queue = unique_queue("escapes");
    let _guard = QueueGuard(queue.clone());
    let server = start_server(&queue, 1, |_: &Request| -> Result<Vec<u8>, HandlerError> {
        Err("bad \u{1b}[31mred\u{7} input".into())
    });
    let error = common::client_for(&queue, Duration::from_secs(10))
        .call(b"x")
        .unwrap_err();
    let Error::Remote { message, .. } = &error else {
        panic!("{error:?}")
    };
    assert!(!message.chars().any(char::is_control), "{message:?}");
    assert_eq!(message, "bad \\u{1b}[31mred\\u{7} input");
    server.shutdown().unwrap();
}

/// Consumes one request of `queue` as `url`'s user, has `forge` answer it first (with the
/// request's `reply_to` and `correlation_id`), puts the request back in the queue, and
/// returns once it has.
fn forge_one_reply(url: &str, queue: &str, forge: impl FnOnce(&amiquip::Channel, &str, &str)) {
    let mut connection = amiquip::Connection::insecure_open(url).unwrap();
    let channel = connection.open_channel(None).unwrap();
    channel.qos(0, 1, false).unwrap();
    let consumer = channel
        .basic_consume(queue, amiquip::ConsumerOptions::default())
        .unwrap();
    let messages = consumer.receiver().clone();
    let request = match messages.recv_timeout(Duration::from_secs(10)) {
        Ok(amiquip::ConsumerMessage::Delivery(request)) => request,
        other => panic!("the rogue got no request: {other:?}"),
    };
    let reply_to = request.properties.reply_to().clone().unwrap();
    let id = request.properties.correlation_id().clone().unwrap();
    forge(&channel, &reply_to, &id);
    consumer.nack(request, true).unwrap();
    end_consumer(consumer);
    connection.close().unwrap();
}

/// A reply with the awaited correlation id, from whoever publishes it.
fn plain_forgery(channel: &amiquip::Channel, reply_to: &str, id: &str) {
    let forged = amiquip::AmqpProperties::default().with_correlation_id(id.to_string());
    channel
        .basic_publish(
            "",
            amiquip::Publish::with_properties(b"forged", reply_to.to_string(), forged),
        )
        .unwrap();
}

/// A reply that amiquip alone would read as coming from `server_user`, published by the
/// hostile peer as the test broker's user: its `content_type` is not UTF-8 and holds the
/// awaited correlation id and `server_user`, which amiquip read as the properties after it,
/// while the broker verified the peer's real `user_id` further on.
fn forgery_behind_a_short_string_that_is_not_utf8(server_user: &str, reply_to: &str, id: &str) {
    use common::raw_amqp::{Property, RawProperties, RawPublisher, Verdict, short_string};
    let mut inside = short_string(id.as_bytes());
    inside.extend(short_string(server_user.as_bytes()));
    inside.push(0xff);
    let forged = RawProperties::new()
        .short(Property::ContentType, &inside)
        .raw(Property::DeliveryMode, vec![1])
        .short(Property::CorrelationId, b"not-the-awaited-one")
        .short(Property::UserId, broker_user().as_bytes());
    assert_eq!(
        RawPublisher::connect().publish(reply_to, &forged.encode(), b"forged"),
        Verdict::Confirmed
    );
}

/// The user of the test broker's URL.
fn broker_user() -> String {
    match url::Url::parse(&require_broker()).unwrap().username() {
        "" => "guest".to_string(),
        name => name.to_string(),
    }
}

/// Declares `queue`, and makes a call to it from a client that accepts replies only from
/// `server_user`, when given; the call waits on its thread.
fn call_waiting_for(
    queue: &str,
    server_user: Option<&TestUser>,
) -> (Client, std::thread::JoinHandle<amqp_rpc::Result<Vec<u8>>>) {
    let mut connection = raw_connection();
    declare_queue(&connection.open_channel(None).unwrap(), queue);
    connection.close().unwrap();
    let client = Client::with_options(
        &require_broker(),
        ClientOptions {
            queue: queue.to_string(),
            server_user: server_user.map(|user| user.name.clone()),
            timeout: Duration::from_secs(20),
            no_server_grace: Duration::ZERO,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let call = {
        let client = client.clone();
        std::thread::spawn(move || client.call(b"10"))
    };
    (client, call)
}

#[test]
fn a_client_that_knows_its_servers_user_ignores_a_rogue_and_the_handler_sees_the_caller() {
    let (server_user, rogue) = (TestUser::new(), TestUser::new());
    let queue = unique_queue("rogue");
    let _guard = QueueGuard(queue.clone());
    let (client, call) = call_waiting_for(&queue, Some(&server_user));
    forge_one_reply(&rogue.url(), &queue, plain_forgery);

    let callers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&callers);
    let server = Server::builder(&server_user.url())
        .serve(
            &queue,
            QueueOptions::with_workers(1),
            move |request: &Request| {
                seen.lock()
                    .unwrap()
                    .push(request.user_id().map(str::to_string));
                fib::serve(request, 1000)
            },
        )
        .start()
        .unwrap();
    assert_eq!(
        call.join().unwrap().unwrap(),
        b"55",
        "the real answer, not the forgery"
    );
    assert_eq!(client.stats().rejected_replies, 1);
    assert_eq!(
        *callers.lock().unwrap(),
        [Some(broker_user())],
        "the verified caller"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_rogue_cannot_pass_for_the_servers_user_behind_a_short_string_that_is_not_utf8() {
    let server_user = TestUser::new();
    let queue = unique_queue("rogue-utf8");
    let _guard = QueueGuard(queue.clone());
    let (client, call) = call_waiting_for(&queue, Some(&server_user));
    forge_one_reply(&require_broker(), &queue, |_, reply_to, id| {
        forgery_behind_a_short_string_that_is_not_utf8(&server_user.name, reply_to, id);
    });
    let server = Server::builder(&server_user.url())
        .serve(
            &queue,
            QueueOptions::with_workers(1),
            |request: &Request| fib::serve(request, 1000),
        )
        .start()
        .unwrap();
    assert_eq!(
        call.join().unwrap().unwrap(),
        b"55",
        "the real answer, not the forgery"
    );
    assert_eq!(client.stats().rejected_replies, 1);
    server.shutdown().unwrap();
}

#[test]
fn servers_and_clients_work_under_least_privilege_and_what_is_not_granted_is_refused_clearly() {
    let queue = unique_queue("least");
    let _guard = QueueGuard(queue.clone());
    let escaped = queue.replace('-', "\\-");
    let server_user = TestUser::with_permissions(
        &format!("^({escaped}|amqp-rpc\\.deliveries\\..*)$"),
        "^amq\\.default$",
        &format!("^{escaped}$"),
    );
    let client_user =
        TestUser::with_permissions("^amq\\.gen-.*$", "^amq\\.default$", "^amq\\.gen-.*$");
    let direct_user = TestUser::with_permissions("^$", "^amq\\.default$", "^$");

    let server = Server::builder(&server_user.url())
        .serve(
            &queue,
            QueueOptions::with_workers(1),
            |request: &Request| fib::serve(request, 1000),
        )
        .start()
        .unwrap();
    let options = |route| ClientOptions {
        queue: queue.clone(),
        reply_route: route,
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    let client = Client::with_options(
        &client_user.url(),
        options(amqp_rpc::ReplyRoute::ExclusiveQueue),
    )
    .unwrap();
    assert_eq!(client.call(b"10").unwrap(), b"55");
    let direct = Client::with_options(
        &direct_user.url(),
        options(amqp_rpc::ReplyRoute::DirectReplyTo),
    )
    .unwrap();
    assert_eq!(direct.call(b"11").unwrap(), b"89");

    // Outside the grants: a server of another queue, a client that declares a reply queue
    // without the right to. Each is refused at once, with the broker's reason.
    let other = unique_queue("least-other");
    let refused = Server::builder(&server_user.url())
        .serve(
            &other,
            QueueOptions::with_workers(1),
            |request: &Request| fib::serve(request, 1000),
        )
        .start()
        .expect_err("not granted");
    assert!(
        matches!(&refused, Error::Refused { code: 403, text } if text.contains("ACCESS_REFUSED")),
        "{refused:?}"
    );
    let refused = Client::with_options(
        &direct_user.url(),
        options(amqp_rpc::ReplyRoute::ExclusiveQueue),
    )
    .expect_err("not granted");
    assert!(
        matches!(&refused, Error::Refused { code: 403, .. }),
        "{refused:?}"
    );
    server.shutdown().unwrap();

    // The client's check for a server (a passive declare) needs no grant of its own.
    let error = client
        .call_with_timeout(b"12", Duration::from_secs(10))
        .unwrap_err();
    assert!(error.is_no_server(), "{error:?}");
}

/// Takes the first request of `queue` as the test broker's user, stops consuming, and puts it
/// back, so that the server that takes it next sees it redelivered; returns the name of the
/// queue in which the servers of a classic queue count its deliveries.
fn put_one_request_back(queue: &str, started: impl FnOnce(&str)) -> String {
    let mut connection = raw_connection();
    let channel = connection.open_channel(None).unwrap();
    channel.qos(0, 1, false).unwrap();
    let consumer = channel
        .basic_consume(queue, amiquip::ConsumerOptions::default())
        .unwrap();
    let request = match consumer.receiver().recv_timeout(Duration::from_secs(10)) {
        Ok(amiquip::ConsumerMessage::Delivery(request)) => request,
        other => panic!("no request: {other:?}"),
    };
    end_consumer(consumer);
    // The name a count takes: a uuid (v5) of the queue, reply_to and correlation_id.
    let key = format!(
        "amqp-rpc deliveries\n{queue}\n{}\n{}",
        request.properties.reply_to().clone().unwrap(),
        request.properties.correlation_id().clone().unwrap()
    );
    let counter = format!(
        "amqp-rpc.deliveries.{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes())
    );
    started(&counter);
    request.nack(&channel, true).unwrap();
    connection.close().unwrap();
    counter
}

fn queue_exists(name: &str) -> bool {
    rabbitmqctl(&["list_queues", "name", "--no-table-headers", "-q"])
        .lines()
        .any(|line| line.trim() == name)
}

/// A server under `configure`, serving a classic queue whose first request was put back once:
/// what its caller gets, the name of the request's count, and whether the count's queue
/// existed while the handler ran.
fn redelivered_request_under(configure: &str) -> (amqp_rpc::Result<Vec<u8>>, String, bool) {
    let queue = unique_queue("counted");
    let _guard = QueueGuard(queue.clone());
    let escaped = queue.replace('-', "\\-");
    let server_user = TestUser::with_permissions(
        &configure.replace("QUEUE", &escaped),
        "^amq\\.default$",
        &format!("^{escaped}$"),
    );
    let (client, call) = call_waiting_for(&queue, None);
    let mut server = None;
    let counted_while_running = std::sync::Arc::new(std::sync::Mutex::new(false));
    let seen = std::sync::Arc::clone(&counted_while_running);
    let counter = put_one_request_back(&queue, |counter| {
        let counter = counter.to_string();
        let handler = move |request: &Request| {
            if request.body() == b"10" {
                *seen.lock().unwrap() = queue_exists(&counter);
            }
            fib::serve(request, 1000)
        };
        server = Some(
            Server::builder(&server_user.url())
                .serve(&queue, QueueOptions::with_workers(1), handler)
                .start()
                .unwrap(),
        );
    });
    let outcome = call.join().unwrap();
    // The server answers on: the next call too.
    assert_eq!(client.call(b"11").unwrap(), b"89");
    server.unwrap().shutdown().unwrap();
    let counted = *counted_while_running.lock().unwrap();
    (outcome, counter, counted)
}

#[test]
fn under_least_privilege_a_redelivered_request_is_counted_then_its_count_deleted() {
    let (outcome, counter, counted) =
        redelivered_request_under("^(QUEUE|amqp-rpc\\.deliveries\\..*)$");
    assert_eq!(outcome.unwrap(), b"55");
    assert!(counted, "the handler ran once the delivery was counted");
    common::wait_until("the count's queue is deleted", || !queue_exists(&counter));
}

#[test]
fn without_the_grant_to_count_a_redelivered_request_is_answered_with_the_brokers_reason() {
    let (outcome, counter, _) = redelivered_request_under("^QUEUE$");
    let error = outcome.unwrap_err();
    assert_eq!(
        error.remote_kind(),
        Some(amqp_rpc::FailureKind::HandlerFailed),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("refused to count") && message.contains("ACCESS_REFUSED"),
        "{message}"
    );
    assert!(!queue_exists(&counter));
}

#[test]
fn a_service_behind_an_exchange_works_under_least_privilege() {
    let queue = unique_queue("least-exchange");
    let exchange = unique_queue("least-services");
    let _guard = QueueGuard(queue.clone());
    let (q, e) = (queue.replace('-', "\\-"), exchange.replace('-', "\\-"));
    // Declaring the exchange needs configure on it; binding the queue, write on the queue and
    // read on the exchange.
    let server_user = TestUser::with_permissions(
        &format!("^({q}|{e})$"),
        &format!("^(amq\\.default|{q})$"),
        &format!("^({q}|{e})$"),
    );
    // Publishing through the exchange needs write on it; asking whether it exists, nothing.
    let client_user = TestUser::with_permissions(
        "^amq\\.gen-.*$",
        &format!("^(amq\\.default|{e})$"),
        "^amq\\.gen-.*$",
    );
    let serve_as = |user: &TestUser| {
        Server::builder(&user.url())
            .serve(
                &queue,
                QueueOptions {
                    bindings: vec![amqp_rpc::Binding::topic(&exchange, "math.#")],
                    ..QueueOptions::with_workers(1)
                },
                |request: &Request| fib::serve(request, 1000),
            )
            .start()
    };
    let server = serve_as(&server_user).unwrap();
    let client = Client::connect(&client_user.url()).unwrap();
    let call = amqp_rpc::Call::new("10").to(amqp_rpc::Destination::exchange(&exchange, "math.fib"));
    assert_eq!(client.send(&call).unwrap().body(), b"55");
    server.shutdown().unwrap();
    // Without configure on the exchange, the server is refused at start, with the reason.
    let denied = TestUser::with_permissions(
        &format!("^{q}$"),
        &format!("^(amq\\.default|{q})$"),
        &format!("^({q}|{e})$"),
    );
    let error = serve_as(&denied).expect_err("not granted");
    assert!(
        matches!(&error, Error::Refused { code: 403, text } if text.contains(&exchange)),
        "{error:?}"
    );
    let mut connection = raw_connection();
    let _ = connection
        .open_channel(None)
        .unwrap()
        .exchange_delete(exchange.as_str(), false);
    let _ = connection.close();
}

#[test]
fn replies_that_flood_an_idle_client_are_dropped_not_kept() {
    const FLOOD: usize = 10_000;
    let queue = unique_queue("flood");
    let _guard = QueueGuard(queue.clone());
    // A hostile server: answers the call, then floods the caller's reply queue with replies
    // nobody awaits, after the call has returned.
    let mut replies: Vec<(common::ReplyId, &'static [u8])> = vec![(common::ReplyId::Own, b"real")];
    replies.extend((0..FLOOD).map(|_| (common::ReplyId::Other("nobody's"), &b"flood"[..])));
    let peer = common::scripted_peer(&queue, vec![replies]);
    let client = common::client_for(&queue, Duration::from_secs(30));
    assert_eq!(client.call(b"x").unwrap(), b"real");
    peer.join().unwrap();
    // No call waits; the flood is drained all the same, not kept until the next call.
    common::wait_until("the whole flood is dropped", || {
        client.stats().stray_replies == FLOOD as u64
    });
}
