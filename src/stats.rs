//! Statistics: what a client's calls and a server's requests did, counted as they happen.
//!
//! Counting stays on always, so it must cost next to nothing: counters are atomics, and
//! latencies go into bucketed histograms from the `prometheus` crate, whose observations are
//! lock-free. Nothing on a call's path takes a lock for statistics. A server's counters live
//! in a Prometheus registry of its own, which [`crate::Server::metrics_text`] and the
//! `/metrics` endpoint expose; [`ClientStats`] and [`ServerStats`] are snapshots for programs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::error::Error;
use crate::message::FailureKind;

/// Latency buckets, in seconds: 100 µs to 60 s, about 1.5x apart below 10 ms (where calls
/// over a broker on a LAN fall) and wider above.
const LATENCY_BUCKETS: [f64; 24] = [
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency distribution: how many latencies were recorded, three percentiles and the
/// largest. Each percentile is within 1.6% of the exact one (the latencies are counted in
/// buckets 1/32 of a power of two wide, and a percentile is its bucket's middle, never above
/// the largest latency seen), exact below 32 µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    /// How many latencies were recorded.
    pub count: u64,
    /// The median.
    pub p50: Duration,
    /// The 90th percentile.
    pub p90: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The largest.
    pub max: Duration,
}

/// Records latencies twice: in a Prometheus histogram, whose coarse buckets `/metrics`
/// exposes, and in [`FineCounts`], from which [`Latency`]'s percentiles come. The Prometheus
/// buckets alone made every percentile a bucket's upper bound, 1.5x apart: with 64 threads,
/// p50, p90 and p99 all read 15,000 µs where the exact ones were 10,094, 12,500 and 14,213.
pub(crate) struct LatencyRecorder {
    histogram: Histogram,
    fine: FineCounts,
    max_micros: AtomicU64,
}

/// How many sub-buckets each power of two of microseconds is split into: 32, so that a
/// bucket is at most 1/32 of its lower bound wide.
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;

/// Latencies counted in log-linear buckets of microseconds (as HdrHistogram does): exact
/// below [`SUB_BUCKETS`] µs, then [`SUB_BUCKETS`] buckets per power of two. Recording is one
/// atomic add, without a lock; 1,920 buckets cover every `u64` of microseconds.
struct FineCounts {
    counts: Box<[AtomicU64]>,
}

