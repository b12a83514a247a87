//! The cluster's snapshot key. Every manifest carries an HMAC-SHA256 of its bytes under
//! it, and a manifest is decoded only after that checks out, so a cold store changed by
//! anyone without the key is refused before anything is built from it.
//!
//! The key is 32 random bytes, kept as 64 hex digits and a newline in
//! `<state>/keys/snapshot.key` ([`default_path`]), mode 0600 in a 0700 directory. It is
//! made on first use; every VMM, worker and `snapshot` command of a cluster must use the
//! same one (copy the file to each machine).

use crate::private;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Bytes of a key, and of a MAC.
pub const KEY_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why the key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A host I/O error.
    #[error("{what} the snapshot key {path}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not 64 hex digits.
    #[error("the snapshot key {0} is not 64 hex digits")]
    Malformed(PathBuf),
    /// Other users may read it.
    #[error("the snapshot key {path} has mode {mode:#o}: other users may read it (chmod 600)")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// A cluster's snapshot key. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotKey([u8; KEY_BYTES]);

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotKey(..)")
    }
}

/// Where a state directory keeps its snapshot key.
pub fn default_path(state_dir: &Path) -> PathBuf {
    state_dir.join("keys").join("snapshot.key")
}

impl SnapshotKey {
    /// A key of these bytes (for tests, and for keys kept elsewhere).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// A new random key.
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; KEY_BYTES];
        let mut filled = 0;
        while filled < KEY_BYTES {
            let rest = &mut bytes[filled..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
            let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if got < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
                continue;
            }
            filled += got as usize;
        }
        Ok(Self(bytes))
    }

    /// Reads the key at `path`; refused if other users may read the file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let error = |what| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { what, path, source }
        };
        let meta = std::fs::metadata(path).map_err(error("reading"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(error("reading"))?;
        Self::from_hex(text.trim()).ok_or_else(|| KeyError::Malformed(path.to_path_buf()))
    }

    /// Reads the key at `path`, making it (random, 0600, in a 0700 directory) if there is
    /// none. Concurrent first uses agree on one key: each writes its own file and links it
    /// into place, and only the first link succeeds.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let error = |what| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { what, path, source }
        };
        if let Some(dir) = path.parent() {
            private::create_dir_all(dir).map_err(error("making the directory of"))?;
        }
        let key = Self::generate().map_err(error("generating"))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        private::write_synced(&tmp, format!("{}\n", key.to_hex()).as_bytes())
            .map_err(error("writing"))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(key),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(error("writing")(e)),
        }
    }

    fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 2 * KEY_BYTES {
            return None;
        }
        let mut bytes = [0u8; KEY_BYTES];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }

    fn hmac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC takes keys of any length; the error case cannot happen.
        let mut mac = HmacSha256::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts a 32-byte key"));
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// The HMAC-SHA256 of the concatenation of `parts`.
    pub fn sign(&self, parts: &[&[u8]]) -> [u8; KEY_BYTES] {
        self.hmac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC-SHA256 of the concatenation of `parts` (compared in
    /// constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac(parts).verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_private_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(dir.path());
        let key = SnapshotKey::load_or_create(&path).unwrap();
        assert_eq!(SnapshotKey::load_or_create(&path).unwrap(), key);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let tag = key.sign(&[b"head", b"payload"]);
        assert!(key.verify(&[b"headpay", b"load"], &tag));
        assert!(!key.verify(&[b"head", b"payloaD"], &tag));
        let other = SnapshotKey::generate().unwrap();
        assert!(!other.verify(&[b"head", b"payload"], &tag));
        assert_eq!(format!("{key:?}"), "SnapshotKey(..)");

        std::fs::set_permissions(&path, PermissionsExt::from_mode(0o644)).unwrap();
        assert!(matches!(
            SnapshotKey::load(&path).unwrap_err(),
            KeyError::Exposed { mode: 0o644, .. }
        ));
        std::fs::write(&path, "xyz\n").unwrap();
        std::fs::set_permissions(&path, PermissionsExt::from_mode(0o600)).unwrap();
        assert!(matches!(
            SnapshotKey::load(&path).unwrap_err(),
            KeyError::Malformed(_)
        ));
    }
}
