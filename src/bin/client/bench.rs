//! `client --bench`: many calls from several threads, with several in flight per thread.
//!
//! Every thread calls through a clone of one [`Client`], the way a program with many calling
//! threads should. With `inflight` above 1 a thread sends its calls in batches of that size
//! with [`Client::call_many`], and every call of a batch is counted with the batch's
//! latency. Errors are counted, not fatal: a call that fails is followed by the next (which
//! reconnects if the connection was lost).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{Client, ClientOptions, ClientStats, Error, Result};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Calls in all, shared out between the threads.
    pub calls: usize,
    /// Threads, all calling through clones of one client.
    pub threads: usize,
    /// Calls each thread keeps in flight at once.
    pub inflight: usize,
    /// The request body of every call.
    pub request: Vec<u8>,
    /// The reply every call must get; a different one counts as an error (and as mismatched).
    /// `None` accepts any reply.
    pub expected_reply: Option<Vec<u8>>,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Calls made.
    pub calls: usize,
    /// Calls that failed, whatever the reason (mismatched replies included).
    pub errors: usize,
    /// Calls that failed because their connection was lost.
    pub connection_errors: usize,
    /// Calls whose reply was not [`BenchOptions::expected_reply`].
    pub mismatched: usize,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
    /// Latency of every call that succeeded, sorted, in microseconds.
    pub latencies_us: Vec<u64>,
    /// What the shared client counted.
    pub stats: ClientStats,
}

impl BenchReport {
    /// Calls (failed ones included) per second of wall-clock time.
    pub fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency below which `fraction` (0 to 1) of the successful calls finished, in µs.
    pub fn percentile_us(&self, fraction: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let rank = (fraction * self.latencies_us.len() as f64).ceil() as usize;
        self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1]
    }
}

impl fmt::Display for BenchReport {
    /// The one-line summary `calls=K errors=E calls_per_s=X p50_us=Y p99_us=Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "calls={} errors={} calls_per_s={:.0} p50_us={} p99_us={}",
            self.calls,
            self.errors,
            self.calls_per_second(),
            self.percentile_us(0.50),
            self.percentile_us(0.99)
        )
    }
}

/// Runs the benchmark against the server queue named in `client`. `progress` is called from
/// the calling thread ten times a second with (calls done, calls in all).
///
/// # Errors
///
/// [`Error::Config`] for zero threads or zero in flight, and the errors of
/// [`Client::with_options`] when the client cannot connect at the start.
pub fn run(
    url: &str,
    client: &ClientOptions,
    options: &BenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<BenchReport> {
    if options.threads == 0 || options.inflight == 0 {
        return Err(Error::Config(
            "a benchmark needs at least one thread and one call in flight".into(),
        ));
    }
    let shared = Client::with_options(url, client.clone())?;
    // Every thread starts and waits here, so that starting threads is not measured.
    let connected = Arc::new(Barrier::new(options.threads + 1));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..options.threads)
        .map(|index| {
            let share = options.calls / options.threads
                + usize::from(index < options.calls % options.threads);
            let (client, options) = (shared.clone(), options.clone());
            let (connected, done) = (Arc::clone(&connected), Arc::clone(&done));
            thread::spawn(move || -> (Tally, Instant) {
                connected.wait();
                let tally = call_repeatedly(&client, share, &options, &done);
                (tally, Instant::now())
            })
        })
        .collect();
    connected.wait();
    let started = Instant::now();
    while workers.iter().any(|worker| !worker.is_finished()) {
        progress(done.load(Ordering::Relaxed), options.calls);
        thread::sleep(Duration::from_millis(100));
    }
    progress(done.load(Ordering::Relaxed), options.calls);
    // The run ends when its last thread does, not when this loop next looks.
    let mut finished = started;
    let mut total = Tally::default();
    for worker in workers {
        let (tally, thread_finished) = worker.join().expect("a benchmark thread panicked");
        total.errors += tally.errors;
        total.connection_errors += tally.connection_errors;
        total.mismatched += tally.mismatched;
        total.latencies_us.extend(tally.latencies_us);
        finished = finished.max(thread_finished);
    }
    total.latencies_us.sort_unstable();
    Ok(BenchReport {
        calls: options.calls,
        errors: total.errors,
        connection_errors: total.connection_errors,
        mismatched: total.mismatched,
        elapsed: finished - started,
        latencies_us: total.latencies_us,
        stats: shared.stats(),
    })
}

/// What one thread saw.
#[derive(Default)]
struct Tally {
    errors: usize,
    connection_errors: usize,
    mismatched: usize,
    latencies_us: Vec<u64>,
}

/// Makes `calls` calls, `inflight` at a time.
fn call_repeatedly(
    client: &Client,
    calls: usize,
    options: &BenchOptions,
    done: &AtomicUsize,
) -> Tally {
    let timeout = client.options().timeout;
    let mut tally = Tally {
        latencies_us: Vec::with_capacity(calls),
        ..Tally::default()
    };
    let mut remaining = calls;
    while remaining > 0 {
        let batch = remaining.min(options.inflight);
        let requests = vec![options.request.as_slice(); batch];
        let started = Instant::now();
        let outcomes = client.call_many(&requests, timeout);
        let latency = started.elapsed().as_micros() as u64;
        for outcome in outcomes {
            match outcome {
                Ok(reply) if options.expected_reply.as_ref().is_some_and(|e| *e != reply) => {
                    log::debug!("benchmark call got a wrong reply");
                    tally.errors += 1;
                    tally.mismatched += 1;
                }
                Ok(_) => tally.latencies_us.push(latency),
                Err(error) => {
                    log::debug!("benchmark call failed: {error}");
                    tally.errors += 1;
                    if error.is_connection_lost() {
                        tally.connection_errors += 1;
                    }
                }
            }
        }
        remaining -= batch;
        done.fetch_add(batch, Ordering::Relaxed);
    }
    tally
}
