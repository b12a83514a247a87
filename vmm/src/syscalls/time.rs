//! Clocks and sleeping: the calls. The clocks themselves are in [`crate::kernel::clock`].

use super::wait::sleep_until;
use super::{Args, SysError, SysResult};
use crate::kernel::clock::from_ns;
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::io::Errno;
use std::time::{Duration, Instant};

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
