//! A spare VMM process, started by a worker before it knows which app it will run (the
//! worker's warm pool). It execs, makes its VM and vCPU ([`crate::kvm::ahead`]), and then
//! waits for one [`Assignment`] on the socket it was handed: the command line and
//! environment of the VMM it is to become, with the fds that command expects as 3, 4, ...
//! (held sockets, a page feed, the supervision channel) and its log. Process start-up and
//! VM creation are then off the app's critical path.
//!
//! The spare keeps fds `3 .. 3 + FDS_MAX` taken (copies of the assignment socket) until the
//! assignment arrives, so that its VM's fds and the received ones land above them and the
//! handed fds can be put in place without moving anything else.

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// The fd a spare finds its assignment socket at.
pub const ASSIGNMENT_FD: i32 = 3;

/// Most fds an assignment hands down, the log included.
pub const FDS_MAX: usize = 72;

/// Largest assignment message: a command line and a few variables.
const MESSAGE_MAX: usize = 64 * 1024;

/// Whether `name` can be an environment variable's name (and `value` its value): no
/// empty name, no `=` in it, no NUL in either (std would panic on them).
fn valid_variable(name: &str, value: Option<&str>) -> bool {
    !name.is_empty() && !name.contains(['=', '\0']) && !value.is_some_and(|v| v.contains('\0'))
}

/// What a spare is to become.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// The command line after the program's name (`snapshot restore DIR --id ...`).
    pub args: Vec<String>,
    /// Environment variables to set (with a value) or remove (without).
    pub env: Vec<(String, Option<String>)>,
}

/// Why an assignment could not be sent or taken.
#[derive(Debug, thiserror::Error)]
pub enum SpareError {
    /// The socket failed (a spare that died: EPIPE, ECONNRESET).
    #[error("the assignment socket: {0}")]
    Socket(#[from] Errno),
    /// The message is too large, or hands down too many fds.
    #[error("an assignment of {bytes} bytes and {fds} fds is over the limit ({MESSAGE_MAX} bytes, {FDS_MAX} fds)")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// Its fds, the log included.
        fds: usize,
    },
    /// The peer closed the socket without an assignment, or sent one cut short.
    #[error("no assignment came (the worker closed the socket)")]
    Closed,
    /// The message is not an assignment, or it came without its log.
    #[error("a malformed assignment: {0}")]
    Malformed(String),
}

/// A socket pair for one spare: (the worker's end, the spare's end). Messages keep their
/// bounds (SOCK_SEQPACKET), and both ends are close-on-exec.
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
}

/// Sends `assignment` with `handed` (to become fds 3, 4, ...) and `log` (to become stdout
/// and stderr).
pub fn send(
    socket: BorrowedFd<'_>,
    assignment: &Assignment,
    handed: &[BorrowedFd<'_>],
    log: BorrowedFd<'_>,
) -> Result<(), SpareError> {
    let message =
        serde_json::to_vec(assignment).map_err(|e| SpareError::Malformed(e.to_string()))?;
    let mut fds = handed.to_vec();
    fds.push(log);
    if message.len() > MESSAGE_MAX || fds.len() > FDS_MAX {
        return Err(SpareError::TooLarge {
            bytes: message.len(),
            fds: fds.len(),
        });
    }
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_MAX))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(SpareError::Socket(Errno::NOBUFS));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(&message)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != message.len() {
        return Err(SpareError::Socket(Errno::IO));
    }
    Ok(())
}

/// An assignment as received: what to run, the fds to hand down, and the log.
#[derive(Debug)]
pub struct Received {
    /// What to run.
    pub assignment: Assignment,
    /// The fds to put at 3, 4, ...
    pub handed: Vec<OwnedFd>,
    /// Where stdout and stderr go.
    pub log: OwnedFd,
}

/// Waits for the one assignment on `socket`.
pub fn receive(socket: BorrowedFd<'_>) -> Result<Received, SpareError> {
    let mut message = vec![0u8; MESSAGE_MAX];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_MAX))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut message)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for part in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = part {
            fds.extend(passed);
        }
    }
    if received.bytes == 0 {
        return Err(SpareError::Closed);
    }
    if received
        .flags
        .intersects(rustix::net::ReturnFlags::TRUNC | rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(SpareError::Malformed("cut short".into()));
    }
    let assignment: Assignment = serde_json::from_slice(&message[..received.bytes])
        .map_err(|e| SpareError::Malformed(e.to_string()))?;
    if let Some((name, _)) = assignment
        .env
        .iter()
        .find(|(name, value)| !valid_variable(name, value.as_deref()))
    {
        return Err(SpareError::Malformed(format!(
            "{name:?} is no environment variable"
        )));
    }
    let log = fds
        .pop()
        .ok_or_else(|| SpareError::Malformed("no log fd".into()))?;
    Ok(Received {
        assignment,
        handed: fds,
        log,
    })
}

/// Keeps fds `ASSIGNMENT_FD + 1 .. ASSIGNMENT_FD + FDS_MAX` taken with copies of the
/// assignment socket (see the module's description). Call before anything else opens a
/// file.
pub fn reserve_handed_range(socket: BorrowedFd<'_>) -> Result<(), Errno> {
    for target in reserved_range().skip(1) {
        dup_onto(socket, target)?;
    }
    Ok(())
}

