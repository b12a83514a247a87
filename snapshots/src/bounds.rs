//! Bounds on every field of a manifest, checked after its MAC and before anything is built
//! from it: a key holder's bug, or a key that leaked, must still not make a restore exhaust
//! memory, overflow arithmetic, or reach outside the app. What depends on the restoring
//! caller (its memory limit, its name, its writable directories) is checked by the restore
//! itself (`vmm::persist::trust`).

use crate::format::{
    AppRecord, BackingRecord, FdRecord, FileRecord, Manifest, PageRun, PageSource, VmaRecord,
    VpnRange, MAX_ANCESTORS, PAGE_SIZE,
};
use crate::names::{is_plain, validate_app_name, validate_guest_dir, validate_image_name};
use std::collections::{HashMap, HashSet};

/// One past the last byte of user space (the same bound the VMM maps below).
pub const USER_END: u64 = 0x7fff_ffff_f000;
/// One past the last page number of user space.
pub const USER_PAGES: u64 = USER_END / PAGE_SIZE;
/// The most guest RAM an app may have, MiB (the VMM's RAM window is 16 GiB).
pub const MAX_MEMORY_MIB: u64 = 16 << 10;
/// The most pages any snapshot can hold: all of the largest guest RAM.
pub const MAX_PAGES: u64 = (MAX_MEMORY_MIB << 20) / PAGE_SIZE;
/// The largest chunk of a page file (4 MiB): a verifier holds one in memory.
pub const MAX_CHUNK_PAGES: u64 = 1024;
/// The most memory areas (Linux's default `vm.max_map_count`).
pub const MAX_VMAS: usize = 65_530;
/// Descriptor numbers are below this.
pub const MAX_FD: i32 = 1 << 16;
/// The most bytes a pipe record may carry (capture takes at most 1 MiB).
pub const MAX_PIPE_DATA: usize = 1 << 20;
/// Linux's limit on a memfd's name (249 bytes, without the NUL).
pub const MEMFD_NAME_MAX: usize = 249;
/// Bytes of one memfd a snapshot keeps (a larger one fails the capture).
pub const MAX_MEMFD_DATA: usize = 16 << 20;
/// The most socket options one socket record may set, and the largest value.
pub const MAX_SOCKET_OPTIONS: usize = 512;
/// The largest socket option value.
pub const MAX_OPTION_BYTES: usize = 256;
/// The longest AF_UNIX address (family and `sun_path`).
pub const MAX_UNIX_NAME: usize = 2 + 108;
/// The longest guest path in a record.
pub const MAX_PATH: usize = 4096;
/// The most signal actions (signals 1 to 64).
pub const MAX_SIGNALS: usize = 64;
/// The most CPUID leaves recorded.
pub const MAX_CPU_LEAVES: usize = 64;
/// The most writable directories.
pub const MAX_WRITABLE: usize = 64;
/// Clock values stay below this (about 146 years of ns), so that offsets fit an i64.
pub const MAX_CLOCK_NS: u64 = 1 << 62;
/// The most supplementary groups a process has (Linux's NGROUPS_MAX).
pub const NGROUPS_MAX: usize = 65_536;
/// Socket families a record may name: the only ones an app can make.
pub const SOCKET_FAMILIES: [i32; 3] = [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX];
/// Socket types a record may name.
pub const SOCKET_TYPES: [i32; 3] = [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET];