impl FineCounts {
    fn new() -> FineCounts {
        let buckets = SUB_BUCKETS + (64 - SUB_BUCKET_BITS as usize) * SUB_BUCKETS;
        FineCounts {
            counts: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The bucket of `micros`.
    fn bucket(micros: u64) -> usize {
        if micros < SUB_BUCKETS as u64 {
            return micros as usize;
        }
        let magnitude = 63 - micros.leading_zeros();
        let shift = magnitude - SUB_BUCKET_BITS;
        // The bits below the leading one, its next five.
        let sub = ((micros >> shift) as usize) & (SUB_BUCKETS - 1);
        SUB_BUCKETS + shift as usize * SUB_BUCKETS + sub
    }

    /// The middle of bucket `index`, in microseconds.
    fn middle(index: usize) -> u64 {
        if index < SUB_BUCKETS {
            return index as u64;
        }
        let shift = ((index - SUB_BUCKETS) / SUB_BUCKETS) as u32;
        let sub = ((index - SUB_BUCKETS) % SUB_BUCKETS) as u64;
        let low = (SUB_BUCKETS as u64 + sub) << shift;
        low + ((1u64 << shift) >> 1)
    }

    fn record(&self, micros: u64) {
        self.counts[FineCounts::bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts, and their total.
    fn snapshot(&self) -> (Vec<u64>, u64) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();
        let total = counts.iter().sum();
        (counts, total)
    }
}

impl LatencyRecorder {
    fn new(histogram: Histogram) -> LatencyRecorder {
        LatencyRecorder {
            histogram,
            fine: FineCounts::new(),
            max_micros: AtomicU64::new(0),
        }
    }

    fn standalone(name: &str, help: &str) -> LatencyRecorder {
        let options = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        LatencyRecorder::new(Histogram::with_opts(options).expect("valid histogram options"))
    }

    pub(crate) fn record(&self, latency: Duration) {
        self.histogram.observe(latency.as_secs_f64());
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.fine.record(micros);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Latency {
        let (counts, count) = self.fine.snapshot();
        let max_micros = self.max_micros.load(Ordering::Relaxed);
        let percentile = |fraction: f64| {
            if count == 0 {
                return Duration::ZERO;
            }
            let rank = ((fraction * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            let bucket = counts
                .iter()
                .position(|&in_bucket| {
                    seen += in_bucket;
                    seen >= rank
                })
                .unwrap_or(counts.len() - 1);
            Duration::from_micros(FineCounts::middle(bucket).min(max_micros))
        };
        Latency {
            count,
            p50: percentile(0.50),
            p90: percentile(0.90),
            p99: percentile(0.99),
            max: Duration::from_micros(max_micros),
        }
    }
}

/// Errors by what happened, as a client counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// [`Error::Timeout`], and [`Error::Blocked`] for calls that were sent and timed out.
    pub timeout: u64,
    /// [`Error::NoRoute`] and [`Error::NoExchange`].
    pub no_route: u64,
    /// [`Error::NoServer`].
    pub no_server: u64,
    /// [`Error::Remote`], by the kind the server sent.
    pub remote: KindCounts,
    /// [`Error::ConnectionLost`].
    pub connection_lost: u64,
    /// [`Error::Overloaded`]: calls refused by the client's own cap.
    pub overloaded: u64,
    /// Every other error (connecting, refused by the broker, an invalid reply, not sent to a
    /// broker that blocks the connection...).
    pub other: u64,
}

/// Counts by [`FailureKind`], and for error replies that name none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// `bad-request`.
    pub bad_request: u64,
    /// `handler-failed`.
    pub handler_failed: u64,
    /// `overloaded`.
    pub overloaded: u64,
    /// `deadline-exceeded`.
    pub deadline_exceeded: u64,
    /// An error reply without a kind (an older server, a pika peer).
    pub unknown: u64,
}

impl KindCounts {
    /// Every error reply counted.
    pub fn total(&self) -> u64 {
        self.bad_request
            + self.handler_failed
            + self.overloaded
            + self.deadline_exceeded
            + self.unknown
    }
}

/// What a client's calls did since it was made: all its clones together.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClientStats {
    /// Calls made (each call of a batch counts), whatever became of them.
    pub calls: u64,
    /// Replies received for calls: results and error replies.
    pub replies: u64,
    /// Calls that failed, by why.
    pub errors: ErrorCounts,
    /// Replies that arrived after their call had timed out, dropped.
    pub late_replies: u64,
    /// Replies that no call awaited and none had awaited (duplicates, strays), dropped.
    pub stray_replies: u64,
    /// Replies from another user than [`crate::ClientOptions::server_user`], dropped.
    pub rejected_replies: u64,
    /// Calls sent again after a lost connection ([`crate::ClientOptions::retry`]).
    pub retries: u64,
    /// Connections made again after one was lost.
    pub reconnections: u64,
    /// From the start of a call to its reply, for the calls that got one.
    pub latency: Latency,
}

/// A client's counters; shared by its clones and its sessions.
pub(crate) struct ClientCounters {
    calls: AtomicU64,
    replies: AtomicU64,
    timeout: AtomicU64,
    no_route: AtomicU64,
    no_server: AtomicU64,
    remote: [AtomicU64; 5],
    connection_lost: AtomicU64,
    overloaded: AtomicU64,
    other: AtomicU64,
    pub(crate) late_replies: AtomicU64,
    pub(crate) stray_replies: AtomicU64,
    pub(crate) rejected_replies: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) reconnections: AtomicU64,
    pub(crate) latency: LatencyRecorder,
}

/// The index of a failure kind in [`ClientCounters::remote`] and [`QueueMetrics::replies`];
/// 4 for none.
fn kind_index(kind: Option<FailureKind>) -> usize {
    match kind {
        Some(FailureKind::BadRequest) => 0,
        Some(FailureKind::HandlerFailed) => 1,
        Some(FailureKind::Overloaded) => 2,
        Some(FailureKind::DeadlineExceeded) => 3,
        None => 4,
    }
}

impl ClientCounters {
    pub(crate) fn new() -> ClientCounters {
        ClientCounters {
            calls: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
            no_route: AtomicU64::new(0),
            no_server: AtomicU64::new(0),
            remote: Default::default(),
            connection_lost: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            other: AtomicU64::new(0),
            late_replies: AtomicU64::new(0),
            stray_replies: AtomicU64::new(0),
            rejected_replies: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            reconnections: AtomicU64::new(0),
            latency: LatencyRecorder::standalone(
                "amqp_rpc_client_call_seconds",
                "From the start of a call to its reply",
            ),
        }
    }

    /// Counts a finished call by its outcome.
    pub(crate) fn count<T>(&self, outcome: &Result<T, Error>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            Ok(_) => &self.replies,
            Err(Error::Remote { kind, .. }) => {
                self.replies.fetch_add(1, Ordering::Relaxed);
                &self.remote[kind_index(*kind)]
            }
            Err(Error::Timeout { .. } | Error::Blocked { after: Some(_), .. }) => &self.timeout,
            Err(Error::NoRoute { .. } | Error::NoExchange { .. }) => &self.no_route,
            Err(Error::NoServer { .. }) => &self.no_server,
            Err(Error::ConnectionLost(_)) => &self.connection_lost,
            Err(Error::Overloaded { .. }) => &self.overloaded,
            Err(_) => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, count: u64) {
        counter.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ClientStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ClientStats {
            calls: get(&self.calls),
            replies: get(&self.replies),
            errors: ErrorCounts {
                timeout: get(&self.timeout),
                no_route: get(&self.no_route),
                no_server: get(&self.no_server),
                remote: KindCounts {
                    bad_request: get(&self.remote[0]),
                    handler_failed: get(&self.remote[1]),
                    overloaded: get(&self.remote[2]),
                    deadline_exceeded: get(&self.remote[3]),
                    unknown: get(&self.remote[4]),
                },
                connection_lost: get(&self.connection_lost),
                overloaded: get(&self.overloaded),
                other: get(&self.other),
            },
            late_replies: get(&self.late_replies),
            stray_replies: get(&self.stray_replies),
            rejected_replies: get(&self.rejected_replies),
            retries: get(&self.retries),
            reconnections: get(&self.reconnections),
            latency: self.latency.snapshot(),
        }
    }
}

impl ErrorCounts {
    /// Every failed call.
    pub fn total(&self) -> u64 {
        self.timeout
            + self.no_route
            + self.no_server
            + self.remote.total()
            + self.connection_lost
            + self.overloaded
            + self.other
    }
}

/// What state a server is in.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Connecting for the first time.
    Connecting,
    /// Every worker consumes its queue.
    Serving {
        /// Since when.
        since: SystemTime,
    },
    /// The connection was lost; connecting again, with backoff.
    Reconnecting {
        /// Since when: the first failure of this outage.
        since: SystemTime,
        /// The latest failure, one line.
        reason: String,
    },
    /// Shutting down: finishing the requests in flight.
    Draining,
    /// Stopped.
    Stopped,
}

impl Health {
    /// The state's name: `connecting`, `serving`, `reconnecting`, `draining` or `stopped`.
    pub fn name(&self) -> &'static str {
        match self {
            Health::Connecting => "connecting",
            Health::Serving { .. } => "serving",
            Health::Reconnecting { .. } => "reconnecting",
            Health::Draining => "draining",
            Health::Stopped => "stopped",
        }
    }

