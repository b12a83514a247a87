//! A panic on any VMM thread ends the picoprocess cleanly, never with a hang.
//!
//! A panic is a VMM bug, never the app's doing, but the threads of a picoprocess depend on
//! each other: a mailbox poller that died mid-call would leave the app spinning in the
//! doorbell forever, and an alarm or control thread that died would go unnoticed. The hook
//! [`install`] sets records the first panic as a one-line report and kicks the vCPU thread
//! of every picoprocess that is running ([`reason::FAILED`]). Its run loop then ends with
//! [`crate::VmmError::Panicked`], and what the run owned (the VM, the control socket, the
//! temporary files) is dropped as after any other error. A panic on the vCPU thread itself
//! unwinds to [`crate::Picoprocess::run`], which catches it the same way. Outside a run the
//! previous hook (Rust's default report) still applies.

use crate::kvm::kick::{reason, Kicker};
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// The first panic's report, until a run takes it.
static REPORT: Mutex<Option<String>> = Mutex::new(None);
/// The picoprocesses running in this process: (watch id, their kicker).
static RUNS: Mutex<Vec<(u64, Kicker)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Installs the hook (once per process).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // try_lock: the panicking thread may hold either lock already.
            if let Ok(mut report) = REPORT.try_lock() {
                report.get_or_insert_with(|| one_line(info));
            }
            let kicked = match RUNS.try_lock() {
                Ok(runs) => {
                    for (_, kicker) in runs.iter() {
                        kicker.kick(reason::FAILED);
                    }
                    !runs.is_empty()
                }
                Err(_) => false,
            };
            // A run reports the panic itself, in one line; anything else panics as usual.
            if !kicked {
                previous(info);
            }
        }));
    });
}

/// `thread 'NAME' panicked at FILE:LINE:COL: MESSAGE`, on one line.
fn one_line(info: &PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    let at = info
        .location()
        .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    format!("thread '{name}' panicked{at}: {message}").replace('\n', " ")
}

/// The report of a panic since the last [`take_report`], if there was one.
pub fn report() -> Option<String> {
    REPORT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Takes the report of a panic, if there was one.
pub fn take_report() -> Option<String> {
    REPORT.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// A running picoprocess the hook kicks on a panic; it is forgotten when dropped.
#[derive(Debug)]
pub struct Watch(u64);

/// Watches the picoprocess whose vCPU thread `kicker` interrupts.
pub fn watch(kicker: Kicker) -> Watch {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    RUNS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, kicker));
    Watch(id)
}

impl Drop for Watch {
    fn drop(&mut self) {
        RUNS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.0);
    }
}

/// Where [`test_hook`] may panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The mailbox poller, about to perform a call.
    Mailbox,
    /// The vCPU thread, about to perform a call.
    Vcpu,
}

/// A test hook, in debug builds only: `PICOCENTER_TEST_PANIC=mailbox:NR` (or `vcpu:NR`) in
/// the VMM's environment makes that thread panic when it is about to perform syscall NR,
/// so that tests can prove a panic ends the VMM cleanly. The environment is the
/// operator's, never the app's, and release builds have no hook at all.
#[track_caller]
pub fn test_hook(place: Place, nr: u64) {
    #[cfg(debug_assertions)]
    {
        static HOOK: std::sync::OnceLock<Option<(Place, u64)>> = std::sync::OnceLock::new();
        let hook = HOOK.get_or_init(|| {
            let value = std::env::var("PICOCENTER_TEST_PANIC").ok()?;
            let (place, nr) = value.split_once(':')?;
            let place = match place {
                "mailbox" => Place::Mailbox,
                "vcpu" => Place::Vcpu,
                _ => return None,
            };
            Some((place, nr.parse().ok()?))
        });
        if *hook == Some((place, nr)) {
            panic!("PICOCENTER_TEST_PANIC: syscall {nr} on the {place:?} thread");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (place, nr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_during_a_run_is_recorded_in_one_line_and_kicks_it() {
        install();
        let kicker = Kicker::for_current_thread().unwrap();
        let watch = watch(kicker.clone());
        let thread = std::thread::Builder::new()
            .name("doomed".into())
            .spawn(|| panic!("two\nlines"))
            .unwrap();
        assert!(thread.join().is_err());
        drop(watch);
        assert_ne!(kicker.pending() & reason::FAILED, 0);
        let report = take_report().unwrap();
        assert!(
            report.starts_with("thread 'doomed' panicked at "),
            "{report}"
        );
        assert!(report.contains("panics.rs:"), "{report}");
        assert!(report.ends_with(": two lines"), "{report}");
        assert_eq!(take_report(), None);
    }
}
