//! File windows: the files the doorbell reads by itself.
//!
//! nginx answers a request for a static file with recvfrom, pread64 and writev, and the
//! pread64 is of a file on the read-only root, which nothing can change. Once such a file
//! has been read through the VMM [`READS_BEFORE_WINDOW`] times, it gets a *window*: the
//! whole file mapped read-only above the user range (straight from the host's page cache,
//! as immutable file mappings are), and an entry in the file table
//! ([`abi::file_table`]) with its size and `struct stat`. The doorbell then answers
//! pread64, fstat and fstat-through-newfstatat on that fd itself: no exit, no mailbox.
//!
//! Where the open file is named by this one fd of one process, its offset moves into the
//! guest too (the scratch page's [`abi::scratch::FILE_OFFSETS`]), and the doorbell answers
//! read and lseek as well. The guest's copy is then the offset: the VMM puts it on the
//! host fd before a call of its own uses the host's ([`FileWindows::before_call`]) and
//! takes it back after; and gives it back to the host for good when the file could come
//! to be shared (a dup, a fork, a sendmsg that may pass it on).
//!
//! A window follows the open file, not the number. After every call that changed the fd
//! table ([`FdTable::generation`]), the windows of fds that no longer name their file are
//! taken down, the table entry first. Windows are not part of snapshots (the offsets are
//! put on the host fds before a capture): a restored app reads through the VMM until its
//! files earn windows again.

use crate::fdtable::{FdTable, OpenFile};
use crate::memory::layout::{cpu_local_gpa, FIRST_CPU, SYSTEM_GPA};
use crate::memory::AddressSpace;
use picocenter_guest_shim::abi::{self, file_table};
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

/// Reads of a file through the VMM before it gets a window, so that one-off readers (the
/// dynamic loader reading a library's headers; Python's open, fstat, read, read, close of
/// a module) never pay for one.
pub const READS_BEFORE_WINDOW: u32 = 4;
/// Windows take at most this share of the app's RAM (their frames are RAM frames, which
/// the app cannot use while the files stay open).
const RAM_SHARE: u64 = 32;

/// One window.
#[derive(Debug)]
struct Window {
    /// The open file it shows.
    file: Weak<OpenFile>,
    /// The file's size, which the window holds.
    len: u64,
    /// Whether the file's offset is kept in the guest.
    offset_in_guest: bool,
}

/// The app's file windows.
#[derive(Debug, Default)]
pub struct FileWindows {
    /// Whether windows are made at all (`run --no-guest-reads` turns them off, for
    /// measuring what they save).
    enabled: bool,
    /// The windows, by fd.
    windows: BTreeMap<i32, Window>,
    /// Files read through the VMM and not given a window yet: fd -> (file, reads);
    /// `u32::MAX` reads for a file that will never get one (not a regular file, too big).
    reads: BTreeMap<i32, (Weak<OpenFile>, u32)>,
    /// The fd table's generation when the windows were last checked against it.
    generation: u64,
    /// RAM frames the windows hold.
    pages: u64,
    /// Whether offsets may move into the guest: only while the app has one vCPU, whose
    /// scratch page holds them (see [`offset_gpa`]).
    offsets_in_guest: bool,
}

/// Whether `weak` is `file`.
fn is(weak: &Weak<OpenFile>, file: &Arc<OpenFile>) -> bool {
    std::ptr::eq(weak.as_ptr(), Arc::as_ptr(file))
}

/// Guest-physical address of fd's file-table entry.
fn entry_gpa(fd: i32) -> u64 {
    SYSTEM_GPA + abi::FILE_TABLE_PAGE * abi::PAGE_SIZE + fd as u64 * file_table::ENTRY_SIZE
}

/// Guest-physical address of fd's offset in the scratch page (the first vCPU's: the
/// doorbell moves offsets only there).
fn offset_gpa(fd: i32) -> u64 {
    cpu_local_gpa(FIRST_CPU, abi::cpu_local::SCRATCH_PAGE)
        + abi::scratch::FILE_OFFSETS
        + fd as u64 * 8
}

