//! Image definitions: `images/<name>/image.toml`, one folder per image.
//!
//! ```toml
//! description = "nginx serving a small static site"
//! apt = ["nginx-light"]                 # Debian packages the build needs on the host
//!
//! [run]                                 # how the app is started
//! argv = ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"]
//! env = ["LANG=C.UTF-8"]
//! cwd = "/"
//! memory_mib = 256
//! address = "127.0.0.1"                 # optional, in 127.0.0.0/8
//! ports = [80]
//! writable = ["/var/log/nginx", "/run", "/tmp"]
//!
//! [root]                                # what the root filesystem holds
//! host = ["/usr/sbin/nginx", "/etc/nginx/mime.types"]
//! dirs = ["/var/lib/nginx/body"]
//! copy = [{ src = "nginx.conf", dest = "/etc/nginx/nginx.conf" }]
//! compile = [{ sources = ["hello.c"], output = "/bin/hello", flags = ["-O2", "-static"] }]
//! generate = [{ dest = "/srv/www/1m.txt", size = 1048576 }]
//! ```
//!
//! Unknown keys are errors, so a typo never silently drops part of an image.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

/// The file name of a definition inside its image folder.
pub const DEFINITION_FILE: &str = "image.toml";

/// The largest file a `generate` entry may ask for (256 MiB).
pub const MAX_GENERATED_SIZE: u64 = 256 << 20;

/// Why a definition could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The definition file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or does not match the schema.
    #[error("parsing {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, with the line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A field has a value the schema does not allow.
    #[error("{field} = {value:?}: {problem}")]
    Invalid {
        /// The field, as a TOML path (`run.argv[0]`).
        field: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The image folder's name cannot be an image name.
    #[error("{0:?} is not a valid image name (use letters, digits, '-', '_' and '.', not first)")]
    BadName(String),
}

/// The contents of `image.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// One line saying what the image runs.
    #[serde(default)]
    pub description: String,
    /// Debian packages the build takes files from. `picocenter image build` installs any
    /// that dpkg says are not installed.
    #[serde(default)]
    pub apt: Vec<String>,
    /// How the app is started.
    pub run: RunConfig,
    /// What the root filesystem holds.
    #[serde(default)]
    pub root: RootSpec,
}

/// How an image's app is started; also recorded, resolved, in the built image's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The entrypoint: `argv[0]` is the program's path inside the root.
    pub argv: Vec<String>,
    /// The environment, as `K=V`.
    #[serde(default)]
    pub env: Vec<String>,
    /// The initial working directory, inside the root.
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// Guest RAM in MiB (positive and even).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// The address the app listens on by default, in 127.0.0.0/8.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// The TCP ports the app listens on.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Guest directories the app may write; each is backed by a per-app host directory.
    #[serde(default)]
    pub writable: Vec<String>,
}

fn default_cwd() -> String {
    "/".to_string()
}

fn default_memory() -> u64 {
    256
}

/// What goes into an image's root filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootSpec {
    /// Host files or whole directories, copied to the same path (with the symlinks on the
    /// way). Every ELF file among them brings its shared-library closure.
    #[serde(default)]
    pub host: Vec<PathBuf>,
    /// Empty directories to create.
    #[serde(default)]
    pub dirs: Vec<String>,
    /// Files or directories from the image folder.
    #[serde(default)]
    pub copy: Vec<CopySpec>,
    /// C programs compiled from sources in the image folder.
    #[serde(default)]
    pub compile: Vec<CompileSpec>,
    /// Files generated at build time (instead of committing large files).
    #[serde(default)]
    pub generate: Vec<GenerateSpec>,
}

/// A file or directory copied from the image folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopySpec {
    /// The source, relative to the image folder (`../site` shares a sibling folder).
    pub src: PathBuf,
    /// Where it goes inside the root.
    pub dest: String,
}

/// A C program built with gcc into the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompileSpec {
    /// Source files, relative to the image folder.
    pub sources: Vec<PathBuf>,
    /// The program's path inside the root.
    pub output: String,
    /// gcc flags, such as `-O2` and `-static`. A dynamic program brings its closure.
    #[serde(default)]
    pub flags: Vec<String>,
}

/// A file of deterministic content: numbered 64-byte text lines (see
/// [`crate::generate::numbered_lines`]), the last one cut to make `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    /// Where it goes inside the root.
    pub dest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A definition loaded from its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    /// The image's name: its folder's name.
    pub name: String,
    /// The image folder.
    pub dir: PathBuf,
    /// The parsed `image.toml`.
    pub spec: ImageSpec,
}

impl Definition {
    /// Loads and checks `<dir>/image.toml`.
    pub fn load(dir: &Path) -> Result<Self, DefinitionError> {
        let dir = std::path::absolute(dir).map_err(|source| DefinitionError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let dir = crate::rootfs::normalize(&dir);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        check_name(&name)?;
        let path = dir.join(DEFINITION_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| DefinitionError::Read {
            path: path.clone(),
            source,
        })?;
        let spec = ImageSpec::from_toml(&text, &path)?;
        Ok(Self { name, dir, spec })
    }

    /// The definition file's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join(DEFINITION_FILE)
    }
}

