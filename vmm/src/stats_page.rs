//! The counters a worker reads without waking the VMM: a page-sized file next to the
//! control socket (`<run>/<name>.stats`) that the VMM maps shared and updates as it works
//! (syscalls, connections, memory), and that names the app's threads, whose CPU time the
//! reader takes from /proc. An idle app's VMM then does nothing at all when its worker
//! looks at it; asking through the control socket would wake a thread every time.
//!
//! Layout, little-endian u64 words: `[MAGIC, VERSION, pid, syscalls, connections,
//! frames_in_use, frames_total, retired CPU ns, tree, thread count, tids...]`. The retired
//! CPU is that of app threads that have ended (a mailbox poller retires while the app
//! idles), so that the app's CPU time never goes back. `tree` is 1 once the app has other
//! processes: each is a VMM forked from this one's, whose CPU the reader adds (from the
//! kernel's lists of children), so that the whole tree counts.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"PICOSTAT");
const VERSION: u64 = 3;
const SIZE: usize = 4096;
/// Word indexes.
const PID: usize = 2;
const SYSCALLS: usize = 3;
const CONNECTIONS: usize = 4;
const FRAMES_IN_USE: usize = 5;
const FRAMES_TOTAL: usize = 6;
const RETIRED_CPU: usize = 7;
const TREE: usize = 8;
const THREADS: usize = 9;
const FIRST_TID: usize = 10;
/// Most processes a reader looks for below a VMM (an app has at most 64, each with a
/// supervisor-free VMM; the first one's supervisor is one more).
const MAX_DESCENDANTS: usize = 256;
/// Most threads named (the vCPU and mailbox threads, and later one vCPU a thread).
pub const MAX_THREADS: usize = SIZE / 8 - FIRST_TID;

/// The VMM's side: the shared mapping.
#[derive(Debug)]
pub struct StatsPage {
    base: *mut AtomicU64,
    /// Serialises changes to the thread list (threads come and go on their own).
    threads: std::sync::Mutex<()>,
}

// SAFETY: the mapping is only ever accessed through atomics, from any thread.
unsafe impl Send for StatsPage {}
// SAFETY: as above.
unsafe impl Sync for StatsPage {}

impl StatsPage {
    /// Creates (or replaces) the page at `path`, 0600, and maps it.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(SIZE as u64)?;
        // SAFETY: a new shared mapping of SIZE bytes of a file of that size; nothing else
        // in this process maps it, and it is unmapped only in Drop.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                SIZE,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                file.as_fd(),
                0,
            )?
        };
        let page = Self {
            base: base.cast(),
            threads: std::sync::Mutex::new(()),
        };
        page.word(PID)
            .store(u64::from(std::process::id()), Ordering::Relaxed);
        page.word(1).store(VERSION, Ordering::Relaxed);
        // The magic last: a reader that sees it sees a whole page.
        page.word(0).store(MAGIC, Ordering::Release);
        Ok(page)
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        debug_assert!(index < SIZE / 8);
        // SAFETY: `index` is inside the mapping (every caller passes a constant or a
        // bounded index), which lives as long as `self`, and is only used atomically.
        unsafe { &*self.base.add(index.min(SIZE / 8 - 1)) }
    }

    /// Publishes the counters.
    pub fn publish(&self, syscalls: u64, connections: u64, frames_in_use: u64, frames_total: u64) {
        self.word(SYSCALLS).store(syscalls, Ordering::Relaxed);
        self.word(CONNECTIONS).store(connections, Ordering::Relaxed);
        self.word(FRAMES_IN_USE)
            .store(frames_in_use, Ordering::Relaxed);
        self.word(FRAMES_TOTAL)
            .store(frames_total, Ordering::Relaxed);
    }

    /// Says that the app has other processes, whose CPU time readers add.
    pub fn mark_tree(&self) {
        self.word(TREE).store(1, Ordering::Release);
    }

    /// Names thread `tid` as one that works for the app.
    pub fn add_thread(&self, tid: i32) {
        let _list = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let count = self.word(THREADS).load(Ordering::Relaxed) as usize;
        if count < MAX_THREADS {
            self.word(FIRST_TID + count)
                .store(tid as u64, Ordering::Relaxed);
            self.word(THREADS)
                .store(count as u64 + 1, Ordering::Release);
        }
    }
}