    /// True while every worker consumes its queue.
    pub fn is_serving(&self) -> bool {
        matches!(self, Health::Serving { .. })
    }
}

/// Replies a server sent, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyCounts {
    /// Results.
    pub ok: u64,
    /// Error replies, by kind (`unknown` stays 0: a server always names the kind).
    pub errors: KindCounts,
}

/// What one queue of a server did since the server started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Requests taken from the queue.
    pub requests: u64,
    /// Replies sent, by outcome.
    pub replies: ReplyCounts,
    /// Time in the handler, per request it ran.
    pub handler_time: Latency,
    /// Requests the broker delivered again (after a server died or a channel closed).
    pub redeliveries: u64,
    /// Requests acked without running the handler, their deadline having passed.
    pub skipped_past_deadline: u64,
    /// Requests acked without running the handler, their `reply_to` not being one the server
    /// answers ([`crate::QueueOptions::reply_to`]).
    pub refused_reply_to: u64,
    /// Requests answered with an error without running the handler, having been delivered
    /// as many times as [`crate::QueueOptions::delivery_limit`] allows without an answer.
    pub over_delivery_limit: u64,
    /// Workers running a handler at this moment.
    pub workers_busy: i64,
}

/// What a server did since it started, and its state.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerStats {
    /// Per queue, in the order they were added.
    pub queues: Vec<QueueStats>,
    /// Connections made again after one was lost.
    pub reconnections: u64,
    /// The server's state.
    pub health: Health,
}

