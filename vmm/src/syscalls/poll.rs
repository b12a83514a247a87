//! poll, ppoll, select and pselect6 over the app's fds. The wait happens in the host's
//! poll together with the kick eventfd (see [`super::wait`]).

use super::epoll::with_sigmask;
use super::wait::wait_any;
use super::{Args, SysResult};
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::event::PollFlags;
use rustix::io::Errno;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// Largest number of fds one call may watch.
const MAX_FDS: usize = 4096;

/// Polls `(fd, events)` pairs: returns each fd's revents (POLLNVAL for a closed one).
fn poll_fds(
    p: &mut Process,
    wanted: &[(i32, i16)],
    deadline: Option<Instant>,
) -> Result<Vec<i16>, super::SysError> {
    let files: Vec<_> = wanted
        .iter()
        .map(|&(fd, _)| (fd >= 0).then(|| p.files.file(fd)))
        .collect();
    let invalid: Vec<bool> = files.iter().map(|f| matches!(f, Some(Err(_)))).collect();
    let mut slots = Vec::new();
    let mut host: Vec<(BorrowedFd<'_>, PollFlags)> = Vec::new();
    for (i, (file, &(_, events))) in files.iter().zip(wanted).enumerate() {
        if let Some(Ok(file)) = file {
            host.push((file.host(), PollFlags::from_bits_truncate(events as u16)));
            slots.push(i);
        }
    }
    // Closed fds are ready at once; otherwise wait.
    let any_invalid = invalid.iter().any(|&b| b);
    let ready = if any_invalid {
        let mut probe: Vec<_> = host
            .iter()
            .map(|(fd, ev)| rustix::event::PollFd::from_borrowed_fd(*fd, *ev))
            .collect();
        rustix::event::poll(
            &mut probe,
            Some(&rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }),
        )?;
        probe.iter().map(|f| f.revents()).collect()
    } else {
        wait_any(p, &host, deadline)?
    };
    let mut revents = vec![0i16; wanted.len()];
    for (slot, flags) in slots.iter().zip(ready) {
        revents[*slot] = flags.bits() as i16;
    }
    for (r, bad) in revents.iter_mut().zip(invalid) {
        if bad {
            *r = libc::POLLNVAL;
        }
    }
    Ok(revents)
}

fn poll_common(
    p: &mut Process,
    addr: UserAddr,
    count: usize,
    deadline: Option<Instant>,
) -> SysResult {
    if count > MAX_FDS {
        return Err(Errno::INVAL.into());
    }
    let guest: Vec<libc::pollfd> = p.mem.read_pod_array(addr, count)?;
    let wanted: Vec<(i32, i16)> = guest.iter().map(|g| (g.fd, g.events)).collect();
    let revents = poll_fds(p, &wanted, deadline)?;
    let mut out = guest;
    for (g, r) in out.iter_mut().zip(&revents) {
        g.revents = *r;
    }
    for (i, g) in out.iter().enumerate() {
        let at = addr
            .offset((i * std::mem::size_of::<libc::pollfd>()) as u64 + 6)
            .ok_or(Errno::FAULT)?;
        p.mem.write_pod(at, &g.revents)?;
    }
    Ok(revents.iter().filter(|&&r| r != 0).count() as u64)
}

fn read_timespec_deadline(p: &mut Process, addr: UserAddr) -> Result<Option<Instant>, Errno> {
    if addr.is_null() {
        return Ok(None);
    }
    let [sec, nsec]: [i64; 2] = p.mem.read_pod(addr)?;
    let timeout = crate::timeout::from_timespec(sec, nsec)?;
    Ok(p.deadline_after(timeout))
}

/// poll(2).
pub fn poll(p: &mut Process, a: &Args) -> SysResult {
    let deadline = super::epoll::deadline_ms(p, a.i32(2));
    poll_common(p, a.ptr(0), a.usize(1), deadline)
}

