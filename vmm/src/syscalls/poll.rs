//! poll and ppoll over the app's fds. The wait happens in the host's poll together with
//! the kick eventfd, so that an operator can always interrupt it.

use super::{Args, SysError, SysResult};
use crate::memory::UserAddr;
use crate::process::Process;
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use std::time::{Duration, Instant};

/// Largest number of pollfds (RLIMIT_NOFILE).
const MAX_POLLFDS: usize = 4096;

/// Polls `count` guest pollfds at `addr` until one is ready, `deadline` passes or a kick
/// arrives; writes back revents and returns how many are ready.
fn poll_common(
    p: &mut Process,
    addr: UserAddr,
    count: usize,
    deadline: Option<Instant>,
) -> SysResult {
    if count > MAX_POLLFDS {
        return Err(Errno::INVAL.into());
    }
    let mut guest: Vec<libc::pollfd> = p.mem.read_pod_array(addr, count)?;
    // Resolve every fd first; a closed fd reports POLLNVAL, a negative one is skipped.
    let files: Vec<_> = guest
        .iter()
        .map(|g| {
            if g.fd < 0 {
                None
            } else {
                Some(p.files.file(g.fd))
            }
        })
        .collect();
    loop {
        let mut host: Vec<PollFd<'_>> = vec![PollFd::new(p.kicker.wake_fd(), PollFlags::IN)];
        let mut map = Vec::new();
        for (i, (g, file)) in guest.iter().zip(&files).enumerate() {
            if let Some(Ok(file)) = file {
                let events = PollFlags::from_bits_truncate(g.events as u16);
                host.push(PollFd::from_borrowed_fd(file.host(), events));
                map.push(i);
            }
        }
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        match rustix::event::poll(&mut host, timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if p.kicker.pending() != 0 {
            return Err(SysError::Restart);
        }
        let mut ready = 0u64;
        for g in guest.iter_mut() {
            g.revents = 0;
        }
        for (slot, fd) in map.iter().zip(host.iter().skip(1)) {
            guest[*slot].revents = fd.revents().bits() as i16;
        }
        for (g, file) in guest.iter_mut().zip(&files) {
            if matches!(file, Some(Err(_))) {
                g.revents = libc::POLLNVAL;
            }
            ready += (g.revents != 0) as u64;
        }
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if ready > 0 || expired {
            for (i, g) in guest.iter().enumerate() {
                let at = addr.offset((i * std::mem::size_of::<libc::pollfd>()) as u64 + 6);
                p.mem.write_pod(at.ok_or(Errno::FAULT)?, &g.revents)?;
            }
            return Ok(ready);
        }
    }
}

/// poll(2).
pub fn poll(p: &mut Process, a: &Args) -> SysResult {
    let timeout_ms = a.i32(2);
    let deadline =
        (timeout_ms >= 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
    poll_common(p, a.ptr(0), a.usize(1), deadline)
}

/// ppoll(2). The signal mask argument is accepted; signals are delivered between calls.
pub fn ppoll(p: &mut Process, a: &Args) -> SysResult {
    let deadline = if a.ptr(2).is_null() {
        None
    } else {
        let ts: libc::timespec = p.mem.read_pod(a.ptr(2))?;
        if ts.tv_sec < 0 || !(0..1_000_000_000).contains(&ts.tv_nsec) {
            return Err(Errno::INVAL.into());
        }
        Some(Instant::now() + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    };
    poll_common(p, a.ptr(0), a.usize(1), deadline)
}
