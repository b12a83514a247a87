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
    /// The monotonic base and rate the time page holds, for the next one to continue
    /// from (None after a restore: a new host, a new TSC).
    pub base: Option<TimeBase>,
    /// The pid the time page tells the doorbell (getpid answered in the guest).
    pub pid: i32,
}

/// What one time page told the doorbell about CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy)]
pub struct TimeBase {
    /// The guest TSC the base was taken at.
    pub tsc: u64,
    /// The app's CLOCK_MONOTONIC then, in ns.
    pub monotonic_ns: u64,
    /// Nanoseconds per tick, 32.32 fixed point.
    pub mult: u64,
}

impl TimeBase {
    /// The monotonic time the doorbell computes from this base at guest TSC `tsc`.
    pub fn at(&self, tsc: u64) -> u64 {
        let ticks = u128::from(tsc.wrapping_sub(self.tsc));
        let ns = (ticks * u128::from(self.mult)) >> 32;
        self.monotonic_ns
            .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// The base and rate that continue from `previous` at guest TSC `tsc`, when the host
    /// clock says `host_ns` and the TSC's nominal rate is `mult`. The doorbell may already
    /// have answered up to `previous.at(tsc)`, so the new base is never below it (monotonic
    /// time never goes back); when the TSC ran fast against the host clock (its nominal
    /// rate is off, as under emulation), the next interval runs slower by what it is ahead,
    /// so the page's clock follows the host's instead of drifting from it.
    pub fn continue_from(previous: Option<&TimeBase>, tsc: u64, host_ns: u64, mult: u64) -> Self {
        let Some(previous) = previous else {
            return Self {
                tsc,
                monotonic_ns: host_ns,
                mult,
            };
        };
        let answered = previous.at(tsc);
        let ahead = answered.saturating_sub(host_ns);
        let interval = PUBLISH_EVERY.as_nanos() as u64;
        // Slow down to catch up within about one interval, to half speed at the most.
        let slowed = u128::from(mult)
            * u128::from(interval.saturating_sub(ahead).max(interval / 2))
            / u128::from(interval);
        Self {
            tsc,
            monotonic_ns: host_ns.max(answered),
            mult: u64::try_from(slowed).unwrap_or(mult),
        }
    }
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
    /// Whether the time page is due to be written again.
    pub fn publish_due(&self) -> bool {
        self.published.is_none_or(|t| t.elapsed() >= PUBLISH_EVERY)
    }

    /// Writes the time page (see `picocenter_guest_shim::abi::time_page`) if it is due, so
    /// that the doorbell can answer time calls without an exit. `force` writes it now.
    /// No guest may read it meanwhile: with several vCPUs, the others are out of the guest
    /// (the fields are not written at once).
    pub fn publish(&mut self, phys: &crate::memory::phys::PhysicalMemory, force: bool) {
        use picocenter_guest_shim::abi::{time_page, TIME_PAGE};
        if !force && !self.publish_due() {
            return;
        }
        let page = crate::memory::layout::SYSTEM_GPA + TIME_PAGE * 4096;
        let mut bytes = [0u8; 40];
        bytes[4..8].copy_from_slice(&(self.pid as u32).to_le_bytes());
        if let Some(tsc) = self.tsc {
            let (host_tsc, host_mono, real) = self.sample(tsc.mult);
            let guest_tsc = host_tsc.wrapping_add(tsc.guest_minus_host as u64);
            let base = TimeBase::continue_from(self.base.as_ref(), guest_tsc, host_mono, tsc.mult);
            self.base = Some(base);
            bytes[0..4].copy_from_slice(&1u32.to_le_bytes());
            for (offset, value) in [
                (time_page::TSC_BASE, base.tsc),
                (time_page::MULT, base.mult),
                (time_page::MONOTONIC_NS, base.monotonic_ns),
                (time_page::REALTIME_NS, real),
            ] {
                bytes[offset as usize..offset as usize + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
        let _ = phys.write(page, &bytes);
        self.published = Some(Instant::now());
    }
}

impl Clock {
    /// The host's TSC with the app's monotonic and realtime clocks read at the same moment:
    /// the TSC is read before and after the clocks, and a sample the VMM was preempted in
    /// the middle of (on a loaded host, for milliseconds) is taken again, else the page
    /// would put the clocks' values at a TSC they were not read at, and run ahead.
    fn sample(&self, mult: u64) -> (u64, u64, u64) {
        // What 20 µs is in ticks (mult is ns per tick, 32.32).
        let limit = ((20_000u128 << 32) / u128::from(mult.max(1))) as u64;
        let mut best = None;
        for _ in 0..8 {
            let before = crate::kvm::cpu::host_tsc();
            let mono = self.now_ns(libc::CLOCK_MONOTONIC).unwrap_or(0) as u64;
            let real = self.now_ns(libc::CLOCK_REALTIME).unwrap_or(0) as u64;
            let after = crate::kvm::cpu::host_tsc();
            let took = after.wrapping_sub(before);
            let sample = (before.wrapping_add(took / 2), mono, real);
            if took <= limit {
                return sample;
            }
            if best.is_none_or(|(t, _)| took < t) {
                best = Some((took, sample));
            }
        }
        best.map(|(_, sample)| sample).unwrap_or_default()
    }
}

/// Publishes the tid of the thread on vCPU `cpu` in that vCPU's scratch page, for the
/// doorbell's gettid.
pub fn publish_tid(phys: &crate::memory::phys::PhysicalMemory, cpu: u64, tid: i32) {
    use picocenter_guest_shim::abi::{cpu_local, scratch};
    let at = crate::memory::layout::cpu_local_gpa(cpu, cpu_local::SCRATCH_PAGE) + scratch::TID;
    let _ = phys.write(at, &(tid as u32).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 ns per tick.
    const ONE: u64 = 1 << 32;

    #[test]
    fn a_fast_tsc_never_takes_monotonic_time_back_and_is_slowed_to_the_host() {
        let first = TimeBase::continue_from(None, 1_000, 5_000_000, ONE);
        assert_eq!(first.at(1_000), 5_000_000);
        // 100 ms of ticks, but the host clock saw 90 ms: the doorbell answered 10 ms
        // ahead of it.
        let ticks = 100_000_000;
        let host = 5_000_000 + 90_000_000;
        let next = TimeBase::continue_from(Some(&first), 1_000 + ticks, host, ONE);
        assert_eq!(next.monotonic_ns, first.at(1_000 + ticks));
        assert!(next.mult < ONE, "slowed: {}", next.mult);
        // A host clock that went on normally is caught up with at the next page.
        let later =
            TimeBase::continue_from(Some(&next), 1_000 + 2 * ticks, host + 100_000_000, ONE);
        assert_eq!(later.monotonic_ns, host + 100_000_000);
        assert_eq!(later.mult, ONE);
        assert!(later.monotonic_ns >= next.at(1_000 + 2 * ticks));
    }

    #[test]
    fn a_slow_or_exact_tsc_follows_the_host_clock() {
        let first = TimeBase::continue_from(None, 0, 1_000, ONE);
        let next = TimeBase::continue_from(Some(&first), 50, 2_000, ONE);
        assert_eq!((next.monotonic_ns, next.mult), (2_000, ONE));
    }
}
