//! Futexes in memory shared between the app's processes.
//!
//! Each process of an app is a VMM of its own (a host fork), so a futex word in a shared
//! mapping ([`crate::memory::Backing::Shared`]) is one host page seen by several VMMs.
//! Their own futex tables cannot see each other's waiters; the host's futexes can, since
//! a shared futex is keyed by the page, not by the address space. So a shared wait is a
//! host wait on the word's host address, made by a helper thread, and a shared wake is a
//! host `FUTEX_WAKE` there, which reaches the helpers of every process.
//!
//! The helper waits with `futex_waitv` on two words: the app's, and a private cancel word
//! of its own. The guest thread waits on the helper's eventfd the way it waits on any fd
//! (so signals, deadlines, stops and snapshots interrupt it as they do a `read`), and a
//! wait it gives up is cancelled through the second word, with no race: a cancel made
//! before the helper starts waiting makes `futex_waitv` return at once. A wake that lands
//! on a helper whose wait was just cancelled is handed on to the next waiter, so no wake
//! is lost (tests below). (The host wait ignores FUTEX_WAIT_BITSET's bitset: a wake may reach a waiter
//! of another bitset, which sees a spurious wake-up, as futex users must allow for.)

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

/// Most helper threads waiting at once in one VMM (one process of the app): each is a
/// host thread. A wait beyond is refused (EAGAIN, which futex users retry).
pub const MAX_HELPERS: usize = 64;

static HELPERS: AtomicUsize = AtomicUsize::new(0);

/// A helper's place among [`MAX_HELPERS`], given back when dropped.
#[derive(Debug)]
struct HelperPlace;

/// In a freshly forked process: the parent's helpers are not here (a fork keeps one
/// thread), so none of their places is taken.
pub fn forked() {
    HELPERS.store(0, Ordering::SeqCst);
}

impl HelperPlace {
    fn take() -> Option<Self> {
        HELPERS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_HELPERS).then_some(n + 1)
            })
            .ok()
            .map(|_| HelperPlace)
    }
}

impl Drop for HelperPlace {
    fn drop(&mut self) {
        HELPERS.fetch_sub(1, Ordering::SeqCst);
    }
}

const PENDING: u32 = 0;
const WOKEN: u32 = 1;
const CHANGED: u32 = 2;
const CANCELLED: u32 = 3;
const FAILED: u32 = 4;

/// How a shared wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedWaitOutcome {
    /// A FUTEX_WAKE reached it.
    Woken,
    /// The word no longer held the expected value when the host wait began (EAGAIN).
    Changed,
    /// The host refused the wait (the errno).
    Failed(i32),
}

/// What the helper and the waiting guest thread share.
#[derive(Debug)]
struct Shared {
    /// The host address of the app's futex word.
    word: u64,
    /// Becomes 1 when the guest thread gives up; the helper waits on it too.
    cancel: AtomicU32,
    /// PENDING until the helper or the guest thread settles it.
    state: AtomicU32,
    /// The errno of a failed host wait.
    errno: AtomicU32,
    /// Readable once the helper settled the wait.
    done: Arc<OwnedFd>,
}

/// One guest thread's wait on a shared futex word. Dropping it cancels the wait.
#[derive(Debug)]
pub struct SharedFutexWait {
    shared: Arc<Shared>,
    /// Whether the guest thread saw the outcome (a wake it saw is not handed on).
    seen: std::sync::atomic::AtomicBool,
}

/// The kernel's `struct futex_waitv`.
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

const FUTEX2_SIZE_U32: u32 = 0x02;
const FUTEX2_PRIVATE: u32 = 128;

/// Wakes up to `count` host waiters on the shared futex word at host address `word`
/// (helpers of any process of the app); returns how many.
pub fn wake(word: u64, count: u32) -> u32 {
    // SAFETY: FUTEX_WAKE only names the address; the kernel reads no memory through it.
    let woken = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const u32,
            libc::FUTEX_WAKE,
            count.min(i32::MAX as u32) as i32,
        )
    };
    u32::try_from(woken).unwrap_or(0)
}