/// ppoll(2).
pub fn ppoll(p: &mut Process, a: &Args) -> SysResult {
    let deadline = read_timespec_deadline(p, a.ptr(2))?;
    with_sigmask(p, a.ptr(3), a.usize(4), |p| {
        poll_common(p, a.ptr(0), a.usize(1), deadline)
    })
}

/// The three fd sets of select, as bit vectors of `nfds` bits.
fn read_set(p: &mut Process, addr: UserAddr, words: usize) -> Result<Option<Vec<u64>>, Errno> {
    if addr.is_null() {
        return Ok(None);
    }
    Ok(Some(p.mem.read_pod_array(addr, words)?))
}

fn select_common(
    p: &mut Process,
    a: &Args,
    deadline: Option<Instant>,
) -> Result<(u64, Option<Instant>), super::SysError> {
    // Linux refuses a negative count and reads no further than its fd table reaches.
    let nfds = usize::try_from(a.i32(0))
        .map_err(|_| Errno::INVAL)?
        .min(MAX_FDS);
    let words = nfds.div_ceil(64);
    let sets = [
        read_set(p, a.ptr(1), words)?,
        read_set(p, a.ptr(2), words)?,
        read_set(p, a.ptr(3), words)?,
    ];
    let masks = [
        libc::POLLIN | libc::POLLHUP | libc::POLLERR,
        libc::POLLOUT | libc::POLLERR,
        libc::POLLPRI,
    ];
    let mut wanted: Vec<(i32, i16)> = Vec::new();
    for fd in 0..nfds {
        let mut events = 0i16;
        for (set, mask) in sets.iter().zip(masks) {
            if set
                .as_ref()
                .is_some_and(|s| s[fd / 64] & (1 << (fd % 64)) != 0)
            {
                events |= mask;
            }
        }
        if events != 0 {
            if p.files.get(fd as i32).is_err() {
                return Err(Errno::BADF.into());
            }
            wanted.push((fd as i32, events));
        }
    }
    let revents = poll_fds(p, &wanted, deadline)?;
    let mut out = [vec![0u64; words], vec![0u64; words], vec![0u64; words]];
    let mut count = 0;
    for (&(fd, events), r) in wanted.iter().zip(revents) {
        for (k, mask) in masks.iter().enumerate() {
            if events & mask != 0 && r & mask != 0 {
                out[k][fd as usize / 64] |= 1 << (fd as usize % 64);
                count += 1;
            }
        }
    }
    for (k, set) in out.iter().enumerate() {
        if !a.ptr(k + 1).is_null() {
            let bytes: Vec<u8> = set.iter().flat_map(|w| w.to_le_bytes()).collect();
            p.mem.write(a.ptr(k + 1), &bytes)?;
        }
    }
    Ok((count, deadline))
}

/// select(2); the timeout is updated with the time left, as Linux does.
pub fn select(p: &mut Process, a: &Args) -> SysResult {
    let deadline = if a.ptr(4).is_null() {
        None
    } else {
        let [sec, usec]: [i64; 2] = p.mem.read_pod(a.ptr(4))?;
        let timeout = crate::timeout::from_select_timeval(sec, usec)?;
        p.deadline_after(timeout)
    };
    let (count, deadline) = select_common(p, a, deadline)?;
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        p.mem.write_pod(
            a.ptr(4),
            &[left.as_secs() as i64, left.subsec_micros() as i64],
        )?;
    }
    Ok(count)
}

/// pselect6(2).
pub fn pselect6(p: &mut Process, a: &Args) -> SysResult {
    let deadline = read_timespec_deadline(p, a.ptr(4))?;
    let (mask_ptr, mask_size) = if a.ptr(5).is_null() {
        (UserAddr(0), 0)
    } else {
        let [ptr, size]: [u64; 2] = p.mem.read_pod(a.ptr(5))?;
        (UserAddr(ptr), size as usize)
    };
    with_sigmask(p, mask_ptr, mask_size, |p| {
        Ok(select_common(p, a, deadline)?.0)
    })
}
