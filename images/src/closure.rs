//! The shared-library closure of an ELF program: its interpreter and every DT_NEEDED
//! library, found the way ld.so finds them (RPATH, RUNPATH, the system directories and
//! their glibc-hwcaps subdirectories).

use goblin::elf::Elf;
use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Why a closure could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a valid ELF object.
    #[error("{path} is not an ELF file: {reason}")]
    NotElf {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// A needed library was found nowhere.
    #[error("{needed}, needed by {by}, is not in any library directory")]
    Missing {
        /// The library name.
        needed: String,
        /// Who needs it.
        by: PathBuf,
    },
}

/// The directories ld.so searches after RPATH/RUNPATH on Debian x86-64.
const SYSTEM_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// What one ELF file says it needs.
struct Needs {
    interpreter: Option<String>,
    libraries: Vec<String>,
    search: Vec<PathBuf>,
}

/// The interpreter a `#!` script names (the first word of its first line), if `bytes` are
/// a script's.
fn script_interpreter(bytes: &[u8]) -> Option<String> {
    let line = bytes.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let interp = line
        .split(|&b| b == b' ' || b == b'\t')
        .find(|word| !word.is_empty())?;
    Some(String::from_utf8_lossy(interp).into_owned())
}

fn read_needs(path: &Path) -> Result<Needs, ClosureError> {
    let bytes = std::fs::read(path).map_err(|source| ClosureError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(interpreter) = script_interpreter(&bytes) {
        return Ok(Needs {
            interpreter: Some(interpreter),
            libraries: Vec::new(),
            search: Vec::new(),
        });
    }
    let elf = Elf::parse(&bytes).map_err(|e| ClosureError::NotElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let origin = path.parent().unwrap_or(Path::new("/"));
    let search = elf
        .rpaths
        .iter()
        .chain(elf.runpaths.iter())
        .flat_map(|list| list.split(':'))
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir.replace("$ORIGIN", &origin.to_string_lossy())))
        .collect();
    Ok(Needs {
        interpreter: elf.interpreter.map(str::to_string),
        libraries: elf.libraries.iter().map(|s| s.to_string()).collect(),
        search,
    })
}

/// Finds library `name` in `dirs` then the system directories, preferring the best
/// glibc-hwcaps variant that exists, as ld.so does on a current x86-64 CPU.
/// Every directory looked in goes into `searched`.
fn find_library(name: &str, dirs: &[PathBuf], searched: &mut BTreeSet<PathBuf>) -> Vec<PathBuf> {
    let system = SYSTEM_DIRS.iter().map(PathBuf::from);
    for dir in dirs.iter().cloned().chain(system) {
        searched.insert(dir.clone());
        let candidate = dir.join(name);
        if candidate.exists() {
            let mut found = vec![candidate];
            for level in ["x86-64-v4", "x86-64-v3", "x86-64-v2"] {
                let variant = dir.join("glibc-hwcaps").join(level).join(name);
                if variant.exists() {
                    found.push(variant);
                }
            }
            return found;
        }
    }
    Vec::new()
}

/// The files `program` needs to run, `program` first: the interpreter and every library
/// (for a `#!` script, its interpreter and what that needs), as host paths (symlinks on
/// the way are the caller's to copy; see [`crate::rootfs`]).
pub fn closure(program: &Path) -> Result<Vec<PathBuf>, ClosureError> {
    closure_of(&[program.to_path_buf()], Missing::Fail)
}

/// [`closure`], with every directory looked in for a library (where one put there later
/// could change the closure: a library found earlier in the search order), in order.
pub fn closure_and_searched(program: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), ClosureError> {
    let mut searched = BTreeSet::new();
    let files = closure_searching(&[program.to_path_buf()], Missing::Fail, &mut searched)?;
    Ok((files, searched.into_iter().collect()))
}

/// What to do about a library found nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Fail: the program could not start without it.
    Fail,
    /// Leave it out: for modules loaded on demand, of which an app uses few (an
    /// interpreter's native modules), one that cannot load is the app's own error to see.
    Skip,
}

/// The files `programs` need, the programs first, each file once.
pub fn closure_of(programs: &[PathBuf], missing: Missing) -> Result<Vec<PathBuf>, ClosureError> {
    closure_searching(programs, missing, &mut BTreeSet::new())
}

/// [`closure_of`], putting every directory looked in into `searched`.
fn closure_searching(
    programs: &[PathBuf],
    missing: Missing,
    searched: &mut BTreeSet<PathBuf>,
) -> Result<Vec<PathBuf>, ClosureError> {
    let mut files = programs.to_vec();
    let mut seen: BTreeSet<PathBuf> = files.iter().cloned().collect();
    let mut queue: VecDeque<PathBuf> = programs.iter().cloned().collect();
    while let Some(file) = queue.pop_front() {
        let needs = read_needs(&file)?;
        let mut add = |path: PathBuf, queue: &mut VecDeque<PathBuf>| {
            if seen.insert(path.clone()) {
                files.push(path.clone());
                queue.push_back(path);
            }
        };
        if let Some(interp) = needs.interpreter {
            add(PathBuf::from(interp), &mut queue);
        }
        // glibc dlopens libgcc_s for pthread_cancel and pthread_exit (to unwind): a
        // program linked against libc needs it as if it were named, when the host has it.
        let mut libraries = needs.libraries.clone();
        if libraries.iter().any(|l| l == "libc.so.6") {
            let unwinder = "libgcc_s.so.1".to_string();
            if !libraries.contains(&unwinder)
                && !find_library(&unwinder, &needs.search, searched).is_empty()
            {
                libraries.push(unwinder);
            }
        }
        for needed in &libraries {
            let found = find_library(needed, &needs.search, searched);
            if found.is_empty() && missing == Missing::Fail {
                return Err(ClosureError::Missing {
                    needed: needed.clone(),
                    by: file.clone(),
                });
            }
            for path in found {
                add(path, &mut queue);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_needs_its_interpreter_and_what_that_needs() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#! /bin/sh -e\necho hi\n").unwrap();
        let files = closure(&script).unwrap();
        assert_eq!(files[0], script);
        assert!(files.iter().any(|f| f == Path::new("/bin/sh")), "{files:?}");
        assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");
        assert_eq!(
            script_interpreter(b"#!\t/usr/bin/env  python3\n"),
            Some("/usr/bin/env".into())
        );
        assert_eq!(script_interpreter(b"#!\n"), None);
        assert_eq!(script_interpreter(b"\x7fELF"), None);
    }

    #[test]
    fn the_directories_searched_for_a_library_are_told() {
        let (files, searched) = closure_and_searched(Path::new("/bin/ls")).unwrap();
        assert_eq!(files, closure(Path::new("/bin/ls")).unwrap());
        // libc is found in the first system directory: that one was searched.
        assert!(
            searched.iter().any(|d| d == Path::new(SYSTEM_DIRS[0])),
            "{searched:?}"
        );
    }

    #[test]
    fn a_dynamic_program_needs_libc_and_the_interpreter() {
        let files = closure(Path::new("/bin/ls")).unwrap();
        assert_eq!(files[0], Path::new("/bin/ls"));
        assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");
        // dlopened by glibc to cancel threads.
        assert!(
            files.iter().any(|f| f.ends_with("libgcc_s.so.1")),
            "{files:?}"
        );
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("ld-linux-x86-64")),
            "{files:?}"
        );
    }
}
