//! The sockets of swapped-out apps, held by the worker so that their addresses keep
//! accepting: the kernel goes on completing TCP handshakes into a held listening socket's
//! backlog (and queueing datagrams on a held UDP socket) while the app is in cold storage,
//! and the first one wakes it. The restored VMM gets the very same sockets back, so what
//! queued is served by the app, and nothing is refused or reaches another app.
//!
//! The worker gets the sockets from the running VMM (the control socket's `sockets` op
//! passes them with SCM_RIGHTS) *before* it asks for the snapshot, so there is no moment
//! with nobody listening.

use std::io::IoSliceMut;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// Most sockets one app hands over.
pub const MAX_SOCKETS: usize = 64;

/// One socket the VMM handed over, as it described it.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct SocketInfo {
    /// The app's fd number for it.
    pub guest_fd: i32,
    /// AF_INET or AF_INET6.
    pub domain: i32,
    /// SOCK_STREAM or SOCK_DGRAM.
    pub kind: i32,
    /// The address it is bound to.
    pub bound: String,
    /// Its backlog, if it listens.
    pub listening: Option<i32>,
}

/// The sockets of one swapped-out app.
#[derive(Debug)]
pub struct HeldSockets {
    /// The app's address, which stays its own while the sockets are held.
    pub address: Ipv4Addr,
    /// The sockets, in the order of `info`.
    pub fds: Vec<OwnedFd>,
    /// What each is.
    pub info: Vec<SocketInfo>,
}

/// Why the sockets could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    /// The control socket failed.
    #[error("asking {path} for its sockets: {source}")]
    Io {
        /// The control socket.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer made no sense.
    #[error("{path} answered {answer:?}")]
    Answer {
        /// The control socket.
        path: std::path::PathBuf,
        /// What it said.
        answer: String,
    },
}

#[derive(serde::Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    sockets: Vec<SocketInfo>,
    #[serde(default)]
    error: Option<String>,
}

/// Asks the VMM at `control` for its listening and bound IP sockets (blocking; run it on
/// a blocking thread). The host sockets come back as new fds of this process.
pub fn take(control: &Path, address: Ipv4Addr) -> Result<HeldSockets, HeldError> {
    let io = |source| HeldError::Io {
        path: control.to_path_buf(),
        source,
    };
    let stream = std::os::unix::net::UnixStream::connect(control).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    std::io::Write::write_all(&mut &stream, b"{\"op\":\"sockets\"}\n").map_err(io)?;
    let mut line = vec![0u8; 64 * 1024];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control_buffer = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut line)],
        &mut control_buffer,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io(e.into()))?;
    let mut fds = Vec::new();
    for message in control_buffer.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let text = String::from_utf8_lossy(&line[..received.bytes]).into_owned();
    let bad = || HeldError::Answer {
        path: control.to_path_buf(),
        answer: text.clone(),
    };
    let answer: Answer = serde_json::from_str(text.trim()).map_err(|_| bad())?;
    if !answer.ok || answer.error.is_some() || answer.sockets.len() != fds.len() {
        return Err(bad());
    }
    Ok(HeldSockets {
        address,
        fds,
        info: answer.sockets,
    })
}

/// Copies of held sockets that a task can wait on.
#[derive(Debug)]
pub struct Probe(Vec<tokio::io::unix::AsyncFd<OwnedFd>>);

impl Probe {
    /// Waits until a connection or a datagram waits on one of the sockets (forever if
    /// there are none).
    pub async fn wait_for_traffic(&self) -> std::io::Result<()> {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let readable = self.0.iter().map(|w| Box::pin(w.readable()));
        let (ready, _, _) = futures::future::select_all(readable).await;
        ready.map(drop)
    }
}

impl HeldSockets {
    /// Copies of the sockets to wait on (must be called inside the tokio runtime).
    pub fn probe(&self) -> std::io::Result<Probe> {
        let mut watched = Vec::with_capacity(self.fds.len());
        for fd in &self.fds {
            let copy = fd.as_fd().try_clone_to_owned()?;
            // SAFETY: `copy` is an open fd this AsyncFd owns from now on; an OwnedFd's
            // raw fd never changes while it lives.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    copy,
                    tokio::io::Interest::READABLE,
                )
            };
            watched.push(registered.map_err(|e| e.into_parts().1)?);
        }
        Ok(Probe(watched))
    }

    /// The port of the first listening socket with a connection waiting, if any: the
    /// port the app's first client asked for, whose requests' pages a restore brings in
    /// first.
    pub fn waiting_port(&self) -> Option<u16> {
        use rustix::event::{PollFd, PollFlags};
        self.fds.iter().find_map(|fd| {
            if !rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false) {
                return None;
            }
            let mut poll = [PollFd::new(fd, PollFlags::IN)];
            let now = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if !rustix::event::poll(&mut poll, Some(&now)).is_ok_and(|n| n > 0) {
                return None;
            }
            local_port(fd)
        })
    }

    /// The port whose requests' pages a restore should bring in first: the one a
    /// connection waits on, else the only port the app listens on (a DNS query woke it,
    /// and its client will connect there next), else none (the app-wide ActiveSet).
    pub fn first_port(&self) -> Option<u16> {
        self.waiting_port().or_else(|| {
            let mut listening = self
                .fds
                .iter()
                .filter(|fd| rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false))
                .filter_map(local_port);
            match (listening.next(), listening.next()) {
                (Some(port), None) => Some(port),
                _ => None,
            }
        })
    }

    /// The raw fds, for a child process to inherit.
    pub fn raw_fds(&self) -> Vec<i32> {
        self.fds.iter().map(|fd| fd.as_raw_fd()).collect()
    }
}

/// The port socket `fd` is bound to.
fn local_port(fd: &OwnedFd) -> Option<u16> {
    match rustix::net::getsockname(fd).ok()?.try_into().ok()? {
        std::net::SocketAddr::V4(a) => Some(a.port()),
        std::net::SocketAddr::V6(a) => Some(a.port()),
    }
}