type Checked = Result<(), String>;

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Checked {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

/// The ancestors list: at most [`MAX_ANCESTORS`] plain ids, none repeated nor this
/// snapshot's, starting with the parent (and empty without one).
fn check_ancestors(m: &Manifest) -> Checked {
    ensure(m.ancestors.len() <= MAX_ANCESTORS, || {
        format!("{} ancestors (at most {MAX_ANCESTORS})", m.ancestors.len())
    })?;
    ensure(m.ancestors.first() == m.parent.as_ref(), || {
        "the ancestors do not start with the parent".into()
    })?;
    let mut seen = HashSet::new();
    for ancestor in &m.ancestors {
        ensure(
            is_plain(ancestor, 128) && *ancestor != m.id && seen.insert(ancestor.as_str()),
            || format!("bad ancestor id {ancestor:?}"),
        )?;
    }
    Ok(())
}

/// Checks every field of `m`; the error says which and why.
pub fn check(m: &Manifest) -> Checked {
    ensure(is_plain(&m.id, 128), || {
        format!("bad snapshot id {:?}", m.id)
    })?;
    if let Some(parent) = &m.parent {
        ensure(is_plain(parent, 128) && *parent != m.id, || {
            format!("bad parent id {parent:?}")
        })?;
    }
    check_ancestors(m)?;
    if let Some(prefetched) = &m.prefetched {
        ensure(m.parent.as_ref() == Some(&prefetched.from), || {
            "a prefetch record of a snapshot that is not the parent".into()
        })?;
    }
    check_app(&m.app)?;
    ensure(m.cpu.leaves.len() <= MAX_CPU_LEAVES, || {
        "too many CPUID leaves".into()
    })?;
    ensure(m.context.xsave.len() == 4096, || {
        "FPU state is not 4096 bytes".into()
    })?;
    check_vmas(&m.vmas)?;
    check_page_file(m)?;
    check_runs(m)?;
    check_ranges("the ActiveSet", &m.activeset)?;
    let mut last_port = None;
    for set in &m.port_sets {
        ensure(last_port < Some(set.port), || {
            format!("port sets out of order at port {}", set.port)
        })?;
        last_port = Some(set.port);
        check_ranges("a port's ActiveSet", &set.pages)?;
    }
    check_files(&m.files)?;
    ensure(m.signals.actions.len() <= MAX_SIGNALS, || {
        "more than 64 signal actions".into()
    })?;
    check_process(m)?;
    check_threads(m)?;
    check_shared_memory(m)?;
    check_tree(m)
}

/// Most bytes of shared anonymous memory a snapshot keeps.
pub const MAX_SHARED_MEMORY: usize = 32 << 20;

/// Shared anonymous memory: within bounds, each key once, and every area's key one of
/// them.
fn check_shared_memory(m: &Manifest) -> Checked {
    let total: usize = m.shared_memory.iter().map(|r| r.data.len()).sum();
    ensure(total <= MAX_SHARED_MEMORY, || {
        format!("{total} bytes of shared memory (at most {MAX_SHARED_MEMORY})")
    })?;
    let mut keys: Vec<u64> = m.shared_memory.iter().map(|r| r.key).collect();
    keys.sort_unstable();
    ensure(
        keys.windows(2).all(|w| w[0] != w[1]) && !keys.contains(&0),
        || "shared memory keys repeated or 0".into(),
    )?;
    for vma in &m.vmas {
        if let BackingRecord::Shared { memory, .. } = vma.backing {
            ensure(memory == 0 || keys.binary_search(&memory).is_ok(), || {
                format!(
                    "memory area {:#x} maps shared memory the snapshot lacks",
                    vma.start
                )
            })?;
        }
    }
    Ok(())
}

/// Most processes a tree snapshot holds (the VMM's own limit on an app's processes).
pub const MAX_PROCESSES: usize = 64;

/// The highest pid an app hands out (Linux's default pid_max).
pub const PID_MAX: i32 = 4_194_304;

/// The other processes of a tree: each checked as a manifest of its own, with pids that
/// are unique and parents that come before their children.
fn check_tree(m: &Manifest) -> Checked {
    let Some(tree) = &m.tree else {
        return Ok(());
    };
    ensure(tree.others.len() < MAX_PROCESSES, || {
        format!("{} processes", tree.others.len() + 1)
    })?;
    ensure(
        tree.pid > 0 && tree.pid < tree.next_pid && tree.next_pid <= PID_MAX,
        || {
            format!(
                "first process pid {} or next pid {}",
                tree.pid, tree.next_pid
            )
        },
    )?;
    ensure(tree.pgid > 0 && tree.sid > 0, || {
        "the first process's group or session".into()
    })?;
    let mut pids = vec![tree.pid];
    for part in &tree.others {
        ensure(part.pid > 0 && part.pid < tree.next_pid, || {
            format!("process pid {} outside the app's pids", part.pid)
        })?;
        ensure(!pids.contains(&part.pid), || {
            format!("two processes with pid {}", part.pid)
        })?;
        ensure(part.shared_memory.is_empty(), || {
            format!("process {}: shared memory outside the manifest's", part.pid)
        })?;
        ensure(pids.contains(&part.ppid), || {
            format!("process {} before its parent {}", part.pid, part.ppid)
        })?;
        ensure(part.pgid > 0 && part.sid > 0, || {
            format!("process {}: bad group or session", part.pid)
        })?;
        let args: usize = part.cmdline.iter().map(|a| a.len().saturating_add(1)).sum();
        ensure(args <= MAX_CMDLINE, || {
            format!(
                "process {}: a command line over {MAX_CMDLINE} bytes",
                part.pid
            )
        })?;
        check_path(&part.exe, false)
            .and_then(|()| check_path(&part.run_as, false))
            .map_err(|why| format!("process {}: {why}", part.pid))?;
        let view = m.part_view(part);
        check(&view).map_err(|why| format!("process {}: {why}", part.pid))?;
        pids.push(part.pid);
    }
    Ok(())
}

/// The longest command line a process part keeps (Linux's ARG_MAX is 2 MiB).
const MAX_CMDLINE: usize = 2 << 20;

/// Most threads a snapshot may hold (as the VMM's limit).
pub const MAX_THREADS: usize = 4096;

fn check_threads(m: &Manifest) -> Checked {
    ensure(m.threads.len() < MAX_THREADS, || {
        format!("{} threads", m.threads.len())
    })?;
    let mut tids: Vec<i32> = m.threads.iter().map(|t| t.tid).collect();
    tids.push(m.process.tid);
    tids.sort_unstable();
    ensure(tids.windows(2).all(|w| w[0] != w[1]), || {
        "two threads with one tid".into()
    })?;
    ensure(
        m.threads.iter().all(|t| t.tid > 0) && m.process.tid >= 0,
        || "a tid below 1".into(),
    )?;
    for t in &m.threads {
        let c = &t.context;
        ensure(c.xsave.len() == 4096, || {
            format!("thread {}: FPU state is not 4096 bytes", t.tid)
        })?;
        ensure(
            [c.rip, c.fs_base, c.gs_base].iter().all(|&v| v < USER_END),
            || format!("thread {}: RIP, FS or GS base outside user space", t.tid),
        )?;
    }
    Ok(())
}

fn check_app(app: &AppRecord) -> Checked {
    validate_app_name(&app.name).map_err(|e| e.to_string())?;
    if let Some(image) = &app.image {
        validate_image_name(image).map_err(|e| e.to_string())?;
    }
    ensure(app.writable.len() <= MAX_WRITABLE, || {
        "too many writable directories".into()
    })?;
    let mut seen = HashSet::new();
    for dir in &app.writable {
        let plain = validate_guest_dir(dir).map_err(|e| e.to_string())?;
        ensure(plain == *dir && seen.insert(plain), || {
            format!("writable directory {dir:?} is not in its plain spelling, or repeated")
        })?;
    }
    ensure(
        app.memory_mib > 0 && app.memory_mib <= MAX_MEMORY_MIB && app.memory_mib.is_multiple_of(2),
        || format!("{} MiB of memory", app.memory_mib),
    )?;
    if let Some(address) = &app.address {
        ensure(address.parse::<std::net::IpAddr>().is_ok(), || {
            format!("bad address {address:?}")
        })?;
    }
    for text in [&app.root, &app.program]
        .into_iter()
        .chain(app.root_from.as_ref())
    {
        check_path(text, false)?;
    }
    Ok(())
}

/// A path of at most [`MAX_PATH`] bytes without NUL; absolute if `absolute`. (Guest paths
/// of files and areas are opened again through the sandbox, which confines them whatever
/// they say.)
fn check_path(path: &str, absolute: bool) -> Checked {
    ensure(
        path.len() <= MAX_PATH && !path.contains('\0') && (!absolute || path.starts_with('/')),
        || format!("bad path {:?}", path.chars().take(64).collect::<String>()),
    )
}

fn check_vmas(vmas: &[VmaRecord]) -> Checked {
    ensure(vmas.len() <= MAX_VMAS, || "too many memory areas".into())?;
    let mut last_end = 0;
    for vma in vmas {
        ensure(
            vma.start >= last_end
                && vma.start < vma.end
                && vma.end <= USER_END
                && vma.start % PAGE_SIZE == 0
                && vma.end % PAGE_SIZE == 0,
            || {
                format!(
                    "memory area {:#x}..{:#x} is out of order, unaligned or outside user space",
                    vma.start, vma.end
                )
            },
        )?;
        last_end = vma.end;
        if let BackingRecord::File { path, offset, .. }
        | BackingRecord::Shared { path, offset, .. } = &vma.backing
        {
            check_path(path, false)?;
            ensure(
                *offset <= i64::MAX as u64 && offset % PAGE_SIZE == 0,
                || format!("bad file offset {offset:#x}"),
            )?;
        }
    }
    Ok(())
}

fn check_page_file(m: &Manifest) -> Checked {
    ensure(m.page_count <= MAX_PAGES, || {
        format!("{} pages in the page file", m.page_count)
    })?;
    let chunk_ok = if m.page_count == 0 {
        m.chunk_pages <= MAX_CHUNK_PAGES
    } else {
        (1..=MAX_CHUNK_PAGES).contains(&m.chunk_pages)
    };
    ensure(chunk_ok, || {
        format!("chunks of {} pages (1 to {MAX_CHUNK_PAGES})", m.chunk_pages)
    })?;
    let chunks = m.page_count.div_ceil(m.chunk_pages.max(1));
    ensure(m.chunk_digests.len() as u64 == chunks, || {
        format!(
            "{} chunk digests for {chunks} chunks",
            m.chunk_digests.len()
        )
    })?;
    ensure(m.activeset_prefix <= m.page_count, || {
        "ActiveSet prefix longer than the page file".into()
    })
}

/// Runs: sorted, disjoint, non-empty, inside the areas, stored ones inside the page file,
/// and no more pages than the largest RAM.
fn check_runs(m: &Manifest) -> Checked {
    let mut last_end = 0u64;
    let mut total = 0u64;
    let mut areas = m.vmas.iter().peekable();
    for run in &m.pages {
        let end = run
            .vpn
            .checked_add(run.count)
            .filter(|&end| run.count > 0 && run.vpn >= last_end && end <= USER_PAGES)
            .ok_or_else(|| format!("page run at {:#x} out of order", run.vpn))?;
        last_end = end;
        total = total.saturating_add(run.count);
        ensure(total <= MAX_PAGES, || "more pages than any app has".into())?;
        if let PageSource::Stored { index } = run.source {
            ensure(
                index
                    .checked_add(run.count)
                    .is_some_and(|e| e <= m.page_count),
                || format!("page run at {:#x} beyond the page file", run.vpn),
            )?;
        }
        ensure(
            run.source != PageSource::Parent || m.parent.is_some(),
            || "pages from a parent, but no parent".into(),
        )?;
        ensure(in_areas(&mut areas, run), || {
            format!("page run at {:#x} outside the memory areas", run.vpn)
        })?;
    }
    Ok(())
}

/// Whether every page of `run` is in one of the areas (sorted, as `run`s are), advancing
/// `areas` past those that end before it.
fn in_areas<'a>(
    areas: &mut std::iter::Peekable<impl Iterator<Item = &'a VmaRecord>>,
    run: &PageRun,
) -> bool {
    let mut at = run.vpn * PAGE_SIZE;
    let end = (run.vpn + run.count) * PAGE_SIZE;
    while at < end {
        while areas.peek().is_some_and(|v| v.end <= at) {
            areas.next();
        }
        match areas.peek() {
            Some(v) if v.start <= at => at = v.end,
            _ => return false,
        }
    }
    true
}

