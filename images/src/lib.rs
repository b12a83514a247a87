//! App images: root directories for picoprocesses, built from definitions.
//!
//! An image is defined by a folder holding `image.toml` (see [`definition`] for the
//! schema). [`build`] turns it into a root filesystem plus metadata in an image cache,
//! skipping the work when nothing it is built from has changed; [`load`] and [`list`] read
//! the cache.
//!
//! * [`definition`]: the `image.toml` schema, parsed and checked;
//! * [`build`](mod@build): assembling a root from a definition;
//! * [`cache`]: built images on disk, swapped in atomically;
//! * [`fingerprint`]: what decides whether an image is up to date;
//! * [`packages`]: the Debian packages a definition needs, installed on demand;
//! * [`generate`]: deterministic generated files;
//! * [`closure`]: the shared libraries (and the ELF interpreter) a program needs;
//! * [`interpreters`]: the library directories of Python and Perl;
//! * [`rootfs`]: copying host files, with the symlinks on their paths, into a root.

pub mod build;
pub mod cache;
pub mod closure;
pub mod definition;
pub mod fingerprint;
pub mod generate;
pub mod interpreters;
pub mod packages;
pub mod rootfs;

pub use build::{build, build_with, BuildError, BuildOptions};
pub use cache::{list, load, BuiltImage, CacheError, ImageMeta};
pub use definition::{Definition, DefinitionError, ImageSpec, RunConfig};
