//! Rate-limited log lines: a burst of the same warning (every webhook
//! refused while the spool is full, say) is one line per key and period,
//! with the count of those left out, not thousands of lines.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct LogThrottle {
    every: Duration,
    slots: Mutex<HashMap<String, Slot>>,
}

struct Slot {
    last: Instant,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when a line about `key` may be written at `now`, `n` being
    /// how many were left out since the last one; `None` to leave it out.
    /// Keys are few (a reason, an event and a destination): the caller
    /// never builds one from what a request carries.
    pub fn allow(&self, key: &str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get_mut(key) {
            Some(slot) if now.saturating_duration_since(slot.last) < self.every => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                slot.last = now;
                Some(std::mem::take(&mut slot.suppressed))
            }
            None => {
                slots.insert(
                    key.to_owned(),
                    Slot {
                        last: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_and_period_with_the_count_left_out() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // (key, seconds after t0, expected)
        let steps: &[(&str, u64, Option<u64>)] = &[
            ("overloaded", 0, Some(0)),
            ("overloaded", 1, None),
            ("overloaded", 9, None),
            ("bad_signature", 9, Some(0)),
            ("overloaded", 10, Some(2)),
            ("overloaded", 11, None),
            ("overloaded", 30, Some(1)),
            ("overloaded", 45, Some(0)),
            ("bad_signature", 45, Some(0)),
        ];
        for (key, s, want) in steps {
            assert_eq!(throttle.allow(key, at(*s)), *want, "{key} at {s}s");
        }
    }
}
