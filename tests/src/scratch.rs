//! A test's scratch directory, removed on drop, also while a failed test
//! unwinds.

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

/// A fresh directory under the system's temporary one, unique to this
/// process and call.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    /// `kind` and `test` name it, for whoever finds it left over.
    pub fn new(kind: &str, test: &str) -> Self {
        let dir = unique_dir(kind, test);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the scratch directory");
        Self { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {err}", self.dir.display());
        }
    }
}

/// A path under the system's temporary directory that no other test of any
/// run names: the process id and a per-process count tell them apart,
/// `kind` and `test` tell a reader whose it is.
pub(crate) fn unique_dir(kind: &str, test: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "xlb-{kind}-{}-{}-{test}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}
