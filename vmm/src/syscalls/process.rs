//! Process identity, limits, randomness, the FS base and the other small calls of a
//! single-threaded process.

use super::{Args, SysResult};
use crate::kernel::process::Process;
use rustix::io::Errno;

const ARCH_SET_GS: i32 = 0x1001;
const ARCH_SET_FS: i32 = 0x1002;
const ARCH_GET_FS: i32 = 0x1003;
const ARCH_GET_GS: i32 = 0x1004;
const ARCH_GET_CPUID: i32 = 0x1011;
const ARCH_SET_CPUID: i32 = 0x1012;

/// Canonical user addresses only: a non-canonical FS base would fault on entry.
pub(crate) fn is_user_canonical(addr: u64) -> bool {
    addr < 0x8000_0000_0000
}

/// arch_prctl(2): the FS base (glibc's TLS) and nothing the app cannot have.
pub fn arch_prctl(p: &mut Process, a: &Args) -> SysResult {
    match a.i32(0) {
        ARCH_SET_FS => {
            if !is_user_canonical(a.u64(1)) {
                return Err(Errno::PERM.into());
            }
            p.thread.fs_base = a.u64(1);
            p.thread.fs_base_changed = true;
            Ok(0)
        }
        ARCH_GET_FS => {
            p.mem.write_pod(a.ptr(1), &p.thread.fs_base)?;
            Ok(0)
        }
        ARCH_GET_GS => {
            p.mem.write_pod(a.ptr(1), &0u64)?;
            Ok(0)
        }
        ARCH_GET_CPUID => Ok(1),
        ARCH_SET_GS | ARCH_SET_CPUID => Err(Errno::PERM.into()),
        _ => Err(Errno::INVAL.into()),
    }
}

fn field(value: &str) -> [libc::c_char; 65] {
    let mut out = [0 as libc::c_char; 65];
    for (slot, byte) in out.iter_mut().zip(value.bytes().take(64)) {
        *slot = byte as libc::c_char;
    }
    out
}

/// uname(2): a fixed identity, with the app's name as the node name.
pub fn uname(p: &mut Process, a: &Args) -> SysResult {
    let uts = libc::utsname {
        sysname: field("Linux"),
        nodename: field(&p.name),
        release: field("6.1.0-picocenter"),
        version: field("#1 SMP picocenter"),
        machine: field("x86_64"),
        domainname: field("(none)"),
    };
    p.mem.write_pod(a.ptr(0), &uts)?;
    Ok(0)
}

/// getrandom(2), from the host.
pub fn getrandom(p: &mut Process, a: &Args) -> SysResult {
    let len = a.usize(1).min(1 << 20);
    let mut buf = vec![0u8; len];
    let n = rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty())?;
    p.mem.write(a.ptr(0), &buf[..n])?;
    Ok(n as u64)
}

/// set_tid_address(2).
pub fn set_tid_address(p: &mut Process, a: &Args) -> SysResult {
    p.thread.clear_child_tid = a.u64(0);
    Ok(p.thread.tid as u64)
}

/// The limit for `resource`, as (soft, hard).
fn limit(p: &Process, resource: u32) -> Result<(u64, u64), Errno> {
    const INFINITY: u64 = u64::MAX;
    Ok(match resource as i32 {
        r if r == libc::RLIMIT_STACK as i32 => {
            let s = crate::memory::space::STACK_SIZE;
            (s, INFINITY)
        }
        r if r == libc::RLIMIT_NOFILE as i32 => {
            let n = p.files.limit() as u64;
            (n, n)
        }
        r if r == libc::RLIMIT_AS as i32 || r == libc::RLIMIT_DATA as i32 => {
            let ram = p.mem.phys().ram_size();
            (ram, ram)
        }
        r if r == libc::RLIMIT_NPROC as i32 => {
            let n = crate::kernel::tree::MAX_PROCESSES as u64;
            (n, n)
        }
        r if r == libc::RLIMIT_CORE as i32 => (0, 0),
        r if (r as u32) < 16 => (INFINITY, INFINITY),
        _ => return Err(Errno::INVAL),
    })
}

