//! What the interpreters Debian ships need besides their ELF closure: Python 3 and Perl 5
//! load their standard libraries from directories (and native modules from there, which
//! need shared libraries of their own), so a root made of a program's closure alone has an
//! interpreter that cannot start ("No module named 'encodings'", "Can't locate strict.pm").
//! Python's zoneinfo also reads the host's time zones.

use std::path::{Path, PathBuf};

/// Perl 5's library directories on Debian x86-64 (`perl -V`'s @INC, by their real
/// directories).
const PERL_DIRS: &[&str] = &[
    "/etc/perl",
    "/usr/lib/x86_64-linux-gnu/perl-base",
    "/usr/lib/x86_64-linux-gnu/perl",
    "/usr/lib/x86_64-linux-gnu/perl5",
    "/usr/share/perl",
    "/usr/share/perl5",
];

/// Native modules looked for under an interpreter's directories: more than Debian's
/// Python (about 50) and Perl (about 60) hold.
const MAX_MODULES: usize = 2_000;

/// The host directories the interpreter `program` (a host path; symlinks are followed)
/// loads its library from, those that exist; empty for any other program.
pub fn library_dirs(program: &Path) -> Vec<PathBuf> {
    let real = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let candidates: Vec<String> = if let Some(version) = name.strip_prefix("python3.") {
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            return Vec::new();
        }
        vec![
            format!("/usr/lib/python3.{version}"),
            "/usr/lib/python3".into(),
            format!("/etc/python3.{version}"),
            format!("/usr/local/lib/python3.{version}"),
            // zoneinfo's time zones (tzdata), which Python reads by name.
            "/usr/share/zoneinfo".into(),
        ]
    } else if name == "perl" || name.starts_with("perl5.") {
        PERL_DIRS.iter().map(|d| d.to_string()).collect()
    } else {
        return Vec::new();
    };
    candidates
        .into_iter()
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .collect()
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == b"\x7fELF")
}

/// The native modules (`*.so` ELF files) under `dirs`, at most [`MAX_MODULES`].
pub fn native_modules(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = dirs.to_vec();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "so") && is_elf(&path)
            {
                found.push(path);
                if found.len() >= MAX_MODULES {
                    return found;
                }
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debians_python_and_perl_have_their_libraries_named() {
        for (program, needed) in [
            ("/usr/bin/python3", "encodings"),
            ("/usr/bin/perl", "strict.pm"),
        ] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: scripts/setup.sh installs it"
            );
            let dirs = library_dirs(Path::new(program));
            assert!(
                dirs.iter().any(|d| d.join(needed).exists()),
                "{program}: {dirs:?}"
            );
        }
        assert!(library_dirs(Path::new("/bin/sh")).is_empty());
        assert!(library_dirs(Path::new("/nonexistent/python3.x")).is_empty());
    }
}
