//! ITIMER_REAL (alarm, setitimer): a timer thread that raises SIGALRM for the app when the
//! timer expires, even while the app computes, and re-arms it when it has an interval.
//! The thread is started the first time the app arms the timer.

use crate::kvm::kick::Kicker;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Timer {
    next: Option<Instant>,
    interval: Duration,
    shutdown: bool,
}

#[derive(Debug, Default)]
struct Shared {
    timer: Mutex<Timer>,
    changed: Condvar,
}

/// The app's real-time interval timer.
#[derive(Debug)]
pub struct Alarm {
    shared: Arc<Shared>,
    kicker: Kicker,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Alarm {
    /// A disarmed timer that raises signals through `kicker`.
    pub fn new(kicker: Kicker) -> Self {
        Self {
            shared: Arc::default(),
            kicker,
            thread: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Timer> {
        self.shared.timer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The time left and the interval. An armed timer whose expiry is due (its thread has
    /// not fired it yet) has 1 µs left, as Linux reports it: zero would mean disarmed, and
    /// a snapshot would lose the timer.
    pub fn get(&self) -> (Duration, Duration) {
        let timer = self.lock();
        let left = timer.next.map_or(Duration::ZERO, |n| {
            n.saturating_duration_since(Instant::now())
                .max(Duration::from_micros(1))
        });
        (left, timer.interval)
    }

    /// Arms the timer to fire after `value` and then every `interval` (zero `value`
    /// disarms it). Returns the previous (time left, interval).
    pub fn set(&mut self, value: Duration, interval: Duration) -> (Duration, Duration) {
        let previous = self.get();
        {
            let mut timer = self.lock();
            // Saturated as Linux does: a timer set centuries ahead is armed, never fires,
            // and cannot overflow an `Instant`.
            timer.next = if value.is_zero() {
                None
            } else {
                crate::timeout::deadline(Instant::now(), value)
            };
            timer.interval = interval.min(crate::timeout::MAX_TIMEOUT);
        }
        self.shared.changed.notify_all();
        if self.thread.is_none() && !value.is_zero() {
            let shared = self.shared.clone();
            let kicker = self.kicker.clone();
            self.thread = std::thread::Builder::new()
                .name("picocenter-alarm".into())
                .spawn(move || run(&shared, &kicker))
                .ok();
        }
        previous
    }
}

fn run(shared: &Shared, kicker: &Kicker) {
    let mut timer = shared.timer.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if timer.shutdown {
            return;
        }
        match timer.next {
            None => {
                timer = shared
                    .changed
                    .wait(timer)
                    .unwrap_or_else(|e| e.into_inner());
            }
            Some(next) if Instant::now() >= next => {
                kicker.raise(libc::SIGALRM);
                timer.next = following(next, timer.interval, Instant::now());
            }
            Some(next) => {
                let left = next.saturating_duration_since(Instant::now());
                timer = shared
                    .changed
                    .wait_timeout(timer, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

/// The expiry after `next` for a timer with `interval` (none for a one-shot timer): the
/// first period boundary after `now`. Periods already missed are skipped, as Linux forwards
/// an overrun timer: a pending SIGALRM stands for all of them, and catching up one period
/// at a time would kick the app with no pause.
fn following(next: Instant, interval: Duration, now: Instant) -> Option<Instant> {
    if interval.is_zero() {
        return None;
    }
    let missed = now.saturating_duration_since(next).as_nanos() / interval.as_nanos();
    let periods = u32::try_from(missed.saturating_add(1)).unwrap_or(u32::MAX);
    interval
        .checked_mul(periods)
        .and_then(|ahead| next.checked_add(ahead))
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_timer_is_still_armed() {
        let kicker = Kicker::for_current_thread().unwrap();
        let mut alarm = Alarm::new(kicker);
        assert_eq!(alarm.get(), (Duration::ZERO, Duration::ZERO));
        // Due at once, and the thread may not have fired it yet.
        alarm.lock().next = Some(Instant::now());
        alarm.lock().interval = Duration::from_micros(100);
        let (left, interval) = alarm.get();
        assert!(left > Duration::ZERO, "{left:?}");
        assert_eq!(interval, Duration::from_micros(100));
        alarm.set(Duration::ZERO, Duration::ZERO);
    }

    #[test]
    fn an_overrun_timer_skips_the_periods_it_missed() {
        let start = Instant::now();
        let period = Duration::from_micros(100);
        assert_eq!(following(start, Duration::ZERO, start), None);
        assert_eq!(following(start, period, start), Some(start + period));
        // 1.05 ms late: the next expiry is the boundary at 1.1 ms, not 0.1 ms.
        let late = start + Duration::from_micros(1050);
        assert_eq!(
            following(start, period, late),
            Some(start + Duration::from_micros(1100))
        );
    }
}