impl StatsPage {
    /// Thread `tid` ends, having used `cpu_ns` of CPU: its time moves to the retired
    /// total first (a reader may count it twice for a moment, never lose it), then its
    /// name leaves the list (the last one takes its place).
    pub fn retire_thread(&self, tid: i32, cpu_ns: u64) {
        let _list = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        self.word(RETIRED_CPU).fetch_add(cpu_ns, Ordering::Release);
        let count = (self.word(THREADS).load(Ordering::Relaxed) as usize).min(MAX_THREADS);
        let Some(at) =
            (0..count).find(|&i| self.word(FIRST_TID + i).load(Ordering::Relaxed) == tid as u64)
        else {
            return;
        };
        let last = self.word(FIRST_TID + count - 1).load(Ordering::Relaxed);
        self.word(FIRST_TID + at).store(last, Ordering::Relaxed);
        self.word(THREADS)
            .store(count as u64 - 1, Ordering::Release);
    }
}

impl Drop for StatsPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `create`, which nothing uses any more.
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), SIZE) };
    }
}

/// What a reader finds in a stats page, with the CPU times from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageStats {
    /// The VMM's pid.
    pub pid: u32,
    /// Syscalls handled.
    pub syscalls: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Guest memory in use, bytes.
    pub memory_bytes: u64,
    /// CPU time of the whole VMM process and of the VMMs of the app's other processes,
    /// nanoseconds.
    pub cpu_ns: u64,
    /// CPU time of the threads that work for the app, and of the VMMs of the app's other
    /// processes, nanoseconds.
    pub app_cpu_ns: u64,
    /// Resident memory of the VMM, bytes.
    pub rss_bytes: u64,
}

/// A reader's view of one VMM's stats page, for looking at it again and again at the
/// cost of one system call while the VMM idles: the process's CPU clock. Only when that
/// clock moved (nothing else writes the page, so it cannot have changed otherwise) is
/// the page read again, and the per-thread CPU times and the resident memory from /proc
/// (a handful of opens and parses, which a worker holding thousands of idle apps cannot
/// afford every second for each).
///
/// The page is opened for each read, never kept open (a worker holding thousands of apps
/// would run out of files) nor mapped (the VMM owns the file, and a mapping of a file its
/// owner truncates would fault in the reader); a symlink, or anything but a regular file,
/// is not read.
#[derive(Debug)]
pub struct StatsView {
    path: std::path::PathBuf,
    pid: u32,
    last: Option<PageStats>,
    /// The page said the app has other processes.
    tree: bool,
}

impl StatsView {
    /// A view of the page at `path` of the VMM whose pid is `pid` (a page that names
    /// another process is not believed: the VMM runs beside the tenant's code and may be
    /// subverted). Fails if the page cannot be read now.
    pub fn open(path: &Path, pid: u32) -> std::io::Result<Self> {
        read_page(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            pid,
            last: None,
            tree: false,
        })
    }

    /// The counters now. `None` if the page is not (or no longer) a whole page of the
    /// VMM this view was opened for, or that VMM is gone.
    pub fn read(&mut self) -> Option<PageStats> {
        let own_cpu_ns = process_cpu_ns(self.pid)?;
        let others_ns = if self.tree {
            descendants_cpu_ns(self.pid)
        } else {
            0
        };
        let mut cpu_ns = own_cpu_ns.saturating_add(others_ns);
        if let Some(last) = self.last.as_ref().filter(|last| last.cpu_ns == cpu_ns) {
            // Nothing of the VMM ran since the last look: neither its page, nor its
            // threads' times, nor its memory can have changed.
            return Some(last.clone());
        }
        let (bytes, n) = read_page(&self.path).ok()?;
        let page = Page(&bytes[..n]);
        if page.word(0)? != MAGIC || page.word(1)? != VERSION {
            return None;
        }
        let pid = u32::try_from(page.word(PID)?).ok()?;
        if pid != self.pid {
            return None;
        }
        let mut others_ns = others_ns;
        if !self.tree && page.word(TREE)? != 0 {
            // The app has just become a tree: from now on its other processes count.
            self.tree = true;
            others_ns = descendants_cpu_ns(self.pid);
            cpu_ns = own_cpu_ns.saturating_add(others_ns);
        }
        let (app_cpu_ns, rss_bytes) = match &self.last {
            // Never less than before: a retiring thread's time is kept as of when it fell
            // asleep, a few microseconds short of what /proc said of it since.
            Some(last) => (
                page.app_cpu_ns(pid)?.max(last.app_cpu_ns),
                rss_bytes(pid).unwrap_or(0),
            ),
            None => (page.app_cpu_ns(pid)?, rss_bytes(pid).unwrap_or(0)),
        };
        // The VMM writes the page (and may be subverted, or read mid-update): its
        // threads' time can never be more than the whole process's, which the kernel says.
        let app_cpu_ns = app_cpu_ns.min(own_cpu_ns).saturating_add(others_ns);
        let stats = PageStats {
            pid,
            syscalls: page.word(SYSCALLS)?,
            connections: page.word(CONNECTIONS)?,
            memory_bytes: page.word(FRAMES_IN_USE)?.saturating_mul(4096),
            cpu_ns,
            app_cpu_ns,
            rss_bytes,
        };
        self.last = Some(stats.clone());
        Some(stats)
    }
}

