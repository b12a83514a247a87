//! Loading an ELF program (and its PT_INTERP) into the app's address space, and building the
//! initial stack with argv, envp and the auxiliary vector, as Linux's `execve` does.
//!
//! The ELF structures come from linux-loader; the mapping is ours. linux-loader's own
//! `Elf::load` copies a kernel image to guest-*physical* addresses, whereas an app's
//! segments are *virtual* mappings with their own protections, so each PT_LOAD becomes a
//! private file mapping through [`AddressSpace::map`], exactly like `mmap`.

use crate::memory::space::{STACK_SIZE, STACK_TOP};
use crate::memory::{AddressSpace, Backing, Placement, Prot, UserAddr, VmaRole};
use crate::sandbox::Sandbox;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, ET_DYN, ET_EXEC, PT_INTERP, PT_LOAD, PT_PHDR};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vm_memory::ByteValued;

/// Where a position-independent main program goes (Linux's ELF_ET_DYN_BASE).
const PIE_BASE: u64 = 0x5555_5555_4000;
const EM_X86_64: u16 = 62;
const PAGE: u64 = 4096;

/// Why the program could not be loaded. Reported before the app runs.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened inside the app's root.
    #[error("cannot open {path} inside the app's root: {errno}")]
    Open {
        /// Guest path.
        path: String,
        /// Why.
        errno: Errno,
    },
    /// Reading the file failed.
    #[error("reading {path}")]
    Read {
        /// Guest path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an x86-64 ELF executable.
    #[error("{path} is not an x86-64 Linux executable: {why}")]
    NotExecutable {
        /// Guest path.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Mapping a segment or the stack failed.
    #[error("mapping {what} of {path}: {errno}")]
    Map {
        /// What was being mapped.
        what: &'static str,
        /// Guest path.
        path: String,
        /// Why.
        errno: Errno,
    },
}

/// Where the app starts.
#[derive(Debug, Clone, Copy)]
pub struct StartState {
    /// First instruction (the interpreter's entry for a dynamic program).
    pub entry: u64,
    /// Initial stack pointer (pointing at argc).
    pub rsp: u64,
}

/// One ELF file mapped into the address space.
struct Mapped {
    bias: u64,
    entry: u64,
    phdr_addr: u64,
    phnum: u64,
    end: u64,
    interp: Option<String>,
}

fn read_exact_at(file: &File, path: &str, buf: &mut [u8], offset: u64) -> Result<(), LoadError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| LoadError::Read {
            path: path.to_string(),
            source,
        })
}

fn not_exec(path: &str, why: &'static str) -> LoadError {
    LoadError::NotExecutable {
        path: path.to_string(),
        why,
    }
}

fn segment_prot(flags: u32) -> Prot {
    let mut prot = Prot::NONE;
    if flags & 4 != 0 {
        prot = prot | Prot::READ;
    }
    if flags & 2 != 0 {
        prot = prot | Prot::WRITE;
    }
    if flags & 1 != 0 {
        prot = prot | Prot::EXEC;
    }
    prot
}

/// Opens the program file at guest `path` for reading.
fn open_program(sandbox: &Sandbox, path: &str) -> Result<File, LoadError> {
    let fd = sandbox
        .open(path, OFlags::RDONLY, Mode::empty())
        .map_err(|errno| LoadError::Open {
            path: path.to_string(),
            errno,
        })?;
    Ok(File::from(fd))
}

