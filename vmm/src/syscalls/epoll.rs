//! epoll, eventfd and timerfd: host objects the VMM owns, with the app's fds translated.
//!
//! An app's epoll set is a host epoll instance. Registrations carry the app's own 64-bit
//! `data`, which the host returns untouched, so events need no translation back. The
//! registrations are also recorded (guest fd → events, data) for snapshots.

use super::wait::wait_fd;
use super::{Args, SysError, SysResult};
use crate::fdtable::{FileKind, OpenFile, Registration};
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::event::epoll;
use rustix::event::PollFlags;
use rustix::io::Errno;
use std::sync::Arc;
use std::time::Instant;

const EPOLL_CTL_ADD: i32 = 1;
const EPOLL_CTL_DEL: i32 = 2;
const EPOLL_CTL_MOD: i32 = 3;
/// Size of `struct epoll_event` (packed on x86-64).
const EVENT_SIZE: usize = 12;
const MAX_EVENTS: usize = 4096;

fn epoll_file(p: &Process, fd: i32) -> Result<std::sync::Arc<OpenFile>, Errno> {
    let file = p.files.file(fd)?;
    match file.kind {
        FileKind::Epoll => Ok(file),
        _ => Err(Errno::INVAL),
    }
}

/// epoll_create(2) and epoll_create1(2).
pub fn epoll_create1(p: &mut Process, flags: u32) -> SysResult {
    if flags & !(libc::EPOLL_CLOEXEC as u32) != 0 {
        return Err(Errno::INVAL.into());
    }
    let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let file = OpenFile::with_mode(fd, FileKind::Epoll, false);
    Ok(p.files
        .insert(file, flags & libc::EPOLL_CLOEXEC as u32 != 0)? as u64)
}

/// epoll_ctl(2).
pub fn epoll_ctl(p: &mut Process, a: &Args) -> SysResult {
    let epfd = epoll_file(p, a.fd(0))?;
    let (op, fd) = (a.i32(1), a.fd(2));
    let target = p.files.file(fd)?;
    if std::sync::Arc::ptr_eq(&epfd, &target) {
        return Err(Errno::INVAL.into());
    }
    if matches!(
        target.kind,
        FileKind::Path { .. } | FileKind::Directory { .. }
    ) {
        return Err(Errno::PERM.into());
    }
    let read_event = |p: &mut Process| -> Result<(u32, u64), Errno> {
        let mut raw = [0u8; EVENT_SIZE];
        p.mem.read(a.ptr(3), &mut raw)?;
        let events = u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default());
        let data = u64::from_le_bytes(raw[4..12].try_into().unwrap_or_default());
        Ok((events, data))
    };
    match op {
        EPOLL_CTL_ADD | EPOLL_CTL_MOD => {
            let (events, data) = read_event(p)?;
            let flags = epoll::EventFlags::from_bits_retain(events);
            let data = epoll::EventData::new_u64(data);
            if op == EPOLL_CTL_ADD {
                epoll::add(epfd.host(), target.host(), data, flags)?;
            } else {
                epoll::modify(epfd.host(), target.host(), data, flags)?;
            }
            epfd.state().registrations.insert(
                fd,
                Registration {
                    target: Arc::downgrade(&target),
                    events,
                    data: data.u64(),
                },
            );
        }
        EPOLL_CTL_DEL => {
            epoll::delete(epfd.host(), target.host())?;
            epfd.state().registrations.remove(&fd);
        }
        _ => return Err(Errno::INVAL.into()),
    }
    Ok(0)
}