fn reserved_range() -> impl Iterator<Item = i32> {
    // FDS_MAX is a small constant: the cast cannot truncate.
    ASSIGNMENT_FD..ASSIGNMENT_FD + FDS_MAX as i32
}

/// Puts the handed fds at 3, 4, ... (without close-on-exec, as a handed-down fd is) and
/// the log at stdout and stderr, and closes the rest of the reserved range, the
/// assignment socket (fd 3) among them. The spare must hold nothing else at 3 .. 3 +
/// FDS_MAX (see [`reserve_handed_range`]), and nothing but this thread may run.
pub fn install(received: Received) -> Result<Assignment, Errno> {
    let Received {
        assignment,
        handed,
        log,
    } = received;
    // The log first: whatever goes wrong from here on is the app's to read.
    dup_onto(log.as_fd(), libc::STDOUT_FILENO)?;
    dup_onto(log.as_fd(), libc::STDERR_FILENO)?;
    let mut targets = reserved_range();
    for (fd, target) in handed.iter().zip(targets.by_ref()) {
        dup_onto(fd.as_fd(), target)?;
    }
    if let Some(first) = targets.next() {
        close_reserved(first, ASSIGNMENT_FD + FDS_MAX as i32 - 1);
    }
    Ok(assignment)
}

/// Closes the reserved fds `first ..= last`: one close_range, or (before Linux 5.9) one
/// close each.
fn close_reserved(first: i32, last: i32) {
    // SAFETY: the fds `first ..= last` are reserved ones (copies of the assignment socket)
    // that only this module owns: closing them by number is their end.
    if unsafe { libc::close_range(first as u32, last as u32, 0) } == 0 {
        return;
    }
    for fd in first..=last {
        // SAFETY: as above, one at a time.
        unsafe { libc::close(fd) };
    }
}

/// dup2(`fd`, `target`): the copy at `target` is not close-on-exec.
fn dup_onto(fd: BorrowedFd<'_>, target: i32) -> Result<(), Errno> {
    // SAFETY: `target` is a reserved fd or stdout/stderr, which dup2 replaces atomically;
    // the handle is forgotten at once, so the fd is owned by its number as before.
    let mut at_target = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(target) };
    let result = rustix::io::dup2(fd, &mut at_target);
    std::mem::forget(at_target);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_crosses_with_its_fds_and_log() {
        let (worker, spare) = socket_pair().unwrap();
        let (a, _b) = socket_pair().unwrap();
        let log = tempfile::tempfile().unwrap();
        let assignment = Assignment {
            args: vec!["snapshot".into(), "restore".into(), "/s".into()],
            env: vec![("A".into(), Some("1".into())), ("SECRET".into(), None)],
        };
        send(worker.as_fd(), &assignment, &[a.as_fd()], log.as_fd()).unwrap();
        let received = receive(spare.as_fd()).unwrap();
        assert_eq!(received.assignment, assignment);
        assert_eq!(received.handed.len(), 1);
        assert!(rustix::net::sockopt::socket_type(&received.handed[0]).is_ok());
        assert!(rustix::fs::fstat(&received.log).is_ok());
    }

    #[test]
    fn a_closed_socket_or_garbage_is_no_assignment() {
        let (worker, spare) = socket_pair().unwrap();
        drop(worker);
        assert!(matches!(receive(spare.as_fd()), Err(SpareError::Closed)));

        let (worker, spare) = socket_pair().unwrap();
        rustix::net::send(&worker, b"not json", SendFlags::empty()).unwrap();
        assert!(matches!(
            receive(spare.as_fd()),
            Err(SpareError::Malformed(_))
        ));
    }

    #[test]
    fn a_variable_std_would_panic_on_is_no_assignment() {
        for (name, value) in [("", Some("1")), ("A=B", Some("1")), ("A", Some("x\0y"))] {
            let (worker, spare) = socket_pair().unwrap();
            let log = tempfile::tempfile().unwrap();
            let assignment = Assignment {
                args: vec!["run".into()],
                env: vec![(name.into(), value.map(String::from))],
            };
            send(worker.as_fd(), &assignment, &[], log.as_fd()).unwrap();
            assert!(
                matches!(receive(spare.as_fd()), Err(SpareError::Malformed(_))),
                "{name:?}={value:?}"
            );
        }
        assert!(valid_variable("PICOCENTER_STATE_DIR", Some("/x")));
        assert!(valid_variable("SECRET", None));
    }

    #[test]
    fn too_many_fds_are_refused_before_sending() {
        let (worker, _spare) = socket_pair().unwrap();
        let log = tempfile::tempfile().unwrap();
        let handed = vec![log.as_fd(); FDS_MAX];
        let assignment = Assignment {
            args: vec![],
            env: vec![],
        };
        assert!(matches!(
            send(worker.as_fd(), &assignment, &handed, log.as_fd()),
            Err(SpareError::TooLarge { .. })
        ));
    }
}
