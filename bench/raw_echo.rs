//! The floor for the benchmark: a minimal RPC echo written directly on amiquip, with none of
//! this crate's code. Same shape as ours (exclusive reply queue, correlation ids, a worker pool
//! with qos(1), ack after reply, TCP_NODELAY), minus everything that makes it a product:
//! no timeouts, no returns, no expiration, no error replies, no reconnection.
//!
//!     raw_echo server QUEUE WORKERS
//!     raw_echo client QUEUE CALLS THREADS INFLIGHT [sliding]
//!
//! A client thread sends its calls in batches of INFLIGHT and waits for a whole batch, as
//! `client --bench --inflight` does; with `sliding` it keeps INFLIGHT calls in flight instead,
//! sending the next call as soon as any reply comes: the most one thread can get out of that
//! many calls in flight, with no thread hand-off between a reply and the next request.
//!
//! The client prints `calls=K errors=0 calls_per_s=X p50_us=Y p99_us=Z`, as `client --bench`.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use amiquip::{
    AmqpProperties, Auth, Connection, ConnectionOptions, ConnectionTuning, ConsumerMessage,
    ConsumerOptions, Publish, QueueDeclareOptions,
};

fn connect() -> Connection {
    let stream = TcpStream::connect("127.0.0.1:5672").expect("broker on 127.0.0.1:5672");
    stream.set_nodelay(true).unwrap();
    let stream = mio::net::TcpStream::from_stream(stream).unwrap();
    Connection::insecure_open_stream(
        stream,
        ConnectionOptions::<Auth>::default(),
        ConnectionTuning::default(),
    )
    .unwrap()
}

fn serve(queue: &str, workers: usize) {
    let mut connection = connect();
    let channels: Vec<_> = (0..workers)
        .map(|_| connection.open_channel(None).unwrap())
        .collect();
    channels[0]
        .queue_declare(queue, QueueDeclareOptions::default())
        .unwrap();
    println!("ready");
    let threads: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            let queue = queue.to_string();
            thread::spawn(move || {
                channel.qos(0, 1, false).unwrap();
                let consumer = channel
                    .basic_consume(queue, ConsumerOptions::default())
                    .unwrap();
                for message in consumer.receiver().iter() {
                    let ConsumerMessage::Delivery(delivery) = message else {
                        break;
                    };
                    let reply_to = delivery.properties.reply_to().clone().unwrap();
                    let properties = AmqpProperties::default()
                        .with_correlation_id(delivery.properties.correlation_id().clone().unwrap());
                    channel
                        .basic_publish(
                            "",
                            Publish::with_properties(&delivery.body, reply_to, properties),
                        )
                        .unwrap();
                    consumer.ack(delivery).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

fn call(
    connection: &Mutex<Connection>,
    queue: &str,
    calls: usize,
    inflight: usize,
    sliding: bool,
) -> Vec<u64> {
    let channel = connection.lock().unwrap().open_channel(None).unwrap();
    let reply_queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();
    let consumer = reply_queue
        .consume(ConsumerOptions {
            no_ack: true,
            ..ConsumerOptions::default()
        })
        .unwrap();
    let publish = |id: u64| {
        let properties = AmqpProperties::default()
            .with_reply_to(reply_queue.name().to_string())
            .with_correlation_id(id.to_string());
        channel
            .basic_publish("", Publish::with_properties(b"10", queue, properties))
            .unwrap();
    };
    let next_reply = || {
        let ConsumerMessage::Delivery(reply) = consumer.receiver().recv().unwrap() else {
            panic!("reply consumer ended");
        };
        reply
            .properties
            .correlation_id()
            .as_deref()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let mut latencies = Vec::with_capacity(calls);
    let mut next_id = 0u64;
    if sliding {
        let mut sent_at = HashMap::new();
        while latencies.len() < calls {
            while sent_at.len() < inflight && (next_id as usize) < calls {
                next_id += 1;
                publish(next_id);
                sent_at.insert(next_id, Instant::now());
            }
            let started = sent_at.remove(&next_reply()).unwrap();
            latencies.push(started.elapsed().as_micros() as u64);
        }
    } else {
        while latencies.len() < calls {
            let batch = (calls - latencies.len()).min(inflight);
            let started = Instant::now();
            let mut waiting = HashSet::new();
            for _ in 0..batch {
                next_id += 1;
                publish(next_id);
                waiting.insert(next_id);
            }
            while !waiting.is_empty() {
                waiting.remove(&next_reply());
            }
            let latency = started.elapsed().as_micros() as u64;
            latencies.extend(std::iter::repeat_n(latency, batch));
        }
    }
    // Dropping a consumer before its cancel is confirmed can kill the shared connection.
    consumer.cancel().unwrap();
    for message in consumer.receiver().iter() {
        if matches!(message, ConsumerMessage::ClientCancelled) {
            break;
        }
    }
    latencies
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let number = |index: usize| -> usize { args[index].parse().expect("a number") };
    match args.get(1).map(String::as_str) {
        Some("server") => serve(&args[2], number(3)),
        Some("client") => {
            let (calls, threads, inflight) = (number(3), number(4), number(5));
            let sliding = args.get(6).map(String::as_str) == Some("sliding");
            // One connection, a channel per thread (the floor's way to spread calls over threads).
            let connection = Arc::new(Mutex::new(connect()));
            let started = Instant::now();
            let workers: Vec<_> = (0..threads)
                .map(|index| {
                    let (queue, connection) = (args[2].clone(), Arc::clone(&connection));
                    let share = calls / threads + usize::from(index < calls % threads);
                    thread::spawn(move || call(&connection, &queue, share, inflight, sliding))
                })
                .collect();
            let mut latencies: Vec<u64> = workers
                .into_iter()
                .flat_map(|worker| worker.join().unwrap())
                .collect();
            let elapsed = started.elapsed();
            if let Ok(connection) = Arc::try_unwrap(connection) {
                connection.into_inner().unwrap().close().unwrap();
            }
            latencies.sort_unstable();
            let at = |fraction: f64| {
                latencies[((fraction * latencies.len() as f64) as usize).min(latencies.len() - 1)]
            };
            println!(
                "calls={calls} errors=0 calls_per_s={:.0} p50_us={} p99_us={}",
                calls as f64 / elapsed.as_secs_f64(),
                at(0.50),
                at(0.99)
            );
        }
        _ => eprintln!(
            "usage: raw_echo server QUEUE WORKERS | \
             raw_echo client QUEUE CALLS THREADS INFLIGHT [sliding]"
        ),
    }
}
