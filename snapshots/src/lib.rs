//! Picoprocess snapshots: the on-disk format, and where snapshots are kept.
//!
//! A snapshot is *app-level*: the app's registers, memory areas and pages, files,
//! signal state and clocks. The guest's own machinery (doorbell, GDT, IDT, page tables)
//! is rebuilt by the VMM at restore, so a snapshot taken on kvm_pvm restores on hardware
//! KVM and back. See README.md for the format.
//!
//! * [`format`]: the manifest (serde, postcard-encoded, checksummed, size-capped);
//! * [`pagefile`]: the page file (4 KiB pages, ActiveSet first, zero pages omitted);
//! * [`store`]: snapshot stores, with atomic commits, and [`store::copy_chain`];
//! * [`s3`]: the S3 store (AWS or any S3-compatible endpoint).

pub mod chain;
pub mod compact;
pub mod format;
pub mod pagefile;
pub mod s3;
pub mod store;

pub use format::{Manifest, ManifestError};
pub use s3::{S3Config, S3Error, S3Store};
pub use store::{copy_chain, LocalStore, Store, StoreError};