/// prlimit64(2) for the app itself; changes are accepted and ignored.
pub fn prlimit64(p: &mut Process, a: &Args) -> SysResult {
    if a.i32(0) != 0 && a.i32(0) != p.ids.pid {
        return Err(Errno::SRCH.into());
    }
    let (soft, hard) = limit(p, a.u32(1))?;
    if !a.ptr(3).is_null() {
        p.mem.write_pod(a.ptr(3), &[soft, hard])?;
    }
    Ok(0)
}

/// getrlimit(2).
pub fn getrlimit(p: &mut Process, a: &Args) -> SysResult {
    let (soft, hard) = limit(p, a.u32(0))?;
    p.mem.write_pod(a.ptr(1), &[soft, hard])?;
    Ok(0)
}

/// getrusage(2): the vCPU thread's CPU time stands for the app's user time.
pub fn getrusage(p: &mut Process, a: &Args) -> SysResult {
    let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let mut bytes = vec![0u8; 144];
    let times = [cpu.tv_sec as u64, cpu.tv_nsec as u64 / 1000, 0, 0];
    for (i, v) in times.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    p.mem.write(a.ptr(1), &bytes)?;
    Ok(0)
}

/// Clock ticks per second, as the app's libc assumes (sysconf(_SC_CLK_TCK) on Linux).
const CLOCK_TICKS: u64 = 100;

/// times(2): the app's CPU time (its vCPU thread's, as user time), and ticks since an
/// arbitrary point, as Linux gives.
pub fn times(p: &mut Process, a: &Args) -> SysResult {
    let ticks = |t: rustix::time::Timespec| {
        (t.tv_sec as u64).saturating_mul(CLOCK_TICKS)
            + t.tv_nsec as u64 / (1_000_000_000 / CLOCK_TICKS)
    };
    let cpu = ticks(rustix::time::clock_gettime(
        rustix::time::ClockId::ThreadCPUTime,
    ));
    if !a.ptr(0).is_null() {
        // tms_utime, tms_stime, tms_cutime, tms_cstime.
        p.mem.write_pod(a.ptr(0), &[cpu, 0u64, 0, 0])?;
    }
    Ok(ticks(rustix::time::clock_gettime(
        rustix::time::ClockId::Monotonic,
    )))
}

/// The target of getpriority/setpriority: only the app itself (its process, group or user).
fn priority_target(p: &Process, a: &Args) -> Result<(), Errno> {
    let own = |who: u32| who == 0 || who == p.ids.pid as u32;
    match (a.u32(0), a.u32(1)) {
        (libc::PRIO_PROCESS | libc::PRIO_PGRP | libc::PRIO_USER, who) if own(who) => Ok(()),
        (libc::PRIO_PROCESS | libc::PRIO_PGRP | libc::PRIO_USER, _) => Err(Errno::SRCH),
        _ => Err(Errno::INVAL),
    }
}

/// getpriority(2) of the app itself: 20 - nice, as the raw call reports it.
pub fn getpriority(p: &Process, a: &Args) -> SysResult {
    priority_target(p, a)?;
    Ok((20 - p.nice) as u64)
}

/// setpriority(2) of the app itself: the value is clamped to -20..=19 as Linux does (the
/// app is root in its own view) and reported back; it changes nothing on the host, where
/// the VMM's scheduling is the operator's.
pub fn setpriority(p: &mut Process, a: &Args) -> SysResult {
    priority_target(p, a)?;
    p.nice = a.i32(2).clamp(-20, 19);
    Ok(0)
}

/// The scheduling policies an app may choose, and their priority ranges.
fn priority_range(policy: i32) -> Result<(i32, i32), Errno> {
    match policy {
        libc::SCHED_OTHER | libc::SCHED_BATCH | libc::SCHED_IDLE => Ok((0, 0)),
        libc::SCHED_FIFO | libc::SCHED_RR => Ok((1, 99)),
        _ => Err(Errno::INVAL),
    }
}

/// sched_get_priority_max(2) and sched_get_priority_min(2).
pub fn sched_priority_bound(a: &Args, max: bool) -> SysResult {
    let (low, high) = priority_range(a.i32(0))?;
    Ok((if max { high } else { low }) as u64)
}

/// Checks that `pid` names the app itself (0 or its pid).
fn own_pid(p: &Process, pid: i32) -> Result<(), Errno> {
    match pid {
        0 => Ok(()),
        pid if pid == p.ids.pid => Ok(()),
        p if p < 0 => Err(Errno::INVAL),
        _ => Err(Errno::SRCH),
    }
}