/// Maps the ELF file at guest `path`. `interp` files go wherever `mmap` would put them.
fn map_elf(
    space: &mut AddressSpace,
    sandbox: &Sandbox,
    path: &str,
    is_interp: bool,
) -> Result<Mapped, LoadError> {
    let file = Arc::new(open_program(sandbox, path)?);
    let mut header = [0u8; std::mem::size_of::<Elf64_Ehdr>()];
    read_exact_at(&file, path, &mut header, 0)?;
    let ehdr = *Elf64_Ehdr::from_slice(&header).ok_or_else(|| not_exec(path, "short header"))?;
    if &ehdr.e_ident[..4] != b"\x7fELF" {
        return Err(not_exec(path, "no ELF magic"));
    }
    if ehdr.e_ident[4] != 2 || ehdr.e_machine != EM_X86_64 {
        return Err(not_exec(path, "not a 64-bit x86-64 ELF"));
    }
    if ehdr.e_type != ET_EXEC && ehdr.e_type != ET_DYN {
        return Err(not_exec(path, "neither an executable nor a shared object"));
    }
    let phent = std::mem::size_of::<Elf64_Phdr>();
    if ehdr.e_phentsize as usize != phent || ehdr.e_phnum == 0 || ehdr.e_phnum > 128 {
        return Err(not_exec(path, "bad program headers"));
    }
    let mut table = vec![0u8; phent * ehdr.e_phnum as usize];
    read_exact_at(&file, path, &mut table, ehdr.e_phoff)?;
    let phdrs: Vec<Elf64_Phdr> = table
        .chunks_exact(phent)
        .filter_map(|c| Elf64_Phdr::from_slice(c).copied())
        .collect();

    let loads: Vec<&Elf64_Phdr> = phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
    let first = loads
        .first()
        .ok_or_else(|| not_exec(path, "no loadable segment"))?;
    let lo = first.p_vaddr & !(PAGE - 1);
    let hi = loads
        .iter()
        .map(|p| p.p_vaddr.saturating_add(p.p_memsz))
        .max()
        .unwrap_or(lo);
    if hi <= lo || hi - lo > 1 << 40 {
        return Err(not_exec(path, "segments span an impossible range"));
    }
    let map_err = |what: &'static str| {
        let path = path.to_string();
        move |errno| LoadError::Map { what, path, errno }
    };
    let bias = if ehdr.e_type == ET_EXEC {
        0
    } else {
        // Reserve the whole span, then map the segments over it, as ld.so does.
        let hint = if is_interp { 0 } else { PIE_BASE };
        let base = space
            .map(
                Placement::Hint(hint),
                hi - lo,
                Prot::NONE,
                Backing::Anonymous,
                VmaRole::Mapping,
            )
            .map_err(map_err("the address range"))?;
        base - lo
    };

    for seg in &loads {
        if seg.p_vaddr % PAGE != seg.p_offset % PAGE || seg.p_filesz > seg.p_memsz {
            return Err(not_exec(path, "misaligned segment"));
        }
        let prot = segment_prot(seg.p_flags);
        let start = (bias + seg.p_vaddr) & !(PAGE - 1);
        let file_end = bias + seg.p_vaddr + seg.p_filesz;
        let mem_end = bias + seg.p_vaddr + seg.p_memsz;
        let file_pages_end = file_end.next_multiple_of(PAGE);
        if seg.p_filesz > 0 {
            space
                .map(
                    Placement::Fixed(start),
                    file_pages_end - start,
                    prot,
                    Backing::File {
                        file: file.clone(),
                        offset: seg.p_offset & !(PAGE - 1),
                        path: path.into(),
                        immutable: sandbox.is_immutable(path),
                    },
                    VmaRole::Mapping,
                )
                .map_err(map_err("a segment"))?;
            // The bss starts inside the last file page: zero the rest of that page.
            if mem_end > file_end && file_end % PAGE != 0 {
                let zeros = vec![0u8; (PAGE - file_end % PAGE) as usize];
                space
                    .poke(UserAddr(file_end), &zeros)
                    .map_err(map_err("the bss"))?;
            }
        }
        let anon_start = if seg.p_filesz > 0 {
            file_pages_end
        } else {
            start
        };
        if mem_end > anon_start {
            space
                .map(
                    Placement::Fixed(anon_start),
                    mem_end - anon_start,
                    prot,
                    Backing::Anonymous,
                    VmaRole::Mapping,
                )
                .map_err(map_err("the bss"))?;
        }
    }

    let phdr_addr = match phdrs.iter().find(|p| p.p_type == PT_PHDR) {
        Some(p) => bias + p.p_vaddr,
        None => bias + first.p_vaddr + ehdr.e_phoff - first.p_offset,
    };
    let interp = match phdrs.iter().find(|p| p.p_type == PT_INTERP) {
        Some(p) if !is_interp => {
            if p.p_filesz == 0 || p.p_filesz > 4096 {
                return Err(not_exec(path, "bad PT_INTERP"));
            }
            let mut name = vec![0u8; p.p_filesz as usize];
            read_exact_at(&file, path, &mut name, p.p_offset)?;
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            Some(crate::sandbox::pathbytes::from_guest(name[..end].to_vec()))
        }
        _ => None,
    };
    Ok(Mapped {
        bias,
        entry: bias + ehdr.e_entry,
        phdr_addr,
        phnum: ehdr.e_phnum as u64,
        end: bias + hi,
        interp,
    })
}

