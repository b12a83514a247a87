//! Picoprocess snapshots: the on-disk format, and where snapshots are kept.
//!
//! A snapshot is *app-level*: the app's registers, memory areas and pages, files,
//! signal state and clocks. The guest's own machinery (doorbell, GDT, IDT, page tables)
//! is rebuilt by the VMM at restore, so a snapshot taken on kvm_pvm restores on hardware
//! KVM and back. See README.md for the format.
//!
//! Everything in a store is untrusted input: a manifest is used only once its HMAC under
//! the cluster's [`key`] checks out and every field is within [`bounds`]; page-file chunks
//! and the data archive are checked against BLAKE3 digests in the manifest.
//!
//! * [`format`]: the manifest (serde, postcard-encoded, authenticated, size-capped);
//! * [`key`]: the cluster's snapshot key;
//! * [`bounds`]: the bounds on every manifest field;
//! * [`names`]: app, image and snapshot names, and writable directories, before they
//!   become paths;
//! * [`pagefile`]: the page file (4 KiB pages, ActiveSet first, zero pages omitted);
//! * [`packed`]: a page file stored as its own pages and references to a base's;
//! * [`archive`]: the data archive of the writable directories (streamed, checked);
//! * [`feed`]: the page feed, which streams page files into a restoring VMM;
//! * [`store`]: snapshot stores, with atomic commits, and [`store::copy_chain`];
//! * [`s3`]: the S3 store (AWS or any S3-compatible endpoint);
//! * [`private`]: 0600 files and 0700 directories.

pub mod archive;
pub mod bounds;
pub mod chain;
pub mod compact;
pub mod feed;
pub mod format;
pub mod key;
pub mod names;
pub mod packed;
pub mod pagefile;
pub mod private;
pub mod s3;
pub mod store;

pub use format::{Manifest, ManifestError};
pub use key::SnapshotKey;
pub use s3::{S3Config, S3Error, S3Store};
pub use store::{copy_chain, LocalStore, Store, StoreError};