fn check_ranges(what: &str, ranges: &[VpnRange]) -> Checked {
    let mut last_end = 0u64;
    for range in ranges {
        last_end = range
            .vpn
            .checked_add(range.count)
            .filter(|&end| range.count > 0 && range.vpn >= last_end && end <= USER_PAGES)
            .ok_or_else(|| format!("{what} is out of order at {:#x}", range.vpn))?;
    }
    Ok(())
}

fn check_files(files: &[FdRecord]) -> Checked {
    let mut last_fd = -1;
    let mut shared: HashMap<u64, &FileRecord> = HashMap::new();
    for record in files {
        ensure(record.fd > last_fd && record.fd < MAX_FD, || {
            format!("fd {} out of order or over {MAX_FD}", record.fd)
        })?;
        last_fd = record.fd;
        // Descriptors of one description are made once, from the first record.
        let first = *shared.entry(record.shared).or_insert(&record.file);
        ensure(*first == record.file, || {
            format!("fd {} shares a description it does not match", record.fd)
        })?;
        let own_peer = matches!(record.file, FileRecord::Socket { peer, .. } if peer != 0 && peer == record.object);
        ensure(!own_peer, || {
            format!("fd {}: a connection to itself", record.fd)
        })?;
        check_file(&record.file, record.fd)?;
    }
    Ok(())
}

