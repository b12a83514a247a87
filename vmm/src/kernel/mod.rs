//! The state of an app, below everything that acts on it: the thread group (`process`),
//! its threads (`thread`), signals, clocks, network policy and the file windows the
//! doorbell reads from (`windows`). The syscall handlers
//! (`crate::syscalls`) and the run loop (`crate::run`) use these types; nothing here uses
//! them.

pub mod clock;
pub mod credentials;
pub mod netpolicy;
pub mod process;
pub mod procview;
pub mod shared_futex;
pub mod signals;
pub mod thread;
pub mod tree;
pub mod windows;

/// The pid the app sees. It is alone in its picoprocess, and 1 would suggest init.
pub const GUEST_PID: i32 = 2;
/// Its parent's pid.
pub const GUEST_PPID: i32 = 1;
