//! Rate limits for log lines a guest can trigger at will (a broken queue after every reset,
//! a refused activation, an unsupported sleep state): the first occurrence is logged, then at
//! most one line per [`INTERVAL`], which says how many were left out. The guest's conduct is
//! still counted in full by the devices' counters; only the log is spared.

use std::time::{Duration, Instant};

/// At most one line per limiter in this time, after the first.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// One rate-limited log line.
#[derive(Debug, Default, Clone)]
pub struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// Whether to log now: `Some(n)` with the `n` occurrences left out since the last line,
    /// or `None` to stay silent (the occurrence is counted for the next line).
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// `tracing::warn!` through a [`LogLimit`]: logs with a `suppressed` field counting the lines
/// left out before it, or not at all.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_logs_the_first_then_one_per_interval_with_the_count_left_out() {
        let mut limit = LogLimit::default();
        let t0 = Instant::now();
        assert_eq!(limit.allow_at(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(limit.allow_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(limit.allow_at(t0 + INTERVAL), Some(1000));
        assert_eq!(limit.allow_at(t0 + INTERVAL + Duration::from_secs(1)), None);
        assert_eq!(limit.allow_at(t0 + INTERVAL * 3), Some(1));
    }
}