fn check_file(file: &FileRecord, fd: i32) -> Checked {
    let bad = |why: &str| Err(format!("fd {fd}: {why}"));
    match file {
        FileRecord::Path { path, offset, .. } => {
            check_path(path, false)?;
            if *offset > i64::MAX as u64 {
                return bad("offset out of range");
            }
        }
        FileRecord::Directory { path } => check_path(path, false)?,
        FileRecord::Stdio(n) if *n > 2 => return bad("stdio other than 0, 1, 2"),
        FileRecord::Pipe {
            data, write_end, ..
        } if data.len() > MAX_PIPE_DATA || (*write_end && !data.is_empty()) => {
            return bad("pipe data too large, or on the write end")
        }
        FileRecord::Socket { .. } => return check_socket(file).or_else(|why| bad(&why)),
        FileRecord::Epoll { registrations }
            if registrations.len() > MAX_FD as usize
                || registrations.iter().any(|r| !(0..MAX_FD).contains(&r.0)) =>
        {
            return bad("epoll registrations out of range")
        }
        FileRecord::EventFd { counter, .. } if *counter == u64::MAX => {
            return bad("eventfd counter out of range")
        }
        FileRecord::Memfd {
            name, data, offset, ..
        } if name.len() > MEMFD_NAME_MAX
            || data.len() > MAX_MEMFD_DATA
            || *offset > i64::MAX as u64 =>
        {
            return bad("memfd name, size or offset out of range")
        }
        _ => {}
    }
    Ok(())
}