/// Waits on an epoll set until events arrive, `timeout_ms` passes (-1: forever) or the
/// app is interrupted; copies the events out.
fn wait_common(
    p: &mut Process,
    epfd: i32,
    out: UserAddr,
    max: usize,
    deadline: Option<Instant>,
) -> SysResult {
    // Linux refuses a count of events that is not positive or whose array could not
    // exist; more than one wait can return is simply not filled.
    if max == 0 || max > i32::MAX as usize / EVENT_SIZE {
        return Err(Errno::INVAL.into());
    }
    let max = max.min(MAX_EVENTS);
    let file = epoll_file(p, epfd)?;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(max);
    let now = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        events.clear();
        epoll::wait(
            file.host(),
            rustix::buffer::spare_capacity(&mut events),
            Some(&now),
        )?;
        if !events.is_empty() {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(0);
        }
        let ready = wait_fd(p, file.host(), PollFlags::IN, deadline)?;
        if ready.is_empty() {
            return Ok(0);
        }
    }
    let mut bytes = Vec::with_capacity(events.len() * EVENT_SIZE);
    for event in &events {
        let (flags, data) = (event.flags, event.data);
        bytes.extend_from_slice(&flags.bits().to_le_bytes());
        bytes.extend_from_slice(&data.u64().to_le_bytes());
    }
    p.mem.write(out, &bytes)?;
    Ok(events.len() as u64)
}

/// The deadline of a timeout in milliseconds (negative: none).
pub fn deadline_ms(p: &mut Process, timeout_ms: i32) -> Option<Instant> {
    crate::timeout::from_millis(timeout_ms).and_then(|timeout| p.deadline_after(timeout))
}

/// epoll_wait(2).
pub fn epoll_wait(p: &mut Process, a: &Args) -> SysResult {
    let deadline = deadline_ms(p, a.i32(3));
    wait_common(p, a.fd(0), a.ptr(1), a.usize(2), deadline)
}

/// epoll_pwait(2). The temporary signal mask applies for the wait.
pub fn epoll_pwait(p: &mut Process, a: &Args) -> SysResult {
    with_sigmask(p, a.ptr(4), a.usize(5), |p| {
        let deadline = deadline_ms(p, a.i32(3));
        wait_common(p, a.fd(0), a.ptr(1), a.usize(2), deadline)
    })
}

/// Runs `f` with the signal mask at `mask_ptr` (if any) in force, restoring the old one
/// after, unless a signal interrupts: then the handler's frame restores it.
pub fn with_sigmask(
    p: &mut Process,
    mask_ptr: UserAddr,
    size: usize,
    f: impl FnOnce(&mut Process) -> SysResult,
) -> SysResult {
    if mask_ptr.is_null() {
        return f(p);
    }
    if size != 8 {
        return Err(Errno::INVAL.into());
    }
    let mask: u64 = p.mem.read_pod(mask_ptr)?;
    let old = p.signals.mask;
    p.signals.mask = mask
        & !(crate::kernel::signals::bit(libc::SIGKILL)
            | crate::kernel::signals::bit(libc::SIGSTOP));
    let result = f(p);
    if matches!(result, Err(SysError::Interrupted)) {
        p.thread.saved_mask = Some(old);
    } else {
        p.signals.mask = old;
    }
    result
}

// ---- eventfd -------------------------------------------------------------------------

/// eventfd(2) and eventfd2(2).
pub fn eventfd2(p: &mut Process, initval: u32, flags: u32) -> SysResult {
    let allowed = (libc::EFD_CLOEXEC | libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE) as u32;
    if flags & !allowed != 0 {
        return Err(Errno::INVAL.into());
    }
    let semaphore = flags & libc::EFD_SEMAPHORE as u32 != 0;
    let mut host = rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC;
    if semaphore {
        host |= rustix::event::EventfdFlags::SEMAPHORE;
    }
    let fd = rustix::event::eventfd(initval, host)?;
    let file = OpenFile::with_mode(
        fd,
        FileKind::EventFd { semaphore },
        flags & libc::EFD_NONBLOCK as u32 != 0,
    );
    Ok(p.files
        .insert(file, flags & libc::EFD_CLOEXEC as u32 != 0)? as u64)
}

// ---- timerfd -------------------------------------------------------------------------