/// Auxiliary-vector keys.
mod at {
    pub const NULL: u64 = 0;
    pub const PHDR: u64 = 3;
    pub const PHENT: u64 = 4;
    pub const PHNUM: u64 = 5;
    pub const PAGESZ: u64 = 6;
    pub const BASE: u64 = 7;
    pub const FLAGS: u64 = 8;
    pub const ENTRY: u64 = 9;
    pub const UID: u64 = 11;
    pub const EUID: u64 = 12;
    pub const GID: u64 = 13;
    pub const EGID: u64 = 14;
    pub const PLATFORM: u64 = 15;
    pub const HWCAP: u64 = 16;
    pub const CLKTCK: u64 = 17;
    pub const SECURE: u64 = 23;
    pub const RANDOM: u64 = 25;
    pub const HWCAP2: u64 = 26;
    pub const EXECFN: u64 = 31;
    pub const SYSINFO_EHDR: u64 = 33;
}

/// The initial stack image, built downwards from [`STACK_TOP`] in a host buffer and
/// copied into the app's stack in one go.
struct StackBuilder {
    bytes: Vec<u8>,
}

impl StackBuilder {
    /// Pushes bytes and returns their guest address.
    fn push_bytes(&mut self, data: &[u8]) -> u64 {
        let mut front = data.to_vec();
        front.extend_from_slice(&self.bytes);
        self.bytes = front;
        STACK_TOP - self.bytes.len() as u64
    }

    fn push_cstr(&mut self, s: &str) -> u64 {
        let mut data = crate::sandbox::pathbytes::to_host(s).into_owned();
        data.push(0);
        self.push_bytes(&data)
    }
}

/// What the stack should say about the program.
pub struct ExecInfo<'a> {
    /// argv.
    pub argv: &'a [String],
    /// envp, as K=V.
    pub envp: &'a [String],
    /// The program's guest path (AT_EXECFN).
    pub path: &'a str,
    /// CPUID.1:EDX (AT_HWCAP).
    pub hwcap: u64,
    /// The process's ids after the exec (AT_UID, AT_EUID, AT_GID, AT_EGID, and
    /// AT_SECURE when the effective ones are not the real ones).
    pub credentials: &'a crate::kernel::credentials::Credentials,
}

/// How many `#!` interpreters may lead to one another (Linux allows as many).
const MAX_SCRIPT_DEPTH: usize = 4;
/// How much of a script Linux reads for its `#!` line (BINPRM_BUF_SIZE).
const SHEBANG_MAX: usize = 256;

