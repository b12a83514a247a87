//! The Debian packages an image's files come from: asking dpkg which are installed, and
//! installing the missing ones with apt-get. Only packages a definition names are ever
//! installed.

use std::collections::BTreeSet;
use std::process::{Command, Output};

/// Why the packages could not be checked or installed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A tool (dpkg-query, apt-get) could not be started.
    #[error("running {tool} (is this a Debian system?)")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// apt-get failed, even after `apt-get update`.
    #[error("apt-get install {packages} failed: {stderr}")]
    Install {
        /// The packages, space-separated.
        packages: String,
        /// The end of apt-get's error output.
        stderr: String,
    },
    /// The lock that serialises installs could not be taken.
    #[error("taking the install lock {path}")]
    Lock {
        /// The lock file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// apt-get succeeded but dpkg still does not list the packages as installed.
    #[error("{0} still not installed after apt-get install")]
    StillMissing(String),
}

/// The packages of `wanted` that dpkg does not list as installed.
pub fn missing(wanted: &[String]) -> Result<Vec<String>, PackageError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let output = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status}\\n")
        .arg("--")
        .args(wanted)
        .output()
        .map_err(|source| PackageError::Spawn {
            tool: "dpkg-query",
            source,
        })?;
    // dpkg-query exits 1 when it knows nothing of a package; what it printed still counts.
    let installed: BTreeSet<&str> = std::str::from_utf8(&output.stdout)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| *status == "installed")
        .map(|(name, _)| name)
        .collect();
    let base = |name: &str| name.split(':').next().unwrap_or(name).to_string();
    Ok(wanted
        .iter()
        .filter(|name| !installed.contains(base(name).as_str()))
        .cloned()
        .collect())
}

/// The file concurrent installs take turns on.
pub const INSTALL_LOCK: &str = "/run/lock/picocenter-apt.lock";

/// How long apt-get waits for dpkg's own lock, in seconds.
const DPKG_LOCK_TIMEOUT_SECS: u32 = 600;

/// Holds [`INSTALL_LOCK`] (an exclusive `flock`) until dropped; falls back to a lock file
/// in the temporary directory where /run/lock does not exist.
fn install_lock() -> Result<std::fs::File, PackageError> {
    let path = if std::path::Path::new("/run/lock").is_dir() {
        std::path::PathBuf::from(INSTALL_LOCK)
    } else {
        std::env::temp_dir().join("picocenter-apt.lock")
    };
    let lock_error = |source| PackageError::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_error)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| lock_error(e.into()))?;
    Ok(file)
}

fn apt_get(args: &[&str], packages: &[String]) -> Result<Output, PackageError> {
    Command::new("apt-get")
        .arg(format!("-oDPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT_SECS}"))
        .args(args)
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|source| PackageError::Spawn {
            tool: "apt-get",
            source,
        })
}

/// The last few lines of a tool's stderr, for an error message.
fn tail(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Installs the packages of `wanted` that are missing: `apt-get install -y
/// --no-install-recommends`, and if that fails, `apt-get update` and once more. Returns the
/// packages it installed (none, and without running apt-get, when all are there).
///
/// Concurrent builds (in this process or others) install one at a time: each holds
/// [`INSTALL_LOCK`] and looks again at what is missing once it has it, so a package is
/// installed once. apt-get itself waits for dpkg's lock if anything else holds it.
pub fn ensure_installed(wanted: &[String]) -> Result<Vec<String>, PackageError> {
    if missing(wanted)?.is_empty() {
        return Ok(Vec::new());
    }
    let _lock = install_lock()?;
    let missing = missing(wanted)?;
    if missing.is_empty() {
        return Ok(missing);
    }
    let list = missing.join(" ");
    tracing::info!("installing Debian packages: {list}");
    let install = ["install", "-y", "--no-install-recommends", "--"];
    let mut output = apt_get(&install, &missing)?;
    if !output.status.success() {
        tracing::info!("apt-get install failed; running apt-get update and trying again");
        apt_get(&["update"], &[])?;
        output = apt_get(&install, &missing)?;
    }
    if !output.status.success() {
        return Err(PackageError::Install {
            packages: list,
            stderr: tail(&output),
        });
    }
    let still = self::missing(&missing)?;
    if !still.is_empty() {
        return Err(PackageError::StillMissing(still.join(" ")));
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_knows_what_is_installed() {
        let wanted = vec![
            "libc6".to_string(),
            "picocenter-no-such-package".to_string(),
        ];
        assert_eq!(missing(&wanted).unwrap(), ["picocenter-no-such-package"]);
        assert!(missing(&[]).unwrap().is_empty());
    }

    #[test]
    fn installs_take_turns_on_one_lock() {
        let first = install_lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let second = install_lock().unwrap();
            tx.send(()).unwrap();
            drop(second);
        });
        // The second holder waits while the first holds the lock.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
    }
}