/// timerfd_create(2): CLOCK_MONOTONIC, CLOCK_REALTIME and CLOCK_BOOTTIME.
pub fn timerfd_create(p: &mut Process, a: &Args) -> SysResult {
    let (clock, flags) = (a.i32(0), a.u32(1));
    let host_clock = match clock {
        libc::CLOCK_MONOTONIC | libc::CLOCK_BOOTTIME => rustix::time::TimerfdClockId::Monotonic,
        libc::CLOCK_REALTIME => rustix::time::TimerfdClockId::Realtime,
        _ => return Err(Errno::INVAL.into()),
    };
    let allowed = (libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) as u32;
    if flags & !allowed != 0 {
        return Err(Errno::INVAL.into());
    }
    let fd = rustix::time::timerfd_create(
        host_clock,
        rustix::time::TimerfdFlags::NONBLOCK | rustix::time::TimerfdFlags::CLOEXEC,
    )?;
    let file = OpenFile::with_mode(
        fd,
        FileKind::TimerFd { clock },
        flags & libc::TFD_NONBLOCK as u32 != 0,
    );
    Ok(p.files
        .insert(file, flags & libc::TFD_CLOEXEC as u32 != 0)? as u64)
}

fn timerfd(p: &Process, fd: i32) -> Result<(std::sync::Arc<OpenFile>, i32), Errno> {
    let file = p.files.file(fd)?;
    match file.kind {
        FileKind::TimerFd { clock } => Ok((file.clone(), clock)),
        _ => Err(Errno::INVAL),
    }
}

fn spec(ts: [i64; 2]) -> Result<rustix::time::Timespec, Errno> {
    if ts[0] < 0 || !(0..1_000_000_000).contains(&ts[1]) {
        return Err(Errno::INVAL);
    }
    Ok(rustix::time::Timespec {
        tv_sec: ts[0],
        tv_nsec: ts[1] as _,
    })
}

fn words(t: rustix::time::Itimerspec) -> [i64; 4] {
    [
        t.it_interval.tv_sec,
        t.it_interval.tv_nsec,
        t.it_value.tv_sec,
        t.it_value.tv_nsec,
    ]
}

/// timerfd_settime(2). An absolute CLOCK_MONOTONIC time is in the app's clock, which a
/// restore may have offset from the host's, so it is converted.
pub fn timerfd_settime(p: &mut Process, a: &Args) -> SysResult {
    let (file, clock) = timerfd(p, a.fd(0))?;
    let flags = a.i32(1);
    let raw: [i64; 4] = p.mem.read_pod(a.ptr(2))?;
    let mut value = spec([raw[2], raw[3]])?;
    let absolute = flags & libc::TFD_TIMER_ABSTIME != 0;
    if absolute && clock != libc::CLOCK_REALTIME && (value.tv_sec != 0 || value.tv_nsec != 0) {
        let host_ns = (value.tv_sec as i128 * 1_000_000_000 + value.tv_nsec as i128)
            - p.clock.monotonic_offset_ns as i128;
        let host_ns = host_ns.max(1);
        value = rustix::time::Timespec {
            tv_sec: (host_ns / 1_000_000_000) as i64,
            tv_nsec: (host_ns % 1_000_000_000) as _,
        };
    }
    let new = rustix::time::Itimerspec {
        it_interval: spec([raw[0], raw[1]])?,
        it_value: value,
    };
    let host_flags = if absolute {
        rustix::time::TimerfdTimerFlags::ABSTIME
    } else {
        rustix::time::TimerfdTimerFlags::empty()
    };
    let old = rustix::time::timerfd_settime(file.host(), host_flags, &new)?;
    if !a.ptr(3).is_null() {
        p.mem.write_pod(a.ptr(3), &words(old))?;
    }
    Ok(0)
}

/// timerfd_gettime(2).
pub fn timerfd_gettime(p: &mut Process, a: &Args) -> SysResult {
    let (file, _) = timerfd(p, a.fd(0))?;
    let current = rustix::time::timerfd_gettime(file.host())?;
    p.mem.write_pod(a.ptr(1), &words(current))?;
    Ok(0)
}
