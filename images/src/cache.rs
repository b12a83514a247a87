//! The image cache: `<cache>/images/<name>/` holds a built image, `rootfs/` and the
//! metadata file `image.json`. A build is staged in `<cache>/images/.<name>.build-*` and
//! swapped in atomically (`renameat2(RENAME_EXCHANGE)`), so a reader sees the old image or
//! the new one, never half of either. Builds of one image are serialized by a lock file.

use crate::definition::{check_name, DefinitionError, RunConfig};
use crate::rootfs::{self, RootfsError};
use rustix::fs::{FlockOperation, RenameFlags, CWD};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The metadata file inside a built image's directory.
pub const METADATA_FILE: &str = "image.json";

/// The version of the metadata format; an image of another version must be rebuilt.
pub const FORMAT_VERSION: u32 = 1;

/// A metadata file larger than this is refused as corrupt (16 MiB).
const MAX_METADATA: u64 = 16 << 20;

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No image of that name has been built.
    #[error("image {name:?} is not built in {cache} (run `picocenter image build DIR`)")]
    NotBuilt {
        /// The image.
        name: String,
        /// The image cache.
        cache: PathBuf,
    },
    /// The name cannot name an image.
    #[error(transparent)]
    BadName(#[from] DefinitionError),
    /// A file or directory operation failed.
    #[error("{what} {path}")]
    Io {
        /// The step that failed.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metadata file is not what a build writes.
    #[error("{path} is corrupt (rebuild the image)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The metadata file is larger than any build writes.
    #[error("{0} is too large to be image metadata (rebuild the image)")]
    TooLarge(PathBuf),
    /// The image was built by an incompatible version.
    #[error("{path} has format {found}, not {FORMAT_VERSION} (rebuild the image)")]
    Format {
        /// The file.
        path: PathBuf,
        /// Its format version.
        found: u32,
    },
}

fn io_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What a build records about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// [`FORMAT_VERSION`] when written.
    pub format: u32,
    /// The image's name.
    pub name: String,
    /// The definition's description.
    pub description: String,
    /// How to start the app, resolved (defaults filled in).
    pub run: RunConfig,
    /// The fingerprint of the inputs it was built from (see [`crate::fingerprint`]).
    pub fingerprint: String,
    /// When it was built, in seconds since the Unix epoch.
    pub built_at: u64,
    /// The total size of the root's files, in bytes (hard links counted in full).
    pub size_bytes: u64,
    /// The image folder it was built from.
    pub definition_dir: PathBuf,
    /// Every host file the root took, shared libraries included, sorted.
    pub host_files: Vec<PathBuf>,
}

/// An image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// What the build recorded.
    pub meta: ImageMeta,
    /// The image's directory in the cache.
    pub dir: PathBuf,
    /// The root filesystem: `<dir>/rootfs`.
    pub rootfs: PathBuf,
    /// Whether the call that returned it assembled the root (false when a build found the
    /// image up to date, and for [`load`] and [`list`]).
    pub rebuilt: bool,
}

impl BuiltImage {
    /// The entrypoint's program: its path inside the root.
    pub fn program(&self) -> &str {
        self.meta.run.argv.first().map_or("", String::as_str)
    }

    /// Fills `host_dir`, the fresh host directory behind writable guest directory `guest`,
    /// with copies of what the root holds there, if it holds a directory there.
    pub fn seed_writable(&self, guest: &str, host_dir: &Path) -> Result<(), RootfsError> {
        let inside = rootfs::resolve_in_root(&self.rootfs, guest)?;
        if !std::fs::symlink_metadata(&inside).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        let entries = std::fs::read_dir(&inside).map_err(|source| RootfsError::Io {
            path: inside.clone(),
            what: "read directory",
            source,
        })?;
        for entry in entries.flatten() {
            rootfs::copy_tree(&entry.path(), &host_dir.join(entry.file_name()))?;
        }
        Ok(())
    }
}

/// The image cache inside `cache_dir`.
pub fn images_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("images")
}

/// Reads a built image's metadata, refusing anything a build would not have written.
fn read_meta(path: &Path) -> Result<ImageMeta, CacheError> {
    let file = std::fs::File::open(path).map_err(io_error("opening", path))?;
    let mut text = Vec::new();
    file.take(MAX_METADATA + 1)
        .read_to_end(&mut text)
        .map_err(io_error("reading", path))?;
    if text.len() as u64 > MAX_METADATA {
        return Err(CacheError::TooLarge(path.to_path_buf()));
    }
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    let corrupt = |source| CacheError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let version: Version = serde_json::from_slice(&text).map_err(corrupt)?;
    if version.format != FORMAT_VERSION {
        return Err(CacheError::Format {
            path: path.to_path_buf(),
            found: version.format,
        });
    }
    serde_json::from_slice(&text).map_err(corrupt)
}

/// The built image `name` in `cache_dir`.
pub fn load(cache_dir: &Path, name: &str) -> Result<BuiltImage, CacheError> {
    check_name(name)?;
    let dir = images_dir(cache_dir).join(name);
    let path = dir.join(METADATA_FILE);
    if !path.exists() {
        return Err(CacheError::NotBuilt {
            name: name.to_string(),
            cache: images_dir(cache_dir),
        });
    }
    let meta = read_meta(&path)?;
    Ok(BuiltImage {
        meta,
        rootfs: dir.join("rootfs"),
        dir,
        rebuilt: false,
    })
}