/// The fd of an offset-using call `nr` whose offset is the open file's own, if any: the
/// VMM must put the guest's copy of that offset on the host fd first.
fn offset_fd(nr: u64, args: &[u64; 6]) -> Option<i32> {
    let fd = |i: usize| Some(args[i] as i32);
    match nr as i64 {
        // (fcntl: a lock relative to SEEK_CUR; ioctl: FIONREAD, what is left to read.)
        libc::SYS_read | libc::SYS_readv | libc::SYS_lseek | libc::SYS_fcntl | libc::SYS_ioctl => {
            fd(0)
        }
        // With no offset of its own, it reads from the file's.
        libc::SYS_sendfile if args[2] == 0 => fd(1),
        libc::SYS_splice | libc::SYS_copy_file_range if args[1] == 0 => fd(0),
        libc::SYS_preadv2 if args[3] as i64 == -1 => fd(0),
        _ => None,
    }
}

/// Guest-virtual address of fd's window.
fn window_va(fd: i32) -> u64 {
    file_table::WINDOWS_VA + fd as u64 * file_table::WINDOW_SIZE
}

/// The fd whose window slot holds guest-virtual address `va`, if any.
pub fn window_at(va: u64) -> Option<i32> {
    let offset = va.checked_sub(file_table::WINDOWS_VA)?;
    let fd = offset / file_table::WINDOW_SIZE;
    (fd < file_table::FDS).then_some(fd as i32)
}

