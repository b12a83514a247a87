//! The app's clocks: CLOCK_MONOTONIC (and its variants) read the host clock plus an offset
//! that a restore sets, so that the app's monotonic time never goes backwards, whichever
//! host it resumes on; realtime clocks are the host's. And the time page, through which the
//! doorbell answers time calls with no exit.

use crate::kvm::cpu::TscCalibration;
use rustix::io::Errno;
use rustix::time::{ClockId, Timespec};
use std::time::{Duration, Instant};

/// The app's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Clock {
    /// Added to the host's CLOCK_MONOTONIC (nanoseconds).
    pub monotonic_offset_ns: i64,
    /// How the guest's TSC relates to the host's, when the doorbell may read time itself.
    pub tsc: Option<TscCalibration>,
    /// When the time page was last written.
    pub published: Option<Instant>,
}

/// How often the time page's bases are refreshed against the host clocks; between
/// refreshes the TSC extrapolates, which drifts by well under a microsecond.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Nanoseconds in a second.
pub const NANOS: i128 = 1_000_000_000;

/// Nanoseconds of a timespec.
pub fn to_ns(t: Timespec) -> i128 {
    t.tv_sec as i128 * NANOS + t.tv_nsec as i128
}

/// A timespec of nanoseconds.
pub fn from_ns(ns: i128) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(NANOS) as i64,
        tv_nsec: ns.rem_euclid(NANOS) as i64,
    }
}

impl Clock {
    /// The app's view of clock `id`, in nanoseconds.
    pub fn now_ns(&self, id: i32) -> Result<i128, Errno> {
        let (host, monotonic) = match id {
            libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE | libc::CLOCK_TAI => {
                (ClockId::Realtime, false)
            }
            libc::CLOCK_MONOTONIC
            | libc::CLOCK_MONOTONIC_RAW
            | libc::CLOCK_MONOTONIC_COARSE
            | libc::CLOCK_BOOTTIME => (ClockId::Monotonic, true),
            libc::CLOCK_PROCESS_CPUTIME_ID | libc::CLOCK_THREAD_CPUTIME_ID => {
                (ClockId::ThreadCPUTime, false)
            }
            _ => return Err(Errno::INVAL),
        };
        let ns = to_ns(rustix::time::clock_gettime(host));
        Ok(if monotonic {
            ns + self.monotonic_offset_ns as i128
        } else {
            ns
        })
    }
}

impl Clock {
    /// Writes the time page (see `picocenter_guest_shim::abi::time_page`) if it is due, so
    /// that the doorbell can answer time calls without an exit. `force` writes it now.
    pub fn publish(&mut self, phys: &crate::memory::phys::PhysicalMemory, force: bool) {
        use picocenter_guest_shim::abi::{time_page, TIME_PAGE};
        if !force && self.published.is_some_and(|t| t.elapsed() < PUBLISH_EVERY) {
            return;
        }
        let page = crate::memory::layout::SYSTEM_GPA + TIME_PAGE * 4096;
        let mut bytes = [0u8; 40];
        bytes[4..8].copy_from_slice(&(super::GUEST_PID as u32).to_le_bytes());
        if let Some(tsc) = self.tsc {
            let host_tsc = crate::kvm::cpu::host_tsc();
            let mono = self.now_ns(libc::CLOCK_MONOTONIC).unwrap_or(0) as u64;
            let real = self.now_ns(libc::CLOCK_REALTIME).unwrap_or(0) as u64;
            let guest_tsc = host_tsc.wrapping_add(tsc.guest_minus_host as u64);
            bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
            for (offset, value) in [
                (time_page::TSC_BASE, guest_tsc),
                (time_page::MULT, tsc.mult),
                (time_page::MONOTONIC_NS, mono),
                (time_page::REALTIME_NS, real),
            ] {
                bytes[offset as usize..offset as usize + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        let _ = phys.write(page, &bytes);
        self.published = Some(Instant::now());
    }
}

/// Publishes the tid of the thread on the vCPU in the time page, for the doorbell's
/// gettid.
pub fn publish_tid(phys: &crate::memory::phys::PhysicalMemory, tid: i32) {
    use picocenter_guest_shim::abi::{time_page, TIME_PAGE};
    let at = crate::memory::layout::SYSTEM_GPA + TIME_PAGE * 4096 + time_page::TID;
    let _ = phys.write(at, &(tid as u32).to_le_bytes());
}