/// FUTEX_REQUEUE (or FUTEX_CMP_REQUEUE with `expected`) between two shared futex words
/// at host addresses `from` and `to`: wakes up to `wake` host waiters of `from` and moves
/// up to `requeue` others to `to`; returns how many it woke and moved.
pub fn requeue(
    from: u64,
    to: u64,
    wake: u32,
    requeue: u32,
    expected: Option<u32>,
) -> Result<u32, rustix::io::Errno> {
    let (op, value) = match expected {
        Some(value) => (libc::FUTEX_CMP_REQUEUE, value),
        None => (libc::FUTEX_REQUEUE, 0),
    };
    // SAFETY: the kernel reads the u32 at `from` (a host address of mapped guest memory;
    // a fault gives EFAULT) and names `to`; the count to requeue goes where the timeout
    // pointer would, as futex(2) has it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            from as *const u32,
            op,
            wake.min(i32::MAX as u32) as i32,
            requeue.min(i32::MAX as u32) as usize,
            to as *const u32,
            value,
        )
    };
    u32::try_from(rc).map_err(|_| {
        rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
            .unwrap_or(rustix::io::Errno::FAULT)
    })
}

/// Applies `op` (old value to new value and what it returns) to the shared futex word at
/// host address `word` as one atomic operation, as other processes change it too; returns
/// what `op` returned for the value it replaced (false if `op` gave up).
pub fn apply(word: u64, mut op: impl FnMut(u32) -> Option<(u32, bool)>) -> bool {
    // SAFETY: `word` is the 4-byte-aligned host address of a guest page mapped shared in
    // this process (`AddressSpace::shared_word`), which stays mapped while the call runs
    // under the process lock; every access to it, the guests' included, is atomic.
    let atomic = unsafe { AtomicU32::from_ptr(word as *mut u32) };
    let mut result = false;
    let _ = atomic.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| {
        let (new, returned) = op(old)?;
        result = returned;
        Some(new)
    });
    result
}

impl SharedFutexWait {
    /// Starts waiting on the word at host address `word` while it holds `expected`.
    /// `word` must be a host address of guest memory mapped shared, 4-byte aligned.
    /// Fails with EAGAIN when [`MAX_HELPERS`] are waiting already.
    pub fn start(word: u64, expected: u32) -> std::io::Result<Self> {
        let place =
            HelperPlace::take().ok_or_else(|| std::io::Error::from_raw_os_error(libc::EAGAIN))?;
        let done = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let shared = Arc::new(Shared {
            word,
            cancel: AtomicU32::new(0),
            state: AtomicU32::new(PENDING),
            errno: AtomicU32::new(0),
            done: Arc::new(done),
        });
        let helper = shared.clone();
        std::thread::Builder::new()
            .name("shared-futex".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let _place = place;
                helper.wait(expected);
            })?;
        Ok(Self {
            shared,
            seen: false.into(),
        })
    }

    /// The host address of the word waited on.
    pub fn word(&self) -> u64 {
        self.shared.word
    }

    /// The fd that becomes readable when the wait ends by itself (for the thread's poll).
    pub fn ready_fd(&self) -> Arc<OwnedFd> {
        self.shared.done.clone()
    }

    /// How the wait ended, or `None` while it goes on. An outcome read here counts as
    /// seen by the guest thread.
    pub fn outcome(&self) -> Option<SharedWaitOutcome> {
        let outcome = match self.shared.state.load(Ordering::Acquire) {
            WOKEN => SharedWaitOutcome::Woken,
            CHANGED => SharedWaitOutcome::Changed,
            FAILED => SharedWaitOutcome::Failed(self.shared.errno.load(Ordering::Relaxed) as i32),
            _ => return None,
        };
        self.seen.store(true, Ordering::Relaxed);
        Some(outcome)
    }
}