impl FileWindows {
    /// No windows yet; `enabled` says whether there will be any.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            offsets_in_guest: true,
            ..Default::default()
        }
    }

    /// Gives every offset back to the host and keeps them there from now on: for an app
    /// that has more than one vCPU, since the doorbell of each would move its own copy.
    pub fn keep_offsets_on_host(&mut self, mem: &AddressSpace) {
        self.give_offsets_back(mem);
        self.offsets_in_guest = false;
    }

    /// Whether a forwarded read of `fd` may earn it a window: the caller then checks
    /// the file and calls [`Self::offer`].
    pub fn wants(&self, fd: i32) -> bool {
        self.enabled
            && (0..file_table::FDS as i32).contains(&fd)
            && !self.windows.contains_key(&fd)
            && self
                .reads
                .get(&fd)
                .is_none_or(|(_, reads)| *reads != u32::MAX)
    }

    /// Counts a read through the VMM of `file`, open at `fd` for reading and on the
    /// read-only root. True once it has made [`READS_BEFORE_WINDOW`]: the caller then
    /// looks the file up on the host and calls [`Self::open`] (a one-off reader costs
    /// nothing more than this count).
    pub fn count_read(&mut self, fd: i32, file: &Arc<OpenFile>) -> bool {
        if !self.wants(fd) {
            return false;
        }
        let reads = match self.reads.get_mut(&fd) {
            Some((seen, reads)) if is(seen, file) => {
                *reads += 1;
                *reads
            }
            _ => {
                self.reads.insert(fd, (Arc::downgrade(file), 1));
                1
            }
        };
        reads >= READS_BEFORE_WINDOW
    }

    /// Gives `file` at `fd` (which [`Self::count_read`] said has earned it), whose
    /// `struct stat` as the app sees it is `stat`, a window, if it is a regular file that
    /// fits one and the windows' share of RAM allows.
    ///
    /// `offset`: the file's offset, if it may move into the guest (this fd is the only one
    /// naming the open file, in a process that has not forked).
    pub fn open(
        &mut self,
        mem: &mut AddressSpace,
        fd: i32,
        file: &Arc<OpenFile>,
        stat: &rustix::fs::Stat,
        offset: Option<u64>,
    ) {
        let size = u64::try_from(stat.st_size).unwrap_or(u64::MAX);
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG || size > file_table::WINDOW_SIZE {
            self.reads.insert(fd, (Arc::downgrade(file), u32::MAX));
            return;
        }
        let pages = size.div_ceil(abi::PAGE_SIZE);
        let budget = mem.phys().ram_size() / abi::PAGE_SIZE / RAM_SHARE;
        if self.pages + pages > budget {
            return;
        }
        if let Err(errno) = mem.map_window(window_va(fd), file.host(), size) {
            tracing::debug!(fd, %errno, "no window for the file");
            return;
        }
        let gpa = entry_gpa(fd);
        let offset = offset.filter(|_| self.offsets_in_guest);
        let flags = if offset.is_some() {
            file_table::OFFSET_IN_GUEST
        } else {
            0
        };
        let phys = mem.phys();
        let written = phys
            .write_u64(gpa + file_table::SIZE, size)
            .and_then(|()| phys.write(gpa + file_table::STAT, crate::memory::io::as_bytes(stat)))
            .and_then(|()| phys.write_u64(offset_gpa(fd), offset.unwrap_or(0)))
            .and_then(|()| phys.write_u64(gpa + file_table::FLAGS, flags))
            .and_then(|()| phys.write_u64(gpa + file_table::VA, window_va(fd)));
        self.reads.remove(&fd);
        self.windows.insert(
            fd,
            Window {
                file: Arc::downgrade(file),
                len: size,
                offset_in_guest: offset.is_some(),
            },
        );
        self.pages += pages;
        if let Err(e) = written {
            tracing::error!("the file table could not be written: {e}");
            self.take_down(fd, mem);
        }
    }

    /// Takes down the windows of fds that no longer name the file they showed, and
    /// forgets the reads of files no longer open. Cheap when the fd table is unchanged.
    pub fn reconcile(&mut self, files: &FdTable, mem: &mut AddressSpace) {
        if files.generation() == self.generation {
            return;
        }
        self.generation = files.generation();
        let names =
            |fd: i32, weak: &Weak<OpenFile>| files.get(fd).is_ok_and(|entry| is(weak, &entry.file));
        self.reads.retain(|&fd, (weak, _)| names(fd, weak));
        let stale: Vec<i32> = self
            .windows
            .iter()
            .filter(|(&fd, window)| !names(fd, &window.file))
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            self.take_down(fd, mem);
        }
        // An offset in the guest needs the open file named by its fd alone.
        let shared: Vec<i32> = self
            .windows
            .iter()
            .filter(|(_, window)| window.offset_in_guest)
            .filter(|(_, window)| {
                files
                    .iter()
                    .filter(|(_, entry)| is(&window.file, &entry.file))
                    .count()
                    > 1
            })
            .map(|(&fd, _)| fd)
            .collect();
        for fd in shared {
            self.give_offset_back(fd, mem);
        }
    }

    /// The guest's copy of fd's offset, if it keeps one (`None` too for one the app made
    /// negative: there is nothing to move the host's to).
    fn guest_offset(&self, fd: i32, mem: &AddressSpace) -> Option<u64> {
        if !self.windows.get(&fd)?.offset_in_guest {
            return None;
        }
        let raw = mem.phys().read_u64(offset_gpa(fd)).ok()?;
        (raw as i64 >= 0).then_some(raw)
    }

    /// Puts fd's offset from the guest on the host fd.
    fn offset_to_host(&self, fd: i32, mem: &AddressSpace) {
        let (Some(offset), Some(file)) = (
            self.guest_offset(fd, mem),
            self.windows.get(&fd).and_then(|w| w.file.upgrade()),
        ) else {
            return;
        };
        if let Err(e) = rustix::fs::seek(file.host(), rustix::fs::SeekFrom::Start(offset)) {
            tracing::debug!(fd, "a file's offset could not be put on the host fd: {e}");
        }
    }

    /// Before call `nr` with `args`: if it uses the host offset of a file whose offset
    /// the guest keeps, puts the guest's there, and returns the fd to pass to
    /// [`Self::after_call`]. A call that may pass fds to another process (sendmsg) takes
    /// every offset out of the guest for good.
    pub fn before_call(&mut self, nr: u64, args: &[u64; 6], mem: &AddressSpace) -> Option<i32> {
        if !self.windows.values().any(|w| w.offset_in_guest) {
            return None;
        }
        if matches!(nr as i64, libc::SYS_sendmsg | libc::SYS_sendmmsg) {
            self.give_offsets_back(mem);
            return None;
        }
        let fd = offset_fd(nr, args)?;
        self.windows.get(&fd).filter(|w| w.offset_in_guest)?;
        self.offset_to_host(fd, mem);
        Some(fd)
    }

    /// After a call [`Self::before_call`] returned `fd` for: the guest's copy of the
    /// offset is the host's again.
    pub fn after_call(&self, fd: i32, mem: &AddressSpace) {
        let Some(window) = self.windows.get(&fd).filter(|w| w.offset_in_guest) else {
            return;
        };
        let Some(file) = window.file.upgrade() else {
            return;
        };
        match rustix::fs::seek(file.host(), rustix::fs::SeekFrom::Current(0)) {
            Ok(offset) => {
                if let Err(e) = mem.phys().write_u64(offset_gpa(fd), offset) {
                    tracing::error!("a file's offset could not be written: {e}");
                }
            }
            Err(e) => tracing::debug!(fd, "a file's offset could not be read: {e}"),
        }
    }

    /// Puts every offset the guest keeps on its host fd (before a snapshot reads them).
    pub fn offsets_to_host(&self, mem: &AddressSpace) {
        for (&fd, _) in self.windows.iter().filter(|(_, w)| w.offset_in_guest) {
            self.offset_to_host(fd, mem);
        }
    }

    /// Gives fd's offset back to the host for good: the doorbell no longer answers read
    /// and lseek on it (pread64 and fstat it still does).
    fn give_offset_back(&mut self, fd: i32, mem: &AddressSpace) {
        self.offset_to_host(fd, mem);
        if let Some(window) = self.windows.get_mut(&fd) {
            window.offset_in_guest = false;
        }
        if let Err(e) = mem.phys().write_u64(entry_gpa(fd) + file_table::FLAGS, 0) {
            tracing::error!("the file table could not be written: {e}");
        }
    }

    /// Gives every offset back to the host (before a fork, which shares the open files
    /// with the child, or a sendmsg, which may pass them on).
    pub fn give_offsets_back(&mut self, mem: &AddressSpace) {
        let fds: Vec<i32> = self
            .windows
            .iter()
            .filter(|(_, w)| w.offset_in_guest)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in fds {
            self.give_offset_back(fd, mem);
        }
    }

    /// Whether any file has a window.
    pub fn any(&self) -> bool {
        !self.windows.is_empty()
    }

    /// Takes every window down (their files may have changed on the host).
    pub fn take_down_all(&mut self, mem: &mut AddressSpace) {
        let fds: Vec<i32> = self.windows.keys().copied().collect();
        for fd in fds {
            self.take_down(fd, mem);
        }
    }

    /// Takes fd's window down, if it has one: the doorbell stops answering for it first.
    pub fn take_down(&mut self, fd: i32, mem: &mut AddressSpace) {
        if self.windows.get(&fd).is_some_and(|w| w.offset_in_guest) {
            self.give_offset_back(fd, mem);
        }
        let Some(window) = self.windows.remove(&fd) else {
            return;
        };
        if let Err(e) = mem.phys().write_u64(entry_gpa(fd) + file_table::VA, 0) {
            tracing::error!("the file table could not be written: {e}");
        }
        if let Err(errno) = mem.unmap_window(window_va(fd), window.len) {
            tracing::error!(fd, %errno, "a file window could not be taken down");
        }
        self.pages -= window.len.div_ceil(abi::PAGE_SIZE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdtable::FileKind;
    use crate::memory::paging::{PTE_FRAME, PTE_USER, PTE_WRITABLE};
    use crate::memory::phys::PhysicalMemory;
    use std::io::Write;

    fn space() -> AddressSpace {
        AddressSpace::new(PhysicalMemory::new(4 << 20).unwrap(), true).unwrap()
    }

    fn open(contents: &[u8]) -> (Arc<OpenFile>, rustix::fs::Stat) {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(contents).unwrap();
        let stat = rustix::fs::fstat(&file).unwrap();
        let kind = FileKind::Path {
            path: "/file".into(),
            flags: 0,
        };
        (OpenFile::new(file.into(), kind), stat)
    }

    /// Offers `fd` as many reads as a window takes.
    fn earn(
        windows: &mut FileWindows,
        mem: &mut AddressSpace,
        fd: i32,
        file: &Arc<OpenFile>,
        stat: &rustix::fs::Stat,
        offset: Option<u64>,
    ) {
        for _ in 0..READS_BEFORE_WINDOW {
            if windows.count_read(fd, file) {
                windows.open(mem, fd, file, stat, offset);
            }
        }
    }

    fn entry(mem: &AddressSpace, fd: i32, field: u64) -> u64 {
        mem.phys().read_u64(entry_gpa(fd) + field).unwrap()
    }

    #[test]
    fn a_file_read_twice_gets_a_read_only_window_onto_its_bytes() {
        let mut mem = space();
        let mut files = FdTable::default();
        let mut windows = FileWindows::new(true);
        let contents: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (file, stat) = open(&contents);
        let fd = files.insert(file.clone(), false).unwrap();
        for _ in 1..READS_BEFORE_WINDOW {
            assert!(!windows.count_read(fd, &file), "not enough reads yet");
        }
        assert!(windows.count_read(fd, &file));
        windows.open(&mut mem, fd, &file, &stat, None);
        assert_eq!(entry(&mem, fd, file_table::VA), window_va(fd));
        assert_eq!(entry(&mem, fd, file_table::FLAGS), 0);
        assert_eq!(entry(&mem, fd, file_table::SIZE), 10_000);
        let mut stat_bytes = vec![0u8; file_table::STAT_SIZE as usize];
        mem.phys()
            .read(entry_gpa(fd) + file_table::STAT, &mut stat_bytes)
            .unwrap();
        assert_eq!(stat_bytes, crate::memory::io::as_bytes(&stat));
        assert!(!windows.wants(fd));
        // Three pages, user-readable and not writable, holding the file.
        let mut shown = Vec::new();
        for page in 0..3 {
            let pte = mem.leaf(window_va(fd) + page * abi::PAGE_SIZE).unwrap();
            assert_eq!(pte & (PTE_USER | PTE_WRITABLE), PTE_USER);
            let mut bytes = vec![0u8; abi::PAGE_SIZE as usize];
            mem.phys().read(pte & PTE_FRAME, &mut bytes).unwrap();
            shown.extend(bytes);
        }
        assert_eq!(&shown[..10_000], contents.as_slice());
        assert!(shown[10_000..].iter().all(|&b| b == 0));
        assert_eq!(mem.leaf(window_va(fd) + 3 * abi::PAGE_SIZE).unwrap(), 0);
        // While the fd names the file, nothing changes.
        let other = files.insert(open(b"x").0, false).unwrap();
        windows.reconcile(&files, &mut mem);
        assert_eq!(entry(&mem, fd, file_table::VA), window_va(fd));
        files.remove(other).unwrap();
        // Once it names another file, the entry and the mapping are gone.
        files.insert_at(fd, open(b"y").0, false).unwrap();
        windows.reconcile(&files, &mut mem);
        assert_eq!(entry(&mem, fd, file_table::VA), 0);
        assert_eq!(mem.leaf(window_va(fd)).unwrap(), 0);
        assert_eq!(windows.pages, 0);
        assert!(windows.wants(fd));
    }

    #[test]
    fn windows_made_and_taken_down_over_and_over_reuse_their_frames() {
        let mut mem = space();
        let mut files = FdTable::default();
        let mut windows = FileWindows::new(true);
        let contents = vec![7u8; 20 * 4096];
        let in_use = mem.stats().frames_in_use;
        for round in 0..200 {
            let (file, stat) = open(&contents);
            let fd = files.insert(file.clone(), false).unwrap();
            earn(&mut windows, &mut mem, fd, &file, &stat, None);
            assert_eq!(
                entry(&mem, fd, file_table::VA),
                window_va(fd),
                "round {round}"
            );
            let pte = mem.leaf(window_va(fd) + 19 * abi::PAGE_SIZE).unwrap();
            let mut byte = [0u8];
            mem.phys().read(pte & PTE_FRAME, &mut byte).unwrap();
            assert_eq!(byte, [7]);
            files.remove(fd).unwrap();
            windows.reconcile(&files, &mut mem);
            mem.invalidated();
        }
        assert_eq!(mem.stats().frames_in_use, in_use);
    }

    #[test]
    fn an_offset_kept_in_the_guest_is_the_host_fds_around_calls_and_given_back_when_shared() {
        let mut mem = space();
        let mut files = FdTable::default();
        let mut windows = FileWindows::new(true);
        let (file, stat) = open(&[5u8; 10_000]);
        let fd = files.insert(file.clone(), false).unwrap();
        earn(&mut windows, &mut mem, fd, &file, &stat, Some(5));
        assert_eq!(
            entry(&mem, fd, file_table::FLAGS),
            file_table::OFFSET_IN_GUEST
        );
        assert_eq!(mem.phys().read_u64(offset_gpa(fd)).unwrap(), 5);
        let host = |file: &Arc<OpenFile>| {
            rustix::fs::seek(file.host(), rustix::fs::SeekFrom::Current(0)).unwrap()
        };
        // The doorbell read 95 bytes: the guest's offset is 100, the host's is behind.
        mem.phys().write_u64(offset_gpa(fd), 100).unwrap();
        assert_ne!(host(&file), 100);
        // A read the VMM performs starts from the guest's offset and moves it.
        let read = [fd as u64, 0, 10, 0, 0, 0];
        assert_eq!(
            windows.before_call(libc::SYS_read as u64, &read, &mem),
            Some(fd)
        );
        assert_eq!(host(&file), 100);
        rustix::fs::seek(file.host(), rustix::fs::SeekFrom::Current(10)).unwrap();
        windows.after_call(fd, &mem);
        assert_eq!(mem.phys().read_u64(offset_gpa(fd)).unwrap(), 110);
        // Calls that do not use the offset are left alone.
        let pread = [fd as u64, 0, 10, 0, 0, 0];
        assert_eq!(
            windows.before_call(libc::SYS_pread64 as u64, &pread, &mem),
            None
        );
        let sendfile_at = [9, fd as u64, 0x1000, 10, 0, 0];
        assert_eq!(
            windows.before_call(libc::SYS_sendfile as u64, &sendfile_at, &mem),
            None
        );
        // A snapshot reads the host's, which the guest's becomes first.
        mem.phys().write_u64(offset_gpa(fd), 120).unwrap();
        windows.offsets_to_host(&mem);
        assert_eq!(host(&file), 120);
        // A negative offset (the app wrote it) moves nothing.
        mem.phys().write_u64(offset_gpa(fd), u64::MAX).unwrap();
        windows.offsets_to_host(&mem);
        assert_eq!(host(&file), 120);
        mem.phys().write_u64(offset_gpa(fd), 130).unwrap();
        // A dup shares the open file: the offset goes back to the host for good; the
        // window stays for pread64 and fstat.
        files.insert(file.clone(), false).unwrap();
        windows.reconcile(&files, &mut mem);
        assert_eq!(host(&file), 130);
        assert_eq!(entry(&mem, fd, file_table::FLAGS), 0);
        assert_eq!(entry(&mem, fd, file_table::VA), window_va(fd));
        assert_eq!(
            windows.before_call(libc::SYS_read as u64, &read, &mem),
            None
        );
    }

    #[test]
    fn a_sendmsg_or_a_fork_takes_every_offset_out_of_the_guest() {
        let mut mem = space();
        let mut files = FdTable::default();
        let mut windows = FileWindows::new(true);
        for _ in 0..2 {
            let (file, stat) = open(&[1u8; 100]);
            let fd = files.insert(file.clone(), false).unwrap();
            earn(&mut windows, &mut mem, fd, &file, &stat, Some(0));
        }
        assert!(windows.windows.values().all(|w| w.offset_in_guest));
        windows.before_call(libc::SYS_sendmsg as u64, &[0; 6], &mem);
        assert!(windows.windows.values().all(|w| !w.offset_in_guest));
        assert_eq!(entry(&mem, 0, file_table::FLAGS), 0);
        assert_eq!(entry(&mem, 1, file_table::FLAGS), 0);
    }

    #[test]
    fn files_past_the_table_too_big_or_not_regular_get_no_window() {
        let mut mem = space();
        let mut windows = FileWindows::new(true);
        let (file, stat) = open(b"hello");
        assert!(!windows.wants(file_table::FDS as i32));
        assert!(!windows.wants(-1));
        let mut big = stat;
        big.st_size = file_table::WINDOW_SIZE as i64 + 1;
        let mut fifo = stat;
        fifo.st_mode = libc::S_IFIFO | 0o600;
        for (fd, stat) in [(3, big), (4, fifo)] {
            earn(&mut windows, &mut mem, fd, &file, &stat, None);
            assert_eq!(entry(&mem, fd, file_table::VA), 0);
            assert!(!windows.wants(fd), "never asked again");
        }
        assert!(!FileWindows::new(false).wants(3));
        // RAM's share: 4 MiB of RAM allows 32 pages of windows.
        let (large, large_stat) = open(&vec![1u8; 30 * 4096]);
        earn(&mut windows, &mut mem, 5, &large, &large_stat, None);
        assert_eq!(entry(&mem, 5, file_table::VA), window_va(5));
        let (more, more_stat) = open(&vec![2u8; 3 * 4096]);
        earn(&mut windows, &mut mem, 6, &more, &more_stat, None);
        assert_eq!(entry(&mem, 6, file_table::VA), 0, "over the share");
        assert_eq!(window_at(window_va(5) + 100), Some(5));
        assert_eq!(window_at(file_table::WINDOWS_VA - 1), None);
        assert_eq!(
            window_at(file_table::WINDOWS_VA + file_table::FDS * file_table::WINDOW_SIZE),
            None
        );
    }
}
