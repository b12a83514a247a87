//! Timeouts the app passes (timespec, timeval, milliseconds) as host deadlines, validated
//! and saturated as Linux does, so that no guest value can overflow an `Instant`.
//!
//! Linux keeps times as signed 64-bit nanoseconds (`ktime_t`) and saturates longer ones at
//! `KTIME_MAX`, about 292 years: a sleep of `tv_sec = i64::MAX` is valid and lasts forever
//! in practice. The same bound here keeps every deadline, and the time left until it, well
//! inside what `Instant` and a `u64` of nanoseconds hold.

use rustix::io::Errno;
use std::time::{Duration, Instant};

/// The longest timeout: `KTIME_MAX` nanoseconds. Longer ones mean the same.
pub const MAX_TIMEOUT: Duration = Duration::from_nanos(i64::MAX as u64);

const NANOS: i64 = 1_000_000_000;
const MICROS: i64 = 1_000_000;

/// A relative `struct timespec` timeout: EINVAL unless `sec >= 0` and `0 <= nsec < 10^9`
/// (Linux's `timespec64_valid`), saturated at [`MAX_TIMEOUT`].
pub fn from_timespec(sec: i64, nsec: i64) -> Result<Duration, Errno> {
    if sec < 0 || !(0..NANOS).contains(&nsec) {
        return Err(Errno::INVAL);
    }
    Ok(Duration::new(sec as u64, nsec as u32).min(MAX_TIMEOUT))
}

/// A relative `struct timeval` timeout for an interval timer (setitimer): EINVAL unless
/// `sec >= 0` and `0 <= usec < 10^6`, saturated at [`MAX_TIMEOUT`].
pub fn from_timeval(sec: i64, usec: i64) -> Result<Duration, Errno> {
    if !(0..MICROS).contains(&usec) {
        return Err(Errno::INVAL);
    }
    from_timespec(sec, usec * 1000)
}

/// select's `struct timeval`, which Linux normalises first (`sec + usec / 10^6`, with
/// C's truncating division), so that `usec` beyond a second is valid and a negative or
/// overflowing total is EINVAL.
pub fn from_select_timeval(sec: i64, usec: i64) -> Result<Duration, Errno> {
    let sec = sec.checked_add(usec / MICROS).ok_or(Errno::INVAL)?;
    from_timespec(sec, (usec % MICROS) * 1000)
}

/// A timeout in milliseconds (poll, epoll_wait): negative means none.
pub fn from_millis(ms: i32) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// The deadline `timeout` after `now`, saturated at [`MAX_TIMEOUT`]; `None` (no deadline)
/// only if even that does not fit in an `Instant`, which the monotonic clock never nears.
pub fn deadline(now: Instant, timeout: Duration) -> Option<Instant> {
    now.checked_add(timeout.min(MAX_TIMEOUT))
}

/// Nanoseconds in `d`, saturated at `u64::MAX` (for records and arithmetic).
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timespecs_are_checked_like_linux() {
        assert_eq!(from_timespec(-1, 0), Err(Errno::INVAL));
        assert_eq!(from_timespec(0, -1), Err(Errno::INVAL));
        assert_eq!(from_timespec(0, NANOS), Err(Errno::INVAL));
        assert_eq!(from_timespec(1, 5), Ok(Duration::new(1, 5)));
        assert_eq!(from_timeval(0, MICROS), Err(Errno::INVAL));
        assert_eq!(from_timeval(2, 7), Ok(Duration::new(2, 7000)));
    }

    #[test]
    fn huge_timeouts_saturate_instead_of_overflowing() {
        assert_eq!(from_timespec(i64::MAX, NANOS - 1), Ok(MAX_TIMEOUT));
        assert_eq!(from_timeval(i64::MAX, MICROS - 1), Ok(MAX_TIMEOUT));
        let now = Instant::now();
        let far = deadline(now, Duration::MAX).unwrap();
        assert_eq!(far - now, MAX_TIMEOUT);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
        assert_eq!(nanos(MAX_TIMEOUT), i64::MAX as u64);
    }

    #[test]
    fn select_normalises_its_timeval_first() {
        assert_eq!(
            from_select_timeval(0, 2_500_000),
            Ok(Duration::new(2, 500_000_000))
        );
        assert_eq!(from_select_timeval(0, -1), Err(Errno::INVAL));
        assert_eq!(from_select_timeval(-1, 0), Err(Errno::INVAL));
        assert_eq!(from_select_timeval(i64::MAX, MICROS), Err(Errno::INVAL));
        assert_eq!(from_select_timeval(i64::MAX, 0), Ok(MAX_TIMEOUT));
    }

    #[test]
    fn negative_milliseconds_mean_no_timeout() {
        assert_eq!(from_millis(-1), None);
        assert_eq!(
            from_millis(i32::MAX),
            Some(Duration::from_millis(i32::MAX as u64))
        );
    }
}
