//! Clocks and sleeping, and the one place where the VMM blocks on the app's behalf.
//!
//! CLOCK_MONOTONIC (and its variants) read the host clock plus an offset that a restore
//! sets, so that the app's monotonic time never goes backwards, whichever host it resumes
//! on. Realtime clocks are the host's.

use super::wait::sleep_until;
use super::{Args, SysError, SysResult};
use crate::memory::UserAddr;
use crate::process::Process;
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

/// The guest TSC as a function of the host's, for the time page.
#[derive(Debug, Clone, Copy)]
pub struct TscCalibration {
    /// Guest TSC minus host TSC (KVM keeps it constant).
    pub guest_minus_host: i64,
    /// Nanoseconds per tick, 32.32 fixed point.
    pub mult: u64,
}

impl TscCalibration {
    /// The calibration for a TSC of `khz` kHz whose guest value is `guest_tsc` when the
    /// host's is `host_tsc`.
    pub fn new(khz: u32, guest_tsc: u64, host_tsc: u64) -> Option<Self> {
        if khz == 0 {
            return None;
        }
        Some(Self {
            guest_minus_host: guest_tsc.wrapping_sub(host_tsc) as i64,
            mult: (1_000_000u64 << 32) / khz as u64,
        })
    }
}

/// How often the time page's bases are refreshed against the host clocks; between
/// refreshes the TSC extrapolates, which drifts by well under a microsecond.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

const NANOS: i128 = 1_000_000_000;

fn to_ns(t: Timespec) -> i128 {
    t.tv_sec as i128 * NANOS + t.tv_nsec as i128
}

fn from_ns(ns: i128) -> libc::timespec {
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
        bytes[4..8].copy_from_slice(&(crate::process::GUEST_PID as u32).to_le_bytes());
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

/// clock_gettime(2).
pub fn clock_gettime(p: &mut Process, a: &Args) -> SysResult {
    let now = p.clock.now_ns(a.i32(0))?;
    p.mem.write_pod(a.ptr(1), &from_ns(now))?;
    Ok(0)
}

/// clock_getres(2).
pub fn clock_getres(p: &mut Process, a: &Args) -> SysResult {
    p.clock.now_ns(a.i32(0))?;
    if !a.ptr(1).is_null() {
        p.mem.write_pod(a.ptr(1), &from_ns(1))?;
    }
    Ok(0)
}

/// gettimeofday(2).
pub fn gettimeofday(p: &mut Process, a: &Args) -> SysResult {
    if !a.ptr(0).is_null() {
        let ts = from_ns(p.clock.now_ns(libc::CLOCK_REALTIME)?);
        let tv = libc::timeval {
            tv_sec: ts.tv_sec,
            tv_usec: ts.tv_nsec / 1000,
        };
        p.mem.write_pod(a.ptr(0), &tv)?;
    }
    if !a.ptr(1).is_null() {
        p.mem.write_pod(a.ptr(1), &[0u32; 2])?;
    }
    Ok(0)
}

/// time(2).
pub fn time(p: &mut Process, a: &Args) -> SysResult {
    let secs = from_ns(p.clock.now_ns(libc::CLOCK_REALTIME)?).tv_sec;
    if !a.ptr(0).is_null() {
        p.mem.write_pod(a.ptr(0), &secs)?;
    }
    Ok(secs as u64)
}

/// Reads a relative timeout and validates it (saturated, as Linux does).
fn read_duration(p: &mut Process, addr: crate::memory::UserAddr) -> Result<Duration, Errno> {
    let ts: libc::timespec = p.mem.read_pod(addr)?;
    crate::timeout::from_timespec(ts.tv_sec, ts.tv_nsec)
}

/// Sleeps until `deadline` (`None`: until interrupted). When a signal handler interrupts
/// the sleep, the time left goes to `rem` (if not null), as Linux does, so the app can
/// sleep the rest.
fn sleep_reporting_rest(p: &mut Process, deadline: Option<Instant>, rem: UserAddr) -> SysResult {
    match sleep_until(p, deadline) {
        Err(SysError::Interrupted) if !rem.is_null() => {
            let left = deadline.map_or(crate::timeout::MAX_TIMEOUT, |d| {
                d.saturating_duration_since(Instant::now())
            });
            p.mem.write_pod(rem, &from_ns(left.as_nanos() as i128))?;
            Err(SysError::Interrupted)
        }
        other => other.map(|()| 0),
    }
}

/// nanosleep(2).
pub fn nanosleep(p: &mut Process, a: &Args) -> SysResult {
    let duration = read_duration(p, a.ptr(0))?;
    let deadline = p.deadline_after(duration);
    sleep_reporting_rest(p, deadline, a.ptr(1))
}

/// clock_nanosleep(2), relative or TIMER_ABSTIME.
pub fn clock_nanosleep(p: &mut Process, a: &Args) -> SysResult {
    let clock = a.i32(0);
    let duration = read_duration(p, a.ptr(2))?;
    let absolute = a.i32(1) & libc::TIMER_ABSTIME != 0;
    let duration = if absolute {
        let target = duration.as_nanos() as i128;
        let now = p.clock.now_ns(clock)?;
        Duration::from_nanos(u64::try_from((target - now).max(0)).unwrap_or(u64::MAX))
    } else {
        p.clock.now_ns(clock)?;
        duration
    };
    let deadline = p.deadline_after(duration);
    // An absolute sleep has no rest to report.
    let rem = if absolute { UserAddr(0) } else { a.ptr(3) };
    sleep_reporting_rest(p, deadline, rem)
}