/// The outcomes of a reply, as `outcome` label values.
const OUTCOMES: [&str; 5] = [
    "ok",
    "bad-request",
    "handler-failed",
    "overloaded",
    "deadline-exceeded",
];

/// The states, as `state` label values.
const STATES: [&str; 5] = [
    "connecting",
    "serving",
    "reconnecting",
    "draining",
    "stopped",
];

/// A server's metrics, in a Prometheus registry of its own.
pub(crate) struct ServerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    replies: IntCounterVec,
    handler_seconds: HistogramVec,
    redeliveries: IntCounterVec,
    skipped: IntCounterVec,
    busy: IntGaugeVec,
    pub(crate) reconnections: IntCounter,
    up: IntGauge,
    state: IntGaugeVec,
}

/// One queue's metric handles, resolved once so that counting takes no label lookup.
pub(crate) struct QueueMetrics {
    queue: String,
    pub(crate) requests: IntCounter,
    /// By [`OUTCOMES`] index: results first, then the failure kinds in [`kind_index`] order.
    replies: [IntCounter; 5],
    pub(crate) handler_time: LatencyRecorder,
    pub(crate) redeliveries: IntCounter,
    pub(crate) skipped_past_deadline: IntCounter,
    pub(crate) refused_reply_to: IntCounter,
    pub(crate) over_delivery_limit: IntCounter,
    pub(crate) busy: IntGauge,
}

