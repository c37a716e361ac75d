//! When to try a delivery again: exponential backoff with full jitter, and
//! the downstream's `Retry-After`, which is a floor, never ignored.

use std::time::{Duration, SystemTime};

use http::HeaderValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `retry` (1 after the first failure),
    /// for a uniform `random` in [0, 1): anywhere from zero up to
    /// `initial * 2^(retry-1)`, capped at `max`. Full jitter spreads the
    /// retries of many jobs that failed together.
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let exp = retry.saturating_sub(1).min(32);
        let ceiling = self
            .initial
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max);
        ceiling.mul_f64(random.clamp(0.0, 1.0))
    }

    /// The wait before retry `retry`, no shorter than the downstream asked
    /// for with `Retry-After` (which is itself capped at `max`, so a
    /// downstream cannot park a job for days).
    pub fn next(&self, retry: u32, retry_after: Option<Duration>, random: f64) -> Duration {
        let delay = self.delay(retry, random);
        match retry_after {
            Some(asked) => delay.max(asked.min(self.max)),
            None => delay,
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP date, relative to `now`.
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(3600),
    };

    #[test]
    fn ceiling_doubles_then_caps() {
        let s = Duration::from_secs;
        let cases = [
            (1, s(1)),
            (2, s(2)),
            (3, s(4)),
            (11, s(1024)),
            (12, s(2048)),
            (13, s(3600)),
            (50, s(3600)),
            (u32::MAX, s(3600)),
        ];
        for (retry, ceiling) in cases {
            assert_eq!(B.delay(retry, 1.0), ceiling, "retry {retry}");
            assert_eq!(B.delay(retry, 0.0), Duration::ZERO, "retry {retry}");
            assert_eq!(B.delay(retry, 0.5), ceiling / 2, "retry {retry}");
        }
    }

    #[test]
    fn retry_after_is_a_floor_capped_at_max() {
        let s = Duration::from_secs;
        let cases = [
            (1, None, 0.0, s(0)),
            (1, Some(s(2)), 0.0, s(2)),
            (1, Some(s(2)), 1.0, s(2)),
            (3, Some(s(2)), 1.0, s(4)),
            (1, Some(s(86_400)), 0.0, s(3600)),
        ];
        for (retry, asked, random, want) in cases {
            assert_eq!(
                B.next(retry, asked, random),
                want,
                "{retry} {asked:?} {random}"
            );
        }
    }

    #[test]
    fn parses_both_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let cases = [
            ("2", Some(Duration::from_secs(2))),
            (" 120 ", Some(Duration::from_secs(120))),
            (
                "Sun, 06 Nov 1994 08:49:47 GMT",
                Some(Duration::from_secs(10)),
            ),
            ("Sun, 06 Nov 1994 08:49:27 GMT", Some(Duration::ZERO)),
            ("-1", None),
            ("soon", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                retry_after(&HeaderValue::from_static(text), now),
                want,
                "{text}"
            );
        }
    }
}