/// The `#!` line of the file at guest `path`, if it is a script: its interpreter and the
/// one optional argument, split as Linux's binfmt_script does (the interpreter ends at
/// the first blank; the rest of the line, trimmed, is one argument).
fn shebang(sandbox: &Sandbox, path: &str) -> Result<Option<(String, Option<String>)>, LoadError> {
    let file = open_program(sandbox, path)?;
    let mut head = [0u8; SHEBANG_MAX];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(LoadError::Read {
                    path: path.to_string(),
                    source,
                })
            }
        }
    }
    let Some(rest) = head[..got].strip_prefix(b"#!") else {
        return Ok(None);
    };
    let line = match rest.iter().position(|&b| b == b'\n') {
        Some(end) => &rest[..end],
        None => rest,
    };
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !blank(b)).unwrap_or(line.len());
    let line = &line[start..];
    let end = line.iter().position(blank).unwrap_or(line.len());
    let (interp, arg) = line.split_at(end);
    if interp.is_empty() {
        return Err(not_exec(path, "a #! line without an interpreter"));
    }
    let arg = arg.trim_ascii();
    let text = |b: &[u8]| crate::sandbox::pathbytes::from_guest(b.to_vec());
    Ok(Some((
        crate::sandbox::normalize("/", &text(interp)),
        (!arg.is_empty()).then(|| text(arg)),
    )))
}

/// The program that really runs for `path` and `argv`: a `#!` script becomes its
/// interpreter, with argv `[interpreter, argument?, script, argv[1..]...]` as on Linux.
fn resolve_scripts(
    sandbox: &Sandbox,
    path: &str,
    argv: &[String],
) -> Result<(String, Vec<String>), LoadError> {
    let mut path = path.to_string();
    let mut argv = argv.to_vec();
    for _ in 0..=MAX_SCRIPT_DEPTH {
        let Some((interp, arg)) = shebang(sandbox, &path)? else {
            return Ok((path, argv));
        };
        let mut next = vec![interp.clone()];
        next.extend(arg);
        next.push(std::mem::replace(&mut path, interp));
        next.extend(argv.into_iter().skip(1));
        argv = next;
    }
    Err(not_exec(&path, "too many levels of #! interpreters"))
}

