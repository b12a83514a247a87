//! Building an image: from its definition folder to a root filesystem and metadata in the
//! cache, skipped when the fingerprint of its inputs matches the cached image's.

use crate::cache::{self, BuildLock, BuiltImage, CacheError, ImageMeta, Staging, FORMAT_VERSION};
use crate::closure::{closure, ClosureError};
use crate::definition::{CompileSpec, Definition, DefinitionError};
use crate::fingerprint::{declared_host_files, fingerprint, FingerprintError};
use crate::packages::PackageError;
use crate::rootfs::{add_path, copy_tree, resolve_in_root, RootfsError};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The definition is unreadable or invalid.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// Its Debian packages could not be installed.
    #[error(transparent)]
    Packages(#[from] PackageError),
    /// Its inputs could not be read.
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    /// A program's shared libraries could not be found.
    #[error(transparent)]
    Closure(#[from] ClosureError),
    /// A file could not be put into the root.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The cache could not be read or written.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A file could not be written into the root.
    #[error("writing {path}")]
    Write {
        /// The host path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// gcc could not be started.
    #[error("running gcc (install the gcc package)")]
    Gcc(#[source] std::io::Error),
    /// gcc failed.
    #[error("gcc failed to build {output}:\n{stderr}")]
    Compile {
        /// The program it was building (guest path).
        output: String,
        /// gcc's error output.
        stderr: String,
    },
}

/// How to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Rebuild even when the image is up to date.
    pub force: bool,
}

/// Builds the image defined in `definition_dir` into `<cache_dir>/images/<name>`, unless
/// it is already there and up to date. Installs the Debian packages it names if missing.
pub fn build(definition_dir: &Path, cache_dir: &Path) -> Result<BuiltImage, BuildError> {
    build_with(definition_dir, cache_dir, &BuildOptions::default())
}

/// [`build`], with options.
pub fn build_with(
    definition_dir: &Path,
    cache_dir: &Path,
    options: &BuildOptions,
) -> Result<BuiltImage, BuildError> {
    let definition = Definition::load(definition_dir)?;
    let name = definition.name.clone();
    crate::packages::ensure_installed(&definition.spec.apt)?;
    let _lock = BuildLock::take(cache_dir, &name)?;
    let declared = declared_host_files(&definition)?;
    if !options.force {
        if let Some(image) = up_to_date(&definition, cache_dir, &declared)? {
            tracing::info!("image {name} is up to date");
            return Ok(image);
        }
    }
    let started = Instant::now();
    tracing::info!("building image {name} from {}", definition.dir.display());
    let staging = Staging::new(cache_dir, &name)?;
    let root = staging.rootfs();
    let mut host_files = declared;
    host_files.extend(assemble(&definition, &root)?);
    let meta = ImageMeta {
        format: FORMAT_VERSION,
        name: name.clone(),
        description: definition.spec.description.clone(),
        run: definition.spec.run.clone(),
        fingerprint: fingerprint(&definition, &host_files)?,
        built_at: now(),
        size_bytes: tree_size(&root),
        definition_dir: definition.dir.clone(),
        host_files: host_files.into_iter().collect(),
    };
    let dir = staging.install(&meta)?;
    tracing::info!(
        "built image {name} ({} bytes) in {:?}",
        meta.size_bytes,
        started.elapsed()
    );
    Ok(BuiltImage {
        meta,
        rootfs: dir.join("rootfs"),
        dir,
        rebuilt: true,
    })
}

/// The cached image, if its fingerprint matches the inputs as they are now: the declared
/// host files, plus the libraries the last build added.
fn up_to_date(
    definition: &Definition,
    cache_dir: &Path,
    declared: &BTreeSet<PathBuf>,
) -> Result<Option<BuiltImage>, BuildError> {
    let image = match cache::load(cache_dir, &definition.name) {
        Ok(image) => image,
        Err(CacheError::NotBuilt { .. }) => return Ok(None),
        Err(e) => {
            tracing::warn!("rebuilding: {e}");
            return Ok(None);
        }
    };
    let mut host_files = declared.clone();
    host_files.extend(image.meta.host_files.iter().cloned());
    let current = fingerprint(definition, &host_files)?;
    Ok((current == image.meta.fingerprint && image.rootfs.is_dir()).then_some(image))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Fills `root` from the definition; returns the shared libraries it added.
fn assemble(definition: &Definition, root: &Path) -> Result<BTreeSet<PathBuf>, BuildError> {
    let spec = &definition.spec;
    let mut libraries = BTreeSet::new();
    for host in &spec.root.host {
        tracing::debug!("adding {}", host.display());
        add_path(root, host)?;
        for file in crate::fingerprint::walk(host)? {
            libraries.extend(add_closure(root, &file)?);
        }
    }
    for copy in &spec.root.copy {
        let dest = resolve_in_root(root, &copy.dest)?;
        make_parent(&dest)?;
        copy_tree(&definition.dir.join(&copy.src), &dest)?;
    }
    for compile in &spec.root.compile {
        let output = self::compile(definition, compile, root)?;
        libraries.extend(add_closure(root, &output)?);
    }
    for generate in &spec.root.generate {
        let dest = resolve_in_root(root, &generate.dest)?;
        make_parent(&dest)?;
        write_generated(&dest, generate.size)?;
    }
    let run = &spec.run;
    let dirs = spec.root.dirs.iter().chain(&run.writable);
    for dir in dirs.chain(std::iter::once(&run.cwd)) {
        let path = resolve_in_root(root, dir)?;
        std::fs::create_dir_all(&path).map_err(|source| BuildError::Write { path, source })?;
    }
    Ok(libraries)
}

/// Adds the shared-library closure of `file` when it is an ELF file; returns the host
/// libraries added.
fn add_closure(root: &Path, file: &Path) -> Result<Vec<PathBuf>, BuildError> {
    if !is_elf(file) {
        return Ok(Vec::new());
    }
    let mut libraries = closure(file)?;
    libraries.remove(0);
    for library in &libraries {
        add_path(root, library)?;
    }
    Ok(libraries)
}

/// Whether `path` is (or links to) a regular file that starts like an ELF file.
fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let mut magic = [0u8; 4];
    is_file
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && magic == *b"\x7fELF"
}

fn make_parent(path: &Path) -> Result<(), BuildError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    std::fs::create_dir_all(parent).map_err(|source| BuildError::Write {
        path: parent.to_path_buf(),
        source,
    })
}

/// Removes what is at `path` (never writing through it: it may be a hard link to a host
/// file).
fn clear(path: &Path) -> Result<(), BuildError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BuildError::Write {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Compiles a C program into the root with gcc; returns its host path.
fn compile(
    definition: &Definition,
    spec: &CompileSpec,
    root: &Path,
) -> Result<PathBuf, BuildError> {
    let output = resolve_in_root(root, &spec.output)?;
    make_parent(&output)?;
    clear(&output)?;
    tracing::debug!("compiling {}", spec.output);
    let result = Command::new("gcc")
        .current_dir(&definition.dir)
        .args(&spec.flags)
        .arg("-o")
        .arg(&output)
        .args(&spec.sources)
        .output()
        .map_err(BuildError::Gcc)?;
    if !result.status.success() {
        return Err(BuildError::Compile {
            output: spec.output.clone(),
            stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
        });
    }
    Ok(output)
}

fn write_generated(path: &Path, size: u64) -> Result<(), BuildError> {
    use std::io::Write;
    clear(path)?;
    let write_error = |source| BuildError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(path).map_err(write_error)?;
    let mut out = std::io::BufWriter::new(file);
    crate::generate::numbered_lines(size, &mut out).map_err(write_error)?;
    out.flush().map_err(write_error)
}

/// The total size of the files under `dir` (0 for what cannot be read).
fn tree_size(dir: &Path) -> u64 {
    crate::fingerprint::walk(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|path| std::fs::symlink_metadata(path).ok())
        .map(|meta| meta.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A definition folder holding a static C program, a copied file, a generated file and
    /// a host program (/bin/true, which is dynamic, so its libraries come along).
    fn tiny_definition(top: &Path) -> PathBuf {
        let dir = top.join("tiny");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.c"), "int main(void) { return 0; }\n").unwrap();
        std::fs::write(dir.join("motd"), "hello\n").unwrap();
        std::fs::write(
            dir.join("image.toml"),
            r#"
            [run]
            argv = ["/bin/main"]
            writable = ["/tmp"]
            [root]
            host = ["/bin/true"]
            copy = [{ src = "motd", dest = "/etc/motd" }]
            compile = [{ sources = ["main.c"], output = "/bin/main", flags = ["-O2", "-static"] }]
            generate = [{ dest = "/srv/data", size = 100 }]
            "#,
        )
        .unwrap();
        dir
    }

    #[test]
    fn a_second_build_is_skipped_and_a_change_rebuilds() {
        let top = tempfile::tempdir().unwrap();
        let cache = top.path().join("cache");
        let dir = tiny_definition(top.path());
        let first = build(&dir, &cache).unwrap();
        assert!(first.rebuilt);
        let root = &first.rootfs;
        assert!(root.join("bin/main").is_file());
        assert!(root.join("tmp").is_dir());
        assert_eq!(std::fs::read(root.join("srv/data")).unwrap().len(), 100);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/motd")).unwrap(),
            "hello\n"
        );
        assert!(
            first
                .meta
                .host_files
                .iter()
                .any(|f| f.ends_with("libc.so.6")),
            "/bin/true's libraries are recorded: {:?}",
            first.meta.host_files
        );
        assert!(first.meta.size_bytes > 0);

        let second = build(&dir, &cache).unwrap();
        assert!(!second.rebuilt, "nothing changed");
        assert_eq!(second.meta, first.meta);

        std::fs::write(dir.join("motd"), "changed\n").unwrap();
        let third = build(&dir, &cache).unwrap();
        assert!(third.rebuilt);
        assert_ne!(third.meta.fingerprint, first.meta.fingerprint);
        let motd = third.rootfs.join("etc/motd");
        assert_eq!(std::fs::read_to_string(motd).unwrap(), "changed\n");

        let forced = build_with(&dir, &cache, &BuildOptions { force: true }).unwrap();
        assert!(forced.rebuilt);
        assert_eq!(crate::cache::list(&cache).unwrap().len(), 1);
    }

    #[test]
    fn a_compile_error_is_reported_and_leaves_the_cache_alone() {
        let top = tempfile::tempdir().unwrap();
        let cache = top.path().join("cache");
        let dir = tiny_definition(top.path());
        std::fs::write(dir.join("main.c"), "this is not C\n").unwrap();
        let err = build(&dir, &cache).unwrap_err();
        assert!(matches!(err, BuildError::Compile { .. }), "{err}");
        let left: Vec<_> = std::fs::read_dir(crate::cache::images_dir(&cache))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
