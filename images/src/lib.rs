//! App images: root directories for picoprocesses.
//!
//! * [`closure`]: the shared libraries (and the ELF interpreter) a program needs;
//! * [`rootfs`]: copying host files, with the symlinks on their paths, into a root.

pub mod closure;
pub mod rootfs;