/// Reads the page at `path`: its bytes and how many there were. Never follows a symlink,
/// never blocks on a FIFO, never takes a terminal as the worker's, and reads only a
/// regular file.
fn read_page(path: &Path) -> std::io::Result<([u8; SIZE], usize)> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if !rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode).is_file() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut bytes = [0u8; SIZE];
    let n = rustix::io::pread(&fd, &mut bytes, 0)?;
    Ok((bytes, n))
}

/// The bytes of a page as read.
struct Page<'a>(&'a [u8]);

impl Page<'_> {
    fn word(&self, i: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.0.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    }

    /// The CPU time of the threads the page names, which must be threads of `pid`, and
    /// of those that ended.
    fn app_cpu_ns(&self, pid: u32) -> Option<u64> {
        let threads = (self.word(THREADS)? as usize).min(MAX_THREADS);
        let live: u64 = (0..threads)
            .filter_map(|i| self.word(FIRST_TID + i))
            .filter_map(|tid| thread_cpu_ns(pid, tid))
            .sum();
        live.checked_add(self.word(RETIRED_CPU)?)
    }
}

/// Time on CPU of thread `tid` of `pid`, from its schedstat (nanoseconds).
fn thread_cpu_ns(pid: u32, tid: u64) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Time on CPU of every thread of process `pid`, exited ones included, in nanoseconds:
/// its CPU clock, which Linux lets any process read (one call, where /proc/PID/stat is
/// an open, a read and a parse, in 10 ms ticks).
fn process_cpu_ns(pid: u32) -> Option<u64> {
    // The clock id Linux encodes for "the CPU time of process pid, scheduler clock"
    // (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) in include/linux/posix-timers.h).
    const CPUCLOCK_SCHED: libc::clockid_t = 2;
    let pid = libc::clockid_t::try_from(pid).ok()?;
    let clock = (!pid << 3) | CPUCLOCK_SCHED;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is; an unknown or ended
    // pid gives an error, not undefined behaviour.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// The CPU time of every process below `pid` (the VMMs of an app's other processes, each
/// a fork of its parent's, and the first one's supervisor), from the kernel's lists of
/// each thread's children; at most [`MAX_DESCENDANTS`] of them.
fn descendants_cpu_ns(pid: u32) -> u64 {
    let mut queue = vec![pid];
    let mut seen = 0usize;
    let mut total = 0u64;
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                seen += 1;
                if seen > MAX_DESCENDANTS {
                    return total;
                }
                total = total.saturating_add(process_cpu_ns(child).unwrap_or(0));
                queue.push(child);
            }
        }
    }
    total
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy_for(time: std::time::Duration) {
        let start = std::time::Instant::now();
        while start.elapsed() < time {
            std::hint::black_box(0);
        }
    }

    #[test]
    fn a_reader_sees_what_the_vmm_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.stats");
        assert!(StatsView::open(&path, std::process::id()).is_err());
        let page = StatsPage::create(&path).unwrap();
        page.publish(42, 3, 10, 100);
        page.add_thread(rustix::thread::gettid().as_raw_nonzero().get());
        // Some CPU for this thread to have used.
        busy_for(std::time::Duration::from_millis(20));
        let mut view = StatsView::open(&path, std::process::id()).unwrap();
        let stats = view.read().unwrap();
        assert_eq!(stats.pid, std::process::id());
        assert_eq!((stats.syscalls, stats.connections), (42, 3));
        assert_eq!(stats.memory_bytes, 10 * 4096);
        assert!(stats.app_cpu_ns > 0 && stats.rss_bytes > 0);
        assert!(stats.cpu_ns >= stats.app_cpu_ns);
        // More work shows on the next look, which reads the threads' times again.
        busy_for(std::time::Duration::from_millis(20));
        page.publish(43, 4, 10, 100);
        let later = view.read().unwrap();
        assert!(later.cpu_ns > stats.cpu_ns && later.app_cpu_ns > stats.app_cpu_ns);
        assert_eq!((later.syscalls, later.connections), (43, 4));
        // A thread that ends leaves the list, and its time stays counted: here the only
        // one retires with what it used, and the total does not go back.
        let me = rustix::thread::gettid().as_raw_nonzero().get();
        let own = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        page.retire_thread(me, own.tv_sec as u64 * 1_000_000_000 + own.tv_nsec as u64);
        busy_for(std::time::Duration::from_millis(5));
        let retired = view.read().unwrap();
        assert!(
            retired.app_cpu_ns >= later.app_cpu_ns,
            "{} ns",
            retired.app_cpu_ns
        );
        // A page claiming more than the process ever used is not believed beyond that.
        page.retire_thread(me + 1, u64::MAX / 2);
        busy_for(std::time::Duration::from_millis(5));
        let forged = view.read().unwrap();
        assert!(forged.app_cpu_ns <= forged.cpu_ns, "{forged:?}");
        // A page that names another process is not believed.
        assert_eq!(
            StatsView::open(&path, std::process::id() + 1)
                .unwrap()
                .read(),
            None
        );
        // A torn or foreign file is not a page, nor is a replaced one.
        std::fs::write(&path, b"nope").unwrap();
        busy_for(std::time::Duration::from_millis(1));
        assert_eq!(view.read(), None);
    }

    /// Once the page says the app is a tree, its other processes' CPU counts: here a
    /// forked child that works while this process does not.
    #[test]
    fn the_cpu_of_other_processes_counts_once_the_app_is_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.stats");
        let page = StatsPage::create(&path).unwrap();
        let mut view = StatsView::open(&path, std::process::id()).unwrap();
        let before = view.read().unwrap();
        page.mark_tree();
        // SAFETY: the child only spins and _exits; it touches nothing shared.
        let child = unsafe { libc::fork() };
        if child == 0 {
            busy_for(std::time::Duration::from_secs(20));
            // SAFETY: ends the forked test process at once.
            unsafe { libc::_exit(0) };
        }
        // However loaded the machine, the child's 50 ms of CPU show within the limit.
        let started = std::time::Instant::now();
        let during = loop {
            let now = view.read().unwrap();
            if now.app_cpu_ns >= before.app_cpu_ns + 50_000_000
                || started.elapsed() > std::time::Duration::from_secs(15)
            {
                break now;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut status = 0;
        // SAFETY: ends and waits for our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, &mut status, 0)
        };
        assert!(
            during.app_cpu_ns >= before.app_cpu_ns + 50_000_000,
            "{before:?} then {during:?}"
        );
        assert!(during.cpu_ns >= during.app_cpu_ns);
    }

    #[test]
    fn a_view_reads_a_regular_file_only_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        let real = dir.path().join("real.stats");
        let page = StatsPage::create(&real).unwrap();
        page.publish(1, 2, 3, 4);
        let link = dir.path().join("link.stats");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(
            StatsView::open(&link, pid).is_err(),
            "read through a symlink"
        );
        let fifo = dir.path().join("fifo.stats");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(StatsView::open(&fifo, pid).is_err(), "read a FIFO");
        // A page swapped for a symlink after the view was opened is not read either.
        let mut view = StatsView::open(&real, pid).unwrap();
        assert_eq!(view.read().map(|s| s.connections), Some(2));
        let elsewhere = dir.path().join("elsewhere.stats");
        let other = StatsPage::create(&elsewhere).unwrap();
        other.publish(9, 9, 9, 9);
        drop(page);
        std::fs::remove_file(&real).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &real).unwrap();
        busy_for(std::time::Duration::from_millis(1));
        assert_eq!(view.read(), None);
    }
}