/// Checks that `name` can name an image (and a directory of the cache).
pub fn check_name(name: &str) -> Result<(), DefinitionError> {
    let good = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if good {
        Ok(())
    } else {
        Err(DefinitionError::BadName(name.to_string()))
    }
}

fn invalid(field: String, value: impl std::fmt::Debug, problem: &'static str) -> DefinitionError {
    DefinitionError::Invalid {
        field,
        value: format!("{value:?}").trim_matches('"').to_string(),
        problem,
    }
}

/// Checks a path inside the root: absolute, with no `..`.
fn check_guest_path(field: String, path: &str) -> Result<(), DefinitionError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid(
            field,
            path,
            "must be an absolute path inside the root",
        ));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(field, path, "must not contain '..'"));
    }
    Ok(())
}

/// Checks a path relative to the image folder.
fn check_folder_path(field: String, path: &Path) -> Result<(), DefinitionError> {
    if path.is_absolute() || path.as_os_str().is_empty() {
        return Err(invalid(field, path, "must be relative to the image folder"));
    }
    Ok(())
}

/// A Debian package name (which also keeps options out of apt-get's command line).
fn check_package(field: String, name: &str) -> Result<(), DefinitionError> {
    let good = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | ':')
        });
    if good {
        Ok(())
    } else {
        Err(invalid(field, name, "is not a Debian package name"))
    }
}

impl ImageSpec {
    /// Parses the text of an `image.toml` and checks it.
    pub fn parse(text: &str) -> Result<Self, DefinitionError> {
        Self::from_toml(text, Path::new(DEFINITION_FILE))
    }