/// A socket the app could have made: AF_INET, AF_INET6 or AF_UNIX; stream, datagram or
/// seqpacket; an address of its family; a bounded set of small options.
pub fn check_socket(file: &FileRecord) -> Checked {
    let FileRecord::Socket {
        domain,
        kind,
        bound,
        unix_name,
        connected_to,
        listening,
        options,
        peer,
        queued,
        ..
    } = file
    else {
        return Ok(());
    };
    ensure(
        queued.len() <= MAX_PIPE_DATA
            && (*peer == 0 || (*domain == libc::AF_UNIX && listening.is_none()))
            && (*peer != 0 || queued.is_empty())
            && (*kind == libc::SOCK_STREAM || queued.is_empty()),
        || "bad connection between the app's sockets".into(),
    )?;
    ensure(SOCKET_FAMILIES.contains(domain), || {
        format!("socket family {domain} (only AF_INET, AF_INET6 and AF_UNIX)")
    })?;
    ensure(SOCKET_TYPES.contains(kind), || {
        format!("socket type {kind}")
    })?;
    if let Some(bound) = bound {
        let address: std::net::SocketAddr = bound
            .parse()
            .map_err(|_| format!("bad socket address {bound:?}"))?;
        ensure(
            (*domain == libc::AF_INET && address.is_ipv4()) || *domain == libc::AF_INET6,
            || format!("socket address {bound} of another family"),
        )?;
    }
    for name in unix_name.iter().chain(connected_to) {
        ensure(
            *domain == libc::AF_UNIX && name.len() <= MAX_UNIX_NAME,
            || "bad AF_UNIX name".into(),
        )?;
    }
    ensure(connected_to.is_none() || *kind == libc::SOCK_DGRAM, || {
        "a connected name on a socket other than a datagram one".into()
    })?;
    ensure(listening.is_none_or(|b| (0..=65_535).contains(&b)), || {
        "bad listen backlog".into()
    })?;
    ensure(
        options.len() <= MAX_SOCKET_OPTIONS
            && options.iter().all(|o| o.2.len() <= MAX_OPTION_BYTES),
        || "too many or too large socket options".into(),
    )
}