impl Drop for SharedFutexWait {
    fn drop(&mut self) {
        let cancelled = self.shared.state.compare_exchange(
            PENDING,
            CANCELLED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if cancelled == Err(WOKEN) && !self.seen.load(Ordering::Relaxed) {
            // A wake reached this wait after its thread stopped looking: hand it on.
            wake(self.shared.word, 1);
        }
        self.shared.cancel.store(1, Ordering::Release);
        // SAFETY: FUTEX_WAKE on our own word; the helper holds the Arc that keeps it alive.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.shared.cancel.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
    }
}

impl Shared {
    /// The helper thread's body: one host wait, then the outcome.
    fn wait(&self, expected: u32) {
        // The cancel word comes first: futex_waitv returns the highest index it found
        // woken, so a wake of the app's word that races a cancel still reads as a wake
        // (and is handed on), never as the cancel alone.
        let waiters = [
            FutexWaitv {
                val: 0,
                uaddr: self.cancel.as_ptr() as u64,
                flags: FUTEX2_SIZE_U32 | FUTEX2_PRIVATE,
                reserved: 0,
            },
            FutexWaitv {
                val: u64::from(expected),
                uaddr: self.word,
                flags: FUTEX2_SIZE_U32,
                reserved: 0,
            },
        ];
        let state = loop {
            // SAFETY: `waiters` is a valid array of two entries for the call's duration;
            // the first names our own live word, the second a host address of guest
            // memory (the kernel only reads the u32 there; a fault gives EFAULT). No
            // timeout: a deadline cancels the wait instead.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_futex_waitv,
                    waiters.as_ptr(),
                    2u32,
                    0u32,
                    std::ptr::null::<libc::timespec>(),
                    libc::CLOCK_MONOTONIC,
                )
            };
            if rc == 1 {
                break WOKEN;
            }
            if rc == 0 {
                if self.cancel.load(Ordering::Acquire) != 0 {
                    // Cancelled: the guest thread has gone on.
                    return;
                }
                // A stray wake of the cancel word (its heap address may have been
                // another futex's before): wait on.
                continue;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // Either word differs: if it is the cancel word, the state says so below.
                Some(libc::EAGAIN) => break CHANGED,
                errno => {
                    self.errno
                        .store(errno.unwrap_or(libc::EFAULT) as u32, Ordering::Relaxed);
                    break FAILED;
                }
            }
        };
        let settled =
            self.state
                .compare_exchange(PENDING, state, Ordering::AcqRel, Ordering::Acquire);
        if settled.is_err() {
            // Cancelled meanwhile: a wake meant for some waiter goes to the next one.
            if state == WOKEN {
                wake(self.word, 1);
            }
            return;
        }
        let _ = rustix::io::write(&*self.done, &1u64.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settled(wait: &SharedFutexWait) -> Option<SharedWaitOutcome> {
        for _ in 0..2000 {
            if let Some(outcome) = wait.outcome() {
                return Some(outcome);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn a_wake_ends_the_wait_and_a_changed_word_does_not_wait() {
        let word = Box::new(AtomicU32::new(7));
        let at = word.as_ptr() as u64;
        let changed = SharedFutexWait::start(at, 8).unwrap();
        assert_eq!(settled(&changed), Some(SharedWaitOutcome::Changed));
        let wait = SharedFutexWait::start(at, 7).unwrap();
        until_queued(at, 7, 1);
        assert_eq!(wake(at, 1), 1);
        assert_eq!(settled(&wait), Some(SharedWaitOutcome::Woken));
    }

    /// How many host waiters the word has (a requeue onto itself counts them).
    fn queued(at: u64, value: u32) -> i64 {
        // SAFETY: FUTEX_CMP_REQUEUE of nothing woken onto the same word moves no waiter
        // anywhere; the kernel reads the u32 at `at`, which the test keeps alive.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                at as *const u32,
                libc::FUTEX_CMP_REQUEUE,
                0,
                i32::MAX as usize,
                at as *const u32,
                value,
            )
        }
    }

    fn until_queued(at: u64, value: u32, count: i64) {
        for _ in 0..2000 {
            if queued(at, value) == count {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the helpers never waited");
    }

    #[test]
    fn a_cancelled_wait_hands_its_wake_on() {
        let word = Box::new(AtomicU32::new(0));
        let at = word.as_ptr() as u64;
        let first = SharedFutexWait::start(at, 0).unwrap();
        let second = SharedFutexWait::start(at, 0).unwrap();
        until_queued(at, 0, 2);
        // One wake, then the first wait is given up without looking: whichever helper the
        // host woke, the second wait ends.
        assert_eq!(wake(at, 1), 1);
        drop(first);
        assert_eq!(settled(&second), Some(SharedWaitOutcome::Woken));
    }

    #[test]
    fn a_cancelled_wait_leaves_the_word() {
        let word = Box::new(AtomicU32::new(0));
        let at = word.as_ptr() as u64;
        let wait = SharedFutexWait::start(at, 0).unwrap();
        until_queued(at, 0, 1);
        drop(wait);
        until_queued(at, 0, 0);
    }
}
