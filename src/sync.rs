//! What the client and the server both need around threads and time: a lock, and a wait on a
//! condition variable, that keep working after a panic elsewhere, and a deadline that never
//! overflows.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Locks `mutex`. A panic in another thread while it held the lock leaves the data as that
/// thread left it; nothing this crate guards can be left half-changed by a panic (no code that
/// can panic runs while a lock is held), so the data is used as it is.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `condvar` with `guard`'s lock released, until notified or `timeout` has passed,
/// and returns the lock taken again; a panic elsewhere is handled as by [`lock`].
pub(crate) fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .0
}

/// The instant `timeout` after `start`; for timeouts too long to represent (`Duration::MAX`),
/// a century later, which nothing waits out.
pub(crate) fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    start
        .checked_add(timeout)
        .or_else(|| start.checked_add(CENTURY))
        .unwrap_or(start + DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            deadline_after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(deadline_after(now, Duration::MAX) > now + Duration::from_secs(3600 * 24 * 365));
    }
}
