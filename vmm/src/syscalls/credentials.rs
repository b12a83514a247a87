//! The user and group id calls (see [`crate::kernel::credentials`]).

use super::{Args, SysResult};
pub use crate::kernel::credentials::Kind;
use crate::kernel::credentials::NGROUPS_MAX;
use crate::kernel::process::Process;
use rustix::io::Errno;

/// getuid(2) and getgid(2).
pub fn real(p: &Process, kind: Kind) -> SysResult {
    Ok(p.credentials.ids(kind).real as u64)
}

/// geteuid(2) and getegid(2).
pub fn effective(p: &Process, kind: Kind) -> SysResult {
    Ok(p.credentials.ids(kind).effective as u64)
}

/// getresuid(2) and getresgid(2).
pub fn get_res(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let ids = *p.credentials.ids(kind);
    for (i, id) in [ids.real, ids.effective, ids.saved].into_iter().enumerate() {
        p.mem.write_pod(a.ptr(i), &id)?;
    }
    Ok(0)
}

/// setuid(2) and setgid(2).
pub fn set(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    p.credentials.set(kind, a.u32(0))?;
    p.describe_ids();
    Ok(0)
}

/// setreuid(2) and setregid(2).
pub fn set_re(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    p.credentials.set_real_effective(kind, a.u32(0), a.u32(1))?;
    p.describe_ids();
    Ok(0)
}

/// setresuid(2) and setresgid(2).
pub fn set_res(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    p.credentials.set_all(kind, a.u32(0), a.u32(1), a.u32(2))?;
    p.describe_ids();
    Ok(0)
}

/// setfsuid(2) and setfsgid(2): the old id.
pub fn set_fs(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let old = p.credentials.set_fs(kind, a.u32(0));
    p.describe_ids();
    Ok(old as u64)
}

/// getgroups(2).
pub fn getgroups(p: &mut Process, a: &Args) -> SysResult {
    let size = a.i32(0);
    let count = p.credentials.groups.len();
    if size < 0 {
        return Err(Errno::INVAL.into());
    }
    if size == 0 {
        return Ok(count as u64);
    }
    if (size as usize) < count {
        return Err(Errno::INVAL.into());
    }
    let bytes: Vec<u8> = p
        .credentials
        .groups
        .iter()
        .flat_map(|g| g.to_ne_bytes())
        .collect();
    p.mem.write(a.ptr(1), &bytes)?;
    Ok(count as u64)
}

/// setgroups(2): EPERM first, then EINVAL for a count (an int) out of range, as Linux.
pub fn setgroups(p: &mut Process, a: &Args) -> SysResult {
    if !p.credentials.privileged() {
        return Err(Errno::PERM.into());
    }
    let count = usize::try_from(a.i32(0)).map_err(|_| Errno::INVAL)?;
    if count > NGROUPS_MAX {
        return Err(Errno::INVAL.into());
    }
    let groups = p.mem.read_pod_array::<u32>(a.ptr(1), count)?;
    p.credentials.set_groups(groups)?;
    Ok(0)
}
