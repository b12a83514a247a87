//! The user and group id calls (see [`crate::kernel::credentials`]).

use super::{Args, SysResult};
use crate::kernel::credentials::{Credentials, NGROUPS_MAX};
use crate::kernel::process::Process;
use rustix::io::Errno;

/// Which of a process's ids a call is about.
#[derive(Clone, Copy)]
pub enum Kind {
    /// User ids.
    User,
    /// Group ids.
    Group,
}

fn ids(c: &Credentials, kind: Kind) -> &crate::kernel::credentials::Ids {
    match kind {
        Kind::User => &c.uid,
        Kind::Group => &c.gid,
    }
}

/// getuid(2) and getgid(2).
pub fn real(p: &Process, kind: Kind) -> SysResult {
    Ok(ids(&p.credentials, kind).real as u64)
}

/// geteuid(2) and getegid(2).
pub fn effective(p: &Process, kind: Kind) -> SysResult {
    Ok(ids(&p.credentials, kind).effective as u64)
}

/// getresuid(2) and getresgid(2).
pub fn get_res(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let ids = *ids(&p.credentials, kind);
    for (i, id) in [ids.real, ids.effective, ids.saved].into_iter().enumerate() {
        p.mem.write_pod(a.ptr(i), &id)?;
    }
    Ok(0)
}

/// setuid(2) and setgid(2).
pub fn set(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let c = &mut p.credentials;
    match kind {
        Kind::User => c.set_uid(a.u32(0))?,
        Kind::Group => c.set_gid(a.u32(0))?,
    }
    p.describe_ids();
    Ok(0)
}

/// setreuid(2) and setregid(2).
pub fn set_re(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let c = &mut p.credentials;
    match kind {
        Kind::User => c.set_reuid(a.u32(0), a.u32(1))?,
        Kind::Group => c.set_regid(a.u32(0), a.u32(1))?,
    }
    p.describe_ids();
    Ok(0)
}

/// setresuid(2) and setresgid(2).
pub fn set_res(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let c = &mut p.credentials;
    match kind {
        Kind::User => c.set_resuid(a.u32(0), a.u32(1), a.u32(2))?,
        Kind::Group => c.set_resgid(a.u32(0), a.u32(1), a.u32(2))?,
    }
    p.describe_ids();
    Ok(0)
}

/// setfsuid(2) and setfsgid(2): the old id.
pub fn set_fs(p: &mut Process, a: &Args, kind: Kind) -> SysResult {
    let c = &mut p.credentials;
    let old = match kind {
        Kind::User => c.set_fsuid(a.u32(0)),
        Kind::Group => c.set_fsgid(a.u32(0)),
    };
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
