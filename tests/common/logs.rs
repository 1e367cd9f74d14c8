//! The library's log records, kept in memory so that a test can wait for a line: what a
//! client or server says it did is observable state, and waiting on it beats a sleep.

use std::sync::{Mutex, Once};

use log::{LevelFilter, Log, Metadata, Record};

/// Every captured record's message, oldest first.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps this crate's records, at every level.
struct Capture;

impl Log for Capture {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.target().starts_with("amqp_rpc")
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            LINES.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

/// Starts capturing; the first call in a test binary installs the logger, later calls do
/// nothing. A test binary that calls it must install no other logger.
pub fn capture() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(LevelFilter::Trace);
    });
}

/// True once a captured line contains `text`.
pub fn logged(text: &str) -> bool {
    times_logged(text) > 0
}

/// How many captured lines contain `text`.
pub fn times_logged(text: &str) -> usize {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(text))
        .count()
}