/// Every built image in `cache_dir`, by name. An unreadable one is skipped with a warning.
pub fn list(cache_dir: &Path) -> Result<Vec<BuiltImage>, CacheError> {
    let dir = images_dir(cache_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("reading", &dir)(e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| check_name(name).is_ok())
        .collect();
    names.sort();
    let mut images = Vec::new();
    for name in names {
        match load(cache_dir, &name) {
            Ok(image) => images.push(image),
            Err(CacheError::NotBuilt { .. }) => {}
            Err(e) => tracing::warn!("skipping image {name}: {e}"),
        }
    }
    Ok(images)
}

/// Holds the build lock of one image until dropped.
#[derive(Debug)]
pub(crate) struct BuildLock(#[allow(dead_code)] std::fs::File);

impl BuildLock {
    /// Waits for, then takes, the lock of image `name` (creating the cache as needed).
    pub(crate) fn take(cache_dir: &Path, name: &str) -> Result<Self, CacheError> {
        let dir = images_dir(cache_dir);
        std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        let path = dir.join(format!(".{name}.lock"));
        let file = std::fs::File::create(&path).map_err(io_error("creating", &path))?;
        rustix::fs::flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| io_error("locking", &path)(e.into()))?;
        Ok(Self(file))
    }
}

/// A build in progress: a directory next to the image's, removed unless installed.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: PathBuf,
    target: PathBuf,
    installed: bool,
}

impl Staging {
    /// A fresh staging directory for image `name`, with an empty `rootfs/`.
    pub(crate) fn new(cache_dir: &Path, name: &str) -> Result<Self, CacheError> {
        let images = images_dir(cache_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = images.join(format!(".{name}.build-{}-{nanos}", std::process::id()));
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(io_error("creating", &rootfs))?;
        Ok(Self {
            dir,
            target: images.join(name),
            installed: false,
        })
    }

    /// The root being assembled.
    pub(crate) fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Writes the metadata, then swaps the staged image in for the old one (which is
    /// removed) and returns the image's directory.
    pub(crate) fn install(mut self, meta: &ImageMeta) -> Result<PathBuf, CacheError> {
        let path = self.dir.join(METADATA_FILE);
        let json = serde_json::to_vec_pretty(meta).map_err(|source| CacheError::Corrupt {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, json).map_err(io_error("writing", &path))?;
        match rustix::fs::renameat_with(CWD, &self.dir, CWD, &self.target, RenameFlags::EXCHANGE) {
            // The old image is now at the staging path, and Drop removes it.
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => {
                std::fs::rename(&self.dir, &self.target)
                    .map_err(io_error("installing", &self.target))?;
                self.installed = true;
            }
            Err(e) => return Err(io_error("installing", &self.target)(e.into())),
        }
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.installed {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> ImageMeta {
        ImageMeta {
            format: FORMAT_VERSION,
            name: name.into(),
            description: String::new(),
            run: crate::definition::ImageSpec::parse("[run]\nargv = [\"/bin/x\"]\n")
                .unwrap()
                .run,
            fingerprint: "f".into(),
            built_at: 0,
            size_bytes: 0,
            definition_dir: PathBuf::from("/nowhere"),
            host_files: Vec::new(),
        }
    }

    #[test]
    fn installing_swaps_the_whole_image_and_removes_the_old_one() {
        let cache = tempfile::tempdir().unwrap();
        for content in ["old", "new"] {
            let staging = Staging::new(cache.path(), "x").unwrap();
            std::fs::write(staging.rootfs().join("file"), content).unwrap();
            staging.install(&meta("x")).unwrap();
        }
        let image = load(cache.path(), "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(image.rootfs.join("file")).unwrap(),
            "new"
        );
        let left: Vec<_> = std::fs::read_dir(images_dir(cache.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["x"], "no staging directory is left behind");
        assert_eq!(list(cache.path()).unwrap().len(), 1);
    }

    #[test]
    fn missing_corrupt_and_foreign_images_are_refused() {
        let cache = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(cache.path(), "x"),
            Err(CacheError::NotBuilt { .. })
        ));
        assert!(matches!(
            load(cache.path(), "../x"),
            Err(CacheError::BadName(_))
        ));
        let dir = images_dir(cache.path()).join("x");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(METADATA_FILE), "{").unwrap();
        assert!(matches!(
            load(cache.path(), "x"),
            Err(CacheError::Corrupt { .. })
        ));
        std::fs::write(dir.join(METADATA_FILE), r#"{"format": 99}"#).unwrap();
        assert!(matches!(
            load(cache.path(), "x"),
            Err(CacheError::Format { found: 99, .. })
        ));
        assert!(list(cache.path()).unwrap().is_empty());
    }

    #[test]
    fn writable_directories_are_seeded_with_copies() {
        let cache = tempfile::tempdir().unwrap();
        let staging = Staging::new(cache.path(), "x").unwrap();
        std::fs::create_dir_all(staging.rootfs().join("var/lib/app/body")).unwrap();
        std::fs::write(staging.rootfs().join("var/lib/app/state"), "s").unwrap();
        staging.install(&meta("x")).unwrap();
        let image = load(cache.path(), "x").unwrap();
        let data = tempfile::tempdir().unwrap();
        image.seed_writable("/var/lib/app", data.path()).unwrap();
        assert!(data.path().join("body").is_dir());
        std::fs::write(data.path().join("state"), "changed").unwrap();
        let original = image.rootfs.join("var/lib/app/state");
        assert_eq!(std::fs::read_to_string(original).unwrap(), "s");
        image.seed_writable("/not/there", data.path()).unwrap();
    }
}