    fn from_toml(text: &str, path: &Path) -> Result<Self, DefinitionError> {
        let spec: Self = toml::from_str(text).map_err(|e| DefinitionError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        spec.check()?;
        Ok(spec)
    }

    /// Checks what the schema's types cannot say.
    pub fn check(&self) -> Result<(), DefinitionError> {
        for (i, package) in self.apt.iter().enumerate() {
            check_package(format!("apt[{i}]"), package)?;
        }
        self.run.check()?;
        self.root.check()
    }
}

impl RunConfig {
    /// Checks the entrypoint, environment, paths, memory, address and ports.
    pub fn check(&self) -> Result<(), DefinitionError> {
        let program = self
            .argv
            .first()
            .ok_or_else(|| invalid("run.argv".into(), "[]", "needs at least the program"))?;
        check_guest_path("run.argv[0]".into(), program)?;
        for (i, var) in self.env.iter().enumerate() {
            if !var.contains('=') || var.starts_with('=') {
                return Err(invalid(format!("run.env[{i}]"), var, "expected K=V"));
            }
        }
        check_guest_path("run.cwd".into(), &self.cwd)?;
        if self.memory_mib == 0 || !self.memory_mib.is_multiple_of(2) {
            return Err(invalid(
                "run.memory_mib".into(),
                self.memory_mib,
                "must be a positive, even number of MiB",
            ));
        }
        if let Some(address) = self.address {
            if !address.is_loopback() {
                return Err(invalid(
                    "run.address".into(),
                    address,
                    "must be in 127.0.0.0/8",
                ));
            }
        }
        if self.ports.contains(&0) {
            return Err(invalid("run.ports".into(), 0, "ports start at 1"));
        }
        for (i, dir) in self.writable.iter().enumerate() {
            let field = format!("run.writable[{i}]");
            check_guest_path(field.clone(), dir)?;
            if Path::new(dir).parent().is_none() {
                return Err(invalid(field, dir, "the whole root cannot be writable"));
            }
        }
        Ok(())
    }
}

impl RootSpec {
    /// Checks every path and size.
    pub fn check(&self) -> Result<(), DefinitionError> {
        for (i, host) in self.host.iter().enumerate() {
            if !host.is_absolute() {
                return Err(invalid(format!("root.host[{i}]"), host, "must be absolute"));
            }
        }
        for (i, dir) in self.dirs.iter().enumerate() {
            check_guest_path(format!("root.dirs[{i}]"), dir)?;
        }
        for (i, copy) in self.copy.iter().enumerate() {
            check_folder_path(format!("root.copy[{i}].src"), &copy.src)?;
            check_guest_path(format!("root.copy[{i}].dest"), &copy.dest)?;
        }
        for (i, compile) in self.compile.iter().enumerate() {
            if compile.sources.is_empty() {
                let field = format!("root.compile[{i}].sources");
                return Err(invalid(field, "[]", "needs at least one source"));
            }
            for (j, source) in compile.sources.iter().enumerate() {
                check_folder_path(format!("root.compile[{i}].sources[{j}]"), source)?;
            }
            check_guest_path(format!("root.compile[{i}].output"), &compile.output)?;
        }
        for (i, generate) in self.generate.iter().enumerate() {
            check_guest_path(format!("root.generate[{i}].dest"), &generate.dest)?;
            if generate.size > MAX_GENERATED_SIZE {
                let field = format!("root.generate[{i}].size");
                return Err(invalid(field, generate.size, "is over 256 MiB"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        description = "a test"
        apt = ["nginx-light"]
        [run]
        argv = ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"]
        env = ["A=1"]
        cwd = "/srv"
        memory_mib = 64
        address = "127.0.0.7"
        ports = [80, 443]
        writable = ["/run", "/tmp"]
        [root]
        host = ["/usr/sbin/nginx"]
        dirs = ["/var/lib/nginx/body"]
        copy = [{ src = "nginx.conf", dest = "/etc/nginx/nginx.conf" }]
        compile = [{ sources = ["a.c"], output = "/bin/a", flags = ["-static"] }]
        generate = [{ dest = "/srv/big", size = 1048576 }]
    "#;

    #[test]
    fn a_full_definition_parses() {
        let spec = ImageSpec::parse(FULL).unwrap();
        assert_eq!(spec.apt, ["nginx-light"]);
        assert_eq!(spec.run.argv[0], "/usr/sbin/nginx");
        assert_eq!(spec.run.address, Some(Ipv4Addr::new(127, 0, 0, 7)));
        assert_eq!(spec.run.ports, [80, 443]);
        assert_eq!(spec.root.copy[0].dest, "/etc/nginx/nginx.conf");
        assert_eq!(spec.root.compile[0].flags, ["-static"]);
        assert_eq!(spec.root.generate[0].size, 1 << 20);
    }

    #[test]
    fn defaults_fill_a_minimal_definition() {
        let spec = ImageSpec::parse("[run]\nargv = [\"/bin/hello\"]\n").unwrap();
        assert_eq!(spec.run.cwd, "/");
        assert_eq!(spec.run.memory_mib, 256);
        assert_eq!(spec.run.address, None);
        assert!(spec.run.writable.is_empty());
        assert_eq!(spec.root, RootSpec::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = ImageSpec::parse("[run]\nargv = [\"/bin/x\"]\nmemroy_mib = 4\n").unwrap_err();
        assert!(matches!(err, DefinitionError::Parse { .. }), "{err}");
    }

    fn problem(text: &str) -> String {
        match ImageSpec::parse(text) {
            Err(DefinitionError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let run = |extra: &str| format!("[run]\nargv = [\"/bin/x\"]\n{extra}\n");
        assert_eq!(problem("[run]\nargv = []\n"), "run.argv");
        assert_eq!(problem("[run]\nargv = [\"bin/x\"]\n"), "run.argv[0]");
        assert_eq!(problem(&run("memory_mib = 3")), "run.memory_mib");
        assert_eq!(problem(&run("address = \"10.0.0.1\"")), "run.address");
        assert_eq!(problem(&run("ports = [0]")), "run.ports");
        assert_eq!(problem(&run("env = [\"NOEQUALS\"]")), "run.env[0]");
        assert_eq!(problem(&run("writable = [\"/\"]")), "run.writable[0]");
        assert_eq!(problem(&run("writable = [\"/a/../b\"]")), "run.writable[0]");
        let root = |extra: &str| format!("{}[root]\n{extra}\n", run(""));
        assert_eq!(problem(&root("host = [\"usr/bin\"]")), "root.host[0]");
        assert_eq!(
            problem(&root("copy = [{ src = \"/etc/passwd\", dest = \"/x\" }]")),
            "root.copy[0].src"
        );
        assert_eq!(
            problem(&root("generate = [{ dest = \"/x\", size = 1000000000 }]")),
            "root.generate[0].size"
        );
        assert_eq!(
            problem(&format!("apt = [\"-oX=1\"]\n{}", run(""))),
            "apt[0]"
        );
    }

    #[test]
    fn image_names_are_plain_words() {
        assert!(check_name("counter-http").is_ok());
        assert!(check_name("python_3.11").is_ok());
        for bad in ["", ".hidden", "a/b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_shipped_image_definitions_are_valid() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut names = Vec::new();
        for entry in std::fs::read_dir(images).unwrap() {
            let dir = entry.unwrap().path();
            if !dir.join(DEFINITION_FILE).exists() {
                continue;
            }
            let definition = Definition::load(&dir).unwrap_or_else(|e| panic!("{e:#?}"));
            let root = &definition.spec.root;
            let sources = root.copy.iter().map(|c| &c.src);
            for source in sources.chain(root.compile.iter().flat_map(|c| &c.sources)) {
                assert!(dir.join(source).exists(), "{}: {source:?}", dir.display());
            }
            names.push(definition.name);
        }
        names.sort();
        let expected = [
            "bigmem",
            "counter-http",
            "hello",
            "lighttpd",
            "memcached",
            "nginx",
            "nginx-workers",
            "postfix",
            "python-http",
            "redis",
            "udp-counter",
        ];
        assert_eq!(names, expected);
    }
}
