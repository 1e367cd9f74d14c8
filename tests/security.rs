//! Security: no password in any error, help text or log line; replies only to queues a client
//! could own; bounded, sanitised input on the client.

mod common;

use std::process::Command;
use std::time::Duration;

use amqp_rpc::{Client, ClientOptions, Error, HandlerError, QueueOptions, Request, Server, fib};
use common::process::text;
use common::{
    QueueGuard, declare_queue, host_and_port, rabbitmqctl, raw_connection, ready_messages,
    require_broker, start_fib_server, start_server, unique_queue,
};

/// A broker user made for one test, with full permissions on the default vhost; deleted when
/// dropped.
struct TestUser {
    name: String,
    password: String,
}

impl TestUser {
    fn new() -> TestUser {
        let id = uuid::Uuid::new_v4();
        let user = TestUser {
            name: format!("amqp-rpc-test-{id}"),
            password: format!("pw-{id}"),
        };
        rabbitmqctl(&["add_user", &user.name, &user.password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
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
        let error = Client::connect(&url).err().expect("cannot connect");
        for shown in [error.chain(), format!("{error:?}")] {
            assert!(!shown.contains(secret), "{url}: {shown}");
        }
    }
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

    // One worker: the forged request is taken before the call that follows it.
    let server = start_fib_server(&queue, 1);
    publish_to_victim(&channel);
    let client = common::client_for(&queue, Duration::from_secs(10));
    assert_eq!(client.call(b"11").unwrap(), b"89");
    assert_eq!(
        ready_messages(&victim),
        0,
        "nothing written into the victim queue"
    );
    assert_eq!(server.stats().queues[0].refused_reply_to, 1);
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
