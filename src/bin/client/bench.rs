//! `client --bench`: many calls from several threads, with several in flight per thread, to
//! one destination or spread over several.
//!
//! Every thread calls through a clone of one [`Client`], the way a program with many calling
//! threads should. With `inflight` above 1 a thread sends its calls in batches of that size
//! with [`Client::send_many`], and every call of a batch is counted with the batch's
//! latency. With several destinations, each thread's calls go to each in turn. Errors are
//! counted, not fatal: a call that fails is followed by the next (which reconnects if the
//! connection was lost).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use amqp_rpc::{Call, Client, ClientOptions, ClientStats, Destination, Error, Result};

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
    /// Where the calls go, in turn; none: the client's default queue.
    pub destinations: Vec<Destination>,
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
    /// Per destination, in [`BenchOptions::destinations`] order, when there are several.
    pub destinations: Vec<(Destination, BenchReport)>,
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

/// Runs the benchmark against the server queue named in `client`, or the destinations of
/// `options`. `progress` is called from
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
            thread::spawn(move || -> (Vec<Tally>, Instant) {
                connected.wait();
                let tallies = call_repeatedly(&client, index, share, &options, &done);
                (tallies, Instant::now())
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
    let mut per_destination: Vec<Tally> = Vec::new();
    for worker in workers {
        let (tallies, thread_finished) = worker.join().expect("a benchmark thread panicked");
        per_destination.resize_with(tallies.len(), Tally::default);
        for (sum, tally) in per_destination.iter_mut().zip(tallies) {
            sum.add(tally);
        }
        finished = finished.max(thread_finished);
    }
    let elapsed = finished - started;
    let stats = shared.stats();
    let mut total = Tally::default();
    let mut destinations = Vec::new();
    for (destination, tally) in options.destinations.iter().zip(&per_destination) {
        destinations.push((destination.clone(), tally.report(elapsed, stats)));
    }
    for tally in per_destination {
        total.add(tally);
    }
    let mut report = total.report(elapsed, stats);
    if destinations.len() > 1 {
        report.destinations = destinations;
    }
    Ok(report)
}

/// What one thread saw of the calls to one destination, or what all saw.
#[derive(Default)]
struct Tally {
    calls: usize,
    errors: usize,
    connection_errors: usize,
    mismatched: usize,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.connection_errors += other.connection_errors;
        self.mismatched += other.mismatched;
        self.latencies_us.extend(other.latencies_us);
    }

    fn report(&self, elapsed: Duration, stats: ClientStats) -> BenchReport {
        let mut latencies_us = self.latencies_us.clone();
        latencies_us.sort_unstable();
        BenchReport {
            calls: self.calls,
            errors: self.errors,
            connection_errors: self.connection_errors,
            mismatched: self.mismatched,
            elapsed,
            latencies_us,
            stats,
            destinations: Vec::new(),
        }
    }
}

/// Makes `calls` calls, `inflight` at a time, from thread number `thread`: one tally per
/// destination (one when the calls go to the client's default).
fn call_repeatedly(
    client: &Client,
    thread: usize,
    calls: usize,
    options: &BenchOptions,
    done: &AtomicUsize,
) -> Vec<Tally> {
    let timeout = client.options().timeout;
    let destinations = options.destinations.len().max(1);
    let mut tallies: Vec<Tally> = (0..destinations).map(|_| Tally::default()).collect();
    // Call `i` of the cycle goes to destination `i % destinations`, so that any window of it
    // takes the destinations in turn. Built once: the calls of a batch are a slice of it, and
    // the benchmark measures the client, not the building of its calls.
    let cycle: Vec<Call> = (0..options.inflight + destinations - 1)
        .map(|i| {
            let call = Call::new(options.request.clone()).with_timeout(timeout);
            match options.destinations.get(i % destinations) {
                Some(destination) => call.to(destination.clone()),
                None => call,
            }
        })
        .collect();
    // Each thread starts at another destination, so that the first calls spread too.
    let mut next = thread;
    let mut remaining = calls;
    while remaining > 0 {
        let batch = remaining.min(options.inflight);
        let start = next % destinations;
        next += batch;
        let requests = &cycle[start..start + batch];
        let targets = (start..start + batch).map(|i| i % destinations);
        let started = Instant::now();
        let outcomes = client.send_many(requests);
        let latency = started.elapsed().as_micros() as u64;
        for (outcome, target) in outcomes.into_iter().zip(targets) {
            let tally = &mut tallies[target];
            tally.calls += 1;
            match outcome.map(amqp_rpc::Reply::into_body) {
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
    tallies
}
