//! Helpers shared by coroloop's benchmarks (`benchmarks/benches/`).
//!
//! The benchmarks are a workspace member of their own so that the peers
//! they compare against (criterion, tokio-uring, async-lock, blocking) are
//! built only by `cargo bench`, never by the library's examples and tests.
//! Run them from the repository root: `cargo bench --bench <name>`
//! (BENCHMARKS.md lists them and their figures).

use std::path::PathBuf;

/// The workspace's target directory: `CARGO_TARGET_DIR` when set
/// (relative to the repository root, as cargo reads it there), else
/// `target/` at the repository root.
pub fn target_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root.join(d), // an absolute path replaces `root`
        None => root.join("target"),
    }
}
