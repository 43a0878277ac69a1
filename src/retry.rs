//! The one retry policy of the service: exponential backoff with a ceiling, used by every loop
//! that waits out an outage (RabbitMQ connections, database writes that must not be lost, the
//! scheduler's leadership session, the notification listener).
//!
//! Loops keep their own decision about *whether* to retry (a stop token, an unusable channel);
//! this type only decides *how long* to wait, so the delays are the same everywhere.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delays that double from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max, next: initial }
    }

    /// For reconnecting to RabbitMQ or Postgres: 100 ms doubling to 5 s.
    pub const fn reconnect() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// For retrying a write that must not be lost: 200 ms doubling to 5 s.
    pub const fn write() -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// For republishing a result the broker refused: 1 s doubling to 60 s.
    pub const fn publish() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// The delay after the `failures`-th failure in a row (1 is the first), for state kept
    /// outside this type, e.g. a row's attempt counter.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }

    /// The delay before the next attempt (what to log as `retry_in`).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Returns the delay to wait now and doubles the next one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success: the next failure starts a new streak.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Waits the next delay. False when `stop` was cancelled first (the caller should return).
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let d = self.next_delay();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Waits the next delay, with no way to stop early (for a write held until it succeeds).
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let seen: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seen, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
        let after: Vec<u64> = (1..=5).map(|n| b.delay_after(n).as_millis() as u64).collect();
        assert_eq!(after, seen, "a counter of failures gives the same delays as a streak");
        assert_eq!(b.delay_after(0), Duration::from_millis(100));
        assert_eq!(b.delay_after(u32::MAX), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn wait_sleeps_the_delay_unless_stopped() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(600));
        let start = std::time::Instant::now();
        assert!(b.wait(&stop).await, "not stopped: waits the delay");
        assert!(start.elapsed() >= Duration::from_millis(50));
        // The next delay is 100 ms, then 200 ms...; a cancelled token returns at once instead.
        for _ in 0..20 {
            b.next_delay();
        }
        assert_eq!(b.peek(), Duration::from_secs(600));
        stop.cancel();
        let start = std::time::Instant::now();
        assert!(!b.wait(&stop).await);
        // Generous: 600 s is the alternative, so anything under a minute proves it did not sleep.
        assert!(start.elapsed() < Duration::from_secs(60));
    }
}