fn check_process(m: &Manifest) -> Checked {
    let p = &m.process;
    check_path(&p.cwd, true)?;
    ensure(p.umask <= 0o777, || format!("umask {:#o}", p.umask))?;
    let ids = &p.credentials;
    ensure(
        ids.groups.len() <= NGROUPS_MAX
            && ids
                .uids
                .iter()
                .chain(&ids.gids)
                .chain(&ids.groups)
                .all(|&id| id != u32::MAX),
        || "user or group ids".into(),
    )?;
    ensure(p.brk_start <= p.brk && p.brk <= USER_END, || {
        "the break is outside user space".into()
    })?;
    ensure(
        m.clock.monotonic_ns < MAX_CLOCK_NS && m.clock.realtime_ns < MAX_CLOCK_NS,
        || "clocks out of range".into(),
    )?;
    ensure(
        [m.context.fs_base, m.context.gs_base]
            .iter()
            .all(|&base| base < USER_END),
        || "FS or GS base outside user space".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BackingRecord, UserContext};

    fn valid() -> Manifest {
        Manifest {
            id: "s1".into(),
            app: AppRecord {
                name: "app".into(),
                memory_mib: 16,
                writable: vec!["/tmp".into()],
                ..Default::default()
            },
            vmas: vec![VmaRecord {
                start: 0x40_0000,
                end: 0x50_0000,
                prot: 3,
                role: 0,
                backing: BackingRecord::Anonymous,
            }],
            pages: vec![PageRun {
                vpn: 0x400,
                count: 2,
                source: PageSource::Stored { index: 0 },
            }],
            page_count: 2,
            chunk_pages: 64,
            chunk_digests: vec![[0; 32]],
            context: UserContext {
                xsave: vec![0; 4096],
                ..Default::default()
            },
            process: crate::format::ProcessRecord {
                cwd: "/".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn refused(change: impl FnOnce(&mut Manifest), expect: &str) {
        let mut m = valid();
        change(&mut m);
        let why = check(&m).unwrap_err();
        assert!(why.contains(expect), "{why:?} lacks {expect:?}");
    }

    fn socket(domain: i32) -> FdRecord {
        FdRecord {
            fd: 3,
            cloexec: false,
            nonblocking: false,
            shared: 0,
            object: 0,
            file: FileRecord::Socket {
                domain,
                kind: libc::SOCK_STREAM,
                bound: None,
                unix_name: None,
                connected_to: None,
                listening: None,
                options: vec![],
                closed: false,
                peer: 0,
                queued: Vec::new(),
            },
        }
    }

    #[test]
    fn the_ancestors_are_the_chain_behind_the_parent() {
        fn with(parent: Option<&str>, ancestors: &[&str]) -> impl FnOnce(&mut Manifest) {
            let parent = parent.map(str::to_string);
            let ancestors: Vec<String> = ancestors.iter().map(|a| a.to_string()).collect();
            move |m: &mut Manifest| {
                m.parent = parent;
                m.ancestors = ancestors;
            }
        }
        let mut m = valid();
        with(Some("p"), &["p", "g"])(&mut m);
        check(&m).unwrap();
        refused(with(None, &["p"]), "parent");
        refused(with(Some("p"), &["g", "p"]), "parent");
        refused(with(Some("p"), &[]), "parent");
        refused(with(Some("p"), &["p", "p"]), "ancestor");
        refused(with(Some("p"), &["p", "s1"]), "ancestor");
        refused(with(Some("p"), &["p", "../x"]), "ancestor");
        refused(
            |m| {
                m.prefetched = Some(crate::format::PrefetchRecord {
                    from: "elsewhere".into(),
                    ..Default::default()
                })
            },
            "prefetch",
        );
        let long: Vec<String> = (0..=MAX_ANCESTORS).map(|i| format!("a{i}")).collect();
        refused(
            |m| {
                m.parent = Some("a0".into());
                m.ancestors = long;
            },
            "ancestors",
        );
    }

    #[test]
    fn threads_are_bounded() {
        let thread = |tid| crate::format::ThreadRecord {
            tid,
            context: UserContext {
                xsave: vec![0; 4096],
                ..Default::default()
            },
            ..Default::default()
        };
        let mut m = valid();
        m.process.tid = 2;
        m.threads = vec![thread(3), thread(4)];
        check(&m).unwrap();
        refused(
            |m| {
                m.process.tid = 2;
                m.threads = vec![thread(2)];
            },
            "one tid",
        );
        refused(
            |m| {
                m.process.tid = 2;
                m.threads = vec![thread(0)];
            },
            "below 1",
        );
        refused(
            |m| {
                let mut t = thread(3);
                t.context.xsave.truncate(100);
                m.threads = vec![t];
            },
            "FPU",
        );
        refused(
            |m| {
                let mut t = thread(3);
                t.context.rip = USER_END;
                m.threads = vec![t];
            },
            "outside user space",
        );
        refused(
            |m| m.threads = (1..=MAX_THREADS as i32).map(thread).collect(),
            "threads",
        );
    }

    #[test]
    fn every_field_class_is_bounded() {
        check(&valid()).unwrap();
        refused(|m| m.app.writable = vec!["/tmp/../..".into()], "writable");
        refused(|m| m.app.name = "../x".into(), "app name");
        refused(|m| m.app.image = Some("../../etc".into()), "image name");
        refused(|m| m.app.memory_mib = 1 << 40, "MiB");
        refused(|m| m.pages[0].count = 1 << 36, "out of order");
        refused(|m| m.pages[0].vpn = u64::MAX, "out of order");
        refused(|m| m.chunk_pages = 1 << 62, "chunks of");
        refused(|m| m.page_count = 1 << 36, "pages in the page file");
        refused(|m| m.vmas[0].end = 1 << 48, "outside user space");
        refused(|m| m.pages[0].vpn = 0x300, "outside the memory areas");
        refused(
            |m| m.files = vec![socket(libc::AF_NETLINK)],
            "socket family 16",
        );
        refused(
            |m| m.files = vec![socket(libc::AF_PACKET)],
            "socket family 17",
        );
        refused(
            |m| {
                let mut s = socket(libc::AF_INET);
                s.fd = 1 << 20;
                m.files = vec![s];
            },
            "over",
        );
        refused(
            |m| {
                m.activeset = vec![VpnRange {
                    vpn: u64::MAX,
                    count: 2,
                }]
            },
            "ActiveSet",
        );
        refused(|m| m.clock.monotonic_ns = u64::MAX, "clocks");
        refused(|m| m.process.brk = u64::MAX, "break");
        refused(
            |m| m.process.credentials.uids[1] = u32::MAX,
            "user or group ids",
        );
        refused(
            |m| m.process.credentials.groups = vec![1; NGROUPS_MAX + 1],
            "user or group ids",
        );
        let connected = |domain, peer, queued: &[u8]| {
            let mut record = socket(domain);
            if let FileRecord::Socket {
                peer: p, queued: q, ..
            } = &mut record.file
            {
                *p = peer;
                *q = queued.to_vec();
            }
            move |m: &mut Manifest| m.files = vec![record]
        };
        refused(connected(libc::AF_INET, 7, b""), "connection");
        refused(connected(libc::AF_UNIX, 0, b"x"), "connection");
        refused(
            connected(libc::AF_UNIX, 7, &vec![0; MAX_PIPE_DATA + 1]),
            "connection",
        );
        let mut m = valid();
        connected(libc::AF_UNIX, 7, b"queued")(&mut m);
        check(&m).unwrap();
        // Only a datagram socket keeps where it connected.
        let mut stream = valid();
        stream.files = vec![socket(libc::AF_UNIX)];
        if let FileRecord::Socket { connected_to, .. } = &mut stream.files[0].file {
            *connected_to = Some(b"\x01\x00/dev/log".to_vec());
        }
        assert!(check(&stream).unwrap_err().contains("datagram"));
        // Datagrams are not kept as bytes; no socket is its own peer.
        if let FileRecord::Socket { kind, .. } = &mut m.files[0].file {
            *kind = libc::SOCK_DGRAM;
        }
        assert!(check(&m).unwrap_err().contains("connection"));
        let mut m = valid();
        connected(libc::AF_UNIX, 7, b"")(&mut m);
        m.files[0].object = 7;
        assert!(check(&m).unwrap_err().contains("itself"));
        let mut m = valid();
        m.files = vec![socket(libc::AF_UNIX), socket(libc::AF_INET6)];
        m.files[1].fd = 4;
        m.files[1].shared = 1;
        check(&m).unwrap();
    }
}