impl QueueMetrics {
    /// Counts a reply: a result (`None`) or an error reply of `kind`.
    pub(crate) fn count_reply(&self, kind: Option<FailureKind>) {
        let index = kind.map_or(0, |kind| 1 + kind_index(Some(kind)));
        self.replies[index].inc();
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

impl ServerMetrics {
    pub(crate) fn new() -> ServerMetrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        };
        let requests = counter_vec(
            "amqp_rpc_server_requests_total",
            "Requests taken from the queue",
            &["queue"],
        );
        let replies = counter_vec(
            "amqp_rpc_server_replies_total",
            "Replies sent, by outcome: ok, or the error kind",
            &["queue", "outcome"],
        );
        let redeliveries = counter_vec(
            "amqp_rpc_server_redeliveries_total",
            "Requests the broker delivered again",
            &["queue"],
        );
        let skipped = counter_vec(
            "amqp_rpc_server_skipped_total",
            "Requests acked without running the handler, by reason",
            &["queue", "reason"],
        );
        let handler_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "amqp_rpc_server_handler_seconds",
                    "Time in the handler, per request",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["queue"],
            )
            .expect("valid histogram"),
        );
        let busy = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "amqp_rpc_server_workers_busy",
                    "Workers running a handler now",
                ),
                &["queue"],
            )
            .expect("valid gauge"),
        );
        let reconnections = register(
            &registry,
            IntCounter::new(
                "amqp_rpc_server_reconnections_total",
                "Connections made again after one was lost",
            )
            .expect("valid counter"),
        );
        let up = register(
            &registry,
            IntGauge::new(
                "amqp_rpc_server_up",
                "1 while every worker consumes its queue, else 0",
            )
            .expect("valid gauge"),
        );
        let state = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "amqp_rpc_server_state",
                    "1 for the state the server is in, 0 for the others",
                ),
                &["state"],
            )
            .expect("valid gauge"),
        );
        let metrics = ServerMetrics {
            registry,
            requests,
            replies,
            handler_seconds,
            redeliveries,
            skipped,
            busy,
            reconnections,
            up,
            state,
        };
        metrics.set_health(&Health::Connecting);
        metrics
    }

    /// The handles of `queue`'s metrics.
    pub(crate) fn queue(&self, queue: &str) -> QueueMetrics {
        let reply = |outcome: &str| self.replies.with_label_values(&[queue, outcome]);
        QueueMetrics {
            queue: queue.to_string(),
            requests: self.requests.with_label_values(&[queue]),
            replies: OUTCOMES.map(reply),
            handler_time: LatencyRecorder::new(self.handler_seconds.with_label_values(&[queue])),
            redeliveries: self.redeliveries.with_label_values(&[queue]),
            skipped_past_deadline: self.skipped.with_label_values(&[queue, "deadline"]),
            refused_reply_to: self.skipped.with_label_values(&[queue, "reply-to"]),
            over_delivery_limit: self.skipped.with_label_values(&[queue, "delivery-limit"]),
            busy: self.busy.with_label_values(&[queue]),
        }
    }

    /// Shows `health` in the `up` and `state` gauges.
    pub(crate) fn set_health(&self, health: &Health) {
        self.up.set(i64::from(health.is_serving()));
        for state in STATES {
            self.state
                .with_label_values(&[state])
                .set(i64::from(state == health.name()));
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub(crate) fn text(&self) -> String {
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut text)
            .expect("the text encoder writes to a string");
        text
    }
}