/// Checks, before execve passes its point of no return, that the program at `path` (or
/// the interpreter of the script it is) can be executed: it exists, has an execute bit,
/// is a regular file and starts as an x86-64 ELF executable.
pub fn check(sandbox: &Sandbox, path: &str, argv: &[String]) -> Result<(), LoadError> {
    let (program, _) = resolve_scripts(sandbox, path, argv)?;
    let file = open_program(sandbox, &program)?;
    let meta = file.metadata().map_err(|source| LoadError::Read {
        path: program.clone(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(LoadError::Open {
            path: program,
            errno: Errno::ACCESS,
        });
    }
    let mut header = [0u8; std::mem::size_of::<Elf64_Ehdr>()];
    read_exact_at(&file, &program, &mut header, 0)?;
    let ehdr =
        *Elf64_Ehdr::from_slice(&header).ok_or_else(|| not_exec(&program, "short header"))?;
    if &ehdr.e_ident[..4] != b"\x7fELF" || ehdr.e_ident[4] != 2 || ehdr.e_machine != EM_X86_64 {
        return Err(not_exec(&program, "not a 64-bit x86-64 ELF"));
    }
    Ok(())
}

impl LoadError {
    /// The errno execve reports for this.
    pub fn errno(&self) -> Errno {
        match self {
            LoadError::Open { errno, .. } => *errno,
            LoadError::Read { source, .. } if source.raw_os_error() == Some(libc::EISDIR) => {
                Errno::ACCESS
            }
            LoadError::Read { .. } => Errno::IO,
            LoadError::NotExecutable { .. } => Errno::NOEXEC,
            LoadError::Map { errno, .. } => *errno,
        }
    }
}

/// Loads the program at `info.path` (through its `#!` interpreter if it is a script), its
/// ELF interpreter if it has one, and the stack.
pub fn load(
    space: &mut AddressSpace,
    sandbox: &Sandbox,
    info: &ExecInfo<'_>,
) -> Result<StartState, LoadError> {
    let (program, argv) = resolve_scripts(sandbox, info.path, info.argv)?;
    // The areas name the program by its own path, links resolved (/proc/self/exe, how
    // busybox runs its applets, is a link): as /proc/<pid>/maps shows it on Linux, and
    // what a restore opens again, in a process that has no /proc yet.
    let program = sandbox
        .open_resolved(
            &program,
            rustix::fs::OFlags::PATH,
            rustix::fs::Mode::empty(),
        )
        .map_or(program, |opened| opened.path);
    let exe = map_elf(space, sandbox, &program, false)?;
    space.set_brk_start(exe.end.next_multiple_of(PAGE));
    let (entry, interp_base) = match &exe.interp {
        Some(interp) => {
            let ld = map_elf(space, sandbox, interp, true)?;
            (ld.entry, ld.bias)
        }
        None => (exe.entry, 0),
    };
    let stack_err = |errno| LoadError::Map {
        what: "the stack",
        path: info.path.to_string(),
        errno,
    };
    space
        .map(
            Placement::FixedNoReplace(STACK_TOP - STACK_SIZE),
            STACK_SIZE,
            Prot::RW,
            Backing::Anonymous,
            VmaRole::Stack,
        )
        .map_err(stack_err)?;

    let mut stack = StackBuilder { bytes: Vec::new() };
    let execfn = stack.push_cstr(info.path);
    let platform = stack.push_cstr("x86_64");
    let mut random = [0u8; 16];
    let _ = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty());
    let random_addr = stack.push_bytes(&random);
    let env_addrs: Vec<u64> = info.envp.iter().map(|e| stack.push_cstr(e)).collect();
    let arg_addrs: Vec<u64> = argv.iter().map(|a| stack.push_cstr(a)).collect();

    let ids = info.credentials;
    // As Linux's commoncap: glibc then ignores LD_PRELOAD and the like.
    let secure = ids.uid.effective != ids.uid.real || ids.gid.effective != ids.gid.real;
    let auxv: [(u64, u64); 19] = [
        (at::SYSINFO_EHDR, picocenter_guest_shim::abi::VDSO_VA),
        (at::PHDR, exe.phdr_addr),
        (at::PHENT, std::mem::size_of::<Elf64_Phdr>() as u64),
        (at::PHNUM, exe.phnum),
        (at::PAGESZ, PAGE),
        (at::BASE, interp_base),
        (at::FLAGS, 0),
        (at::ENTRY, exe.entry),
        (at::UID, ids.uid.real as u64),
        (at::EUID, ids.uid.effective as u64),
        (at::GID, ids.gid.real as u64),
        (at::EGID, ids.gid.effective as u64),
        (at::PLATFORM, platform),
        (at::HWCAP, info.hwcap),
        (at::CLKTCK, 100),
        (at::SECURE, secure as u64),
        (at::RANDOM, random_addr),
        (at::HWCAP2, 0),
        (at::EXECFN, execfn),
    ];
    let mut words: Vec<u64> = vec![argv.len() as u64];
    words.extend(&arg_addrs);
    words.push(0);
    words.extend(&env_addrs);
    words.push(0);
    for (key, value) in auxv {
        words.extend([key, value]);
    }
    words.extend([at::NULL, 0]);
    // argc must land on a 16-byte boundary.
    let below = stack.bytes.len() as u64 + words.len() as u64 * 8;
    let pad = (STACK_TOP - below) % 16;
    stack.push_bytes(&vec![0u8; pad as usize]);
    let table: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let rsp = stack.push_bytes(&table);
    if stack.bytes.len() as u64 > STACK_SIZE / 4 {
        return Err(stack_err(Errno::TOOBIG));
    }
    space.poke(UserAddr(rsp), &stack.bytes).map_err(stack_err)?;
    Ok(StartState { entry, rsp })
}
