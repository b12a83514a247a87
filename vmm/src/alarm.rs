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

    /// The time left and the interval.
    pub fn get(&self) -> (Duration, Duration) {
        let timer = self.lock();
        let left = timer.next.map_or(Duration::ZERO, |n| {
            n.saturating_duration_since(Instant::now())
        });
        (left, timer.interval)
    }

    /// Arms the timer to fire after `value` and then every `interval` (zero `value`
    /// disarms it). Returns the previous (time left, interval).
    pub fn set(&mut self, value: Duration, interval: Duration) -> (Duration, Duration) {
        let previous = self.get();
        {
            let mut timer = self.lock();
            timer.next = (!value.is_zero()).then(|| Instant::now() + value);
            timer.interval = interval;
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
                timer.next = (!timer.interval.is_zero()).then(|| next + timer.interval);
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

impl Drop for Alarm {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