impl QueueMetrics {
    pub(crate) fn snapshot(&self) -> QueueStats {
        let kinds = |index: usize| self.replies[index].get();
        QueueStats {
            queue: self.queue.clone(),
            requests: self.requests.get(),
            replies: ReplyCounts {
                ok: kinds(0),
                errors: KindCounts {
                    bad_request: kinds(1),
                    handler_failed: kinds(2),
                    overloaded: kinds(3),
                    deadline_exceeded: kinds(4),
                    unknown: 0,
                },
            },
            handler_time: self.handler_time.snapshot(),
            redeliveries: self.redeliveries.get(),
            skipped_past_deadline: self.skipped_past_deadline.get(),
            refused_reply_to: self.refused_reply_to.get(),
            over_delivery_limit: self.over_delivery_limit.get(),
            workers_busy: self.busy.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_buckets_hold_their_values_and_are_at_most_a_32nd_wide() {
        for micros in [
            0,
            1,
            31,
            32,
            33,
            63,
            64,
            1000,
            10_094,
            123_456_789,
            u64::MAX / 3,
        ] {
            let bucket = FineCounts::bucket(micros);
            let middle = FineCounts::middle(bucket);
            let error = (middle as f64 - micros as f64).abs() / (micros.max(1) as f64);
            assert!(
                error <= 1.0 / 64.0,
                "{micros} µs: bucket {bucket}, middle {middle}"
            );
        }
        assert_eq!(
            FineCounts::bucket(u64::MAX),
            FineCounts::new().counts.len() - 1
        );
    }

    #[test]
    fn percentiles_are_within_two_percent_of_the_exact_ones() {
        let recorder = LatencyRecorder::standalone("test_seconds", "a test");
        // 10,000 latencies from 80 µs to 80 ms, spread over three orders of magnitude.
        let mut exact: Vec<u64> = (0..10_000u64)
            .map(|i| (80.0 * 1000f64.powf(((i * 7919) % 10_000) as f64 / 10_000.0)) as u64)
            .collect();
        for &micros in &exact {
            recorder.record(Duration::from_micros(micros));
        }
        exact.sort_unstable();
        let latency = recorder.snapshot();
        assert_eq!(latency.count, 10_000);
        for (fraction, measured) in [
            (0.50, latency.p50),
            (0.90, latency.p90),
            (0.99, latency.p99),
        ] {
            let truth = exact[(fraction * 10_000.0) as usize - 1] as f64;
            let error = (measured.as_micros() as f64 - truth).abs() / truth;
            assert!(
                error < 0.02,
                "p{}: {measured:?} for {truth} µs",
                fraction * 100.0
            );
        }
        assert_eq!(latency.max, Duration::from_micros(*exact.last().unwrap()));
    }

    #[test]
    fn percentiles_come_from_the_buckets_and_never_pass_the_largest() {
        let recorder = LatencyRecorder::standalone("t", "t");
        assert_eq!(recorder.snapshot(), Latency::default());
        for _ in 0..90 {
            recorder.record(Duration::from_micros(300));
        }
        for _ in 0..10 {
            recorder.record(Duration::from_millis(20));
        }
        let latency = recorder.snapshot();
        assert_eq!(latency.count, 100);
        assert_eq!(
            latency.p50,
            Duration::from_micros(300),
            "the 200-300 µs bucket"
        );
        assert_eq!(latency.p90, Duration::from_micros(300));
        assert_eq!(
            latency.p99,
            Duration::from_millis(20),
            "capped at the largest"
        );
        assert_eq!(latency.max, Duration::from_millis(20));
    }

    #[test]
    fn calls_are_counted_by_outcome() {
        let counters = ClientCounters::new();
        counters.count(&Ok(()));
        counters.count::<()>(&Err(Error::Remote {
            kind: Some(FailureKind::BadRequest),
            message: String::new(),
        }));
        counters.count::<()>(&Err(Error::NoRoute {
            destination: crate::Destination::queue("q"),
        }));
        let stats = counters.snapshot();
        assert_eq!((stats.calls, stats.replies), (3, 2));
        assert_eq!(stats.errors.remote.bad_request, 1);
        assert_eq!(stats.errors.no_route, 1);
        assert_eq!(stats.errors.total(), 2);
    }

    #[test]
    fn the_server_metrics_render_as_prometheus_text() {
        let metrics = ServerMetrics::new();
        let queue = metrics.queue("q");
        queue.requests.inc();
        queue.count_reply(None);
        queue.count_reply(Some(FailureKind::BadRequest));
        queue.handler_time.record(Duration::from_millis(2));
        metrics.set_health(&Health::Serving {
            since: SystemTime::now(),
        });
        let text = metrics.text();
        assert!(
            text.contains("amqp_rpc_server_requests_total{queue=\"q\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outcome=\"bad-request\",queue=\"q\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("amqp_rpc_server_handler_seconds_count{queue=\"q\"} 1"),
            "{text}"
        );
        assert!(text.contains("amqp_rpc_server_up 1"), "{text}");
        let stats = queue.snapshot();
        assert_eq!((stats.requests, stats.replies.ok), (1, 1));
        assert_eq!(stats.replies.errors.bad_request, 1);
    }
}