/// sched_getscheduler(2): the app runs under the normal policy.
pub fn sched_getscheduler(p: &Process, a: &Args) -> SysResult {
    own_pid(p, a.i32(0))?;
    Ok(libc::SCHED_OTHER as u64)
}

/// sched_setscheduler(2): the normal policies are accepted (with priority 0); real-time
/// ones are not the app's to take on a shared host (EPERM, as for an unprivileged
/// process).
pub fn sched_setscheduler(p: &mut Process, a: &Args) -> SysResult {
    own_pid(p, a.i32(0))?;
    let (low, high) = priority_range(a.i32(1) & !libc::SCHED_RESET_ON_FORK)?;
    let priority: i32 = p.mem.read_pod(a.ptr(2))?;
    if !(low..=high).contains(&priority) {
        return Err(Errno::INVAL.into());
    }
    if high > 0 {
        return Err(Errno::PERM.into());
    }
    Ok(0)
}

/// sched_getparam(2): priority 0, as the normal policy has.
pub fn sched_getparam(p: &mut Process, a: &Args) -> SysResult {
    own_pid(p, a.i32(0))?;
    p.mem.write_pod(a.ptr(1), &0i32)?;
    Ok(0)
}

/// sched_setparam(2): only priority 0 fits the normal policy.
pub fn sched_setparam(p: &mut Process, a: &Args) -> SysResult {
    own_pid(p, a.i32(0))?;
    let priority: i32 = p.mem.read_pod(a.ptr(1))?;
    if priority != 0 {
        return Err(Errno::INVAL.into());
    }
    Ok(0)
}

/// sched_rr_get_interval(2): Linux's default round-robin quantum, 100 ms.
pub fn sched_rr_get_interval(p: &mut Process, a: &Args) -> SysResult {
    own_pid(p, a.i32(0))?;
    p.mem.write_pod(a.ptr(1), &[0i64, 100_000_000])?;
    Ok(0)
}

/// sched_getaffinity(2): the CPUs the app may have vCPUs for (at most 64: one word).
pub fn sched_getaffinity(p: &mut Process, a: &Args) -> SysResult {
    let size = a.usize(1);
    if size < 8 || !size.is_multiple_of(8) {
        return Err(Errno::INVAL.into());
    }
    let cpus = p.sandbox.cpus().min(64);
    let mask = if cpus == 64 {
        !0u64
    } else {
        (1u64 << cpus) - 1
    };
    p.mem.write_pod(a.ptr(2), &mask)?;
    Ok(8)
}

/// sysinfo(2): uptime from the app's monotonic clock, memory from its RAM size.
pub fn sysinfo(p: &mut Process, a: &Args) -> SysResult {
    let uptime = (p.clock.now_ns(libc::CLOCK_MONOTONIC)? / 1_000_000_000) as u64;
    let stats = p.mem.stats();
    let total = stats.frames_total * 4096;
    let free = (stats.frames_total - stats.frames_in_use) * 4096;
    let mut bytes = vec![0u8; 112];
    let words: [(usize, u64); 5] = [(0, uptime), (32, total), (40, free), (48, 0), (56, 0)];
    for (offset, value) in words {
        bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }
    bytes[80..82].copy_from_slice(&1u16.to_le_bytes()); // procs
    bytes[104..108].copy_from_slice(&1u32.to_le_bytes()); // mem_unit
    p.mem.write(a.ptr(0), &bytes)?;
    Ok(0)
}

/// prctl(2): names and the few flags libraries set at start.
pub fn prctl(p: &mut Process, a: &Args) -> SysResult {
    match a.i32(0) {
        libc::PR_SET_NAME => {
            let name = p.mem.read_cstr(a.ptr(1), 16)?;
            tracing::debug!(name = %String::from_utf8_lossy(&name), "prctl(PR_SET_NAME)");
            Ok(0)
        }
        libc::PR_GET_NAME => {
            let mut name = p.name.as_bytes()[..p.name.len().min(15)].to_vec();
            name.resize(16, 0);
            p.mem.write(a.ptr(1), &name)?;
            Ok(0)
        }
        libc::PR_SET_DUMPABLE | libc::PR_SET_PDEATHSIG | libc::PR_SET_NO_NEW_PRIVS => Ok(0),
        libc::PR_GET_DUMPABLE => Ok(1),
        _ => Err(Errno::INVAL.into()),
    }
}
