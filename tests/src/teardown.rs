//! The check that a site's drop removed all it made, also what a drop in
//! the middle of a failed test relies on.

use std::path::PathBuf;

use xlb::topology::Topology;

use crate::{bpffs::BpfFs, scratch::Scratch};

/// What a site leaves on the machine while it runs: namespaces under its
/// topology's prefix, its bpffs mount, its scratch directory and its
/// processes. Taken before the site is dropped, checked after.
pub struct Teardown {
    prefix: String,
    mount: PathBuf,
    dir: PathBuf,
    pids: Vec<u32>,
}

impl Teardown {
    pub fn of(
        topology: &Topology,
        bpffs: &BpfFs,
        scratch: &Scratch,
        pids: impl IntoIterator<Item = u32>,
    ) -> Self {
        Self {
            prefix: topology.prefix().to_owned(),
            mount: bpffs.path().to_owned(),
            dir: scratch.dir.clone(),
            pids: pids.into_iter().collect(),
        }
    }

    /// Nothing of it is left.
    #[track_caller]
    pub fn assert_clean(self) {
        assert_eq!(
            Topology::leftovers(&self.prefix).expect("listing namespaces"),
            Vec::<String>::new()
        );
        assert!(
            !BpfFs::is_mounted(&self.mount),
            "{} is still mounted",
            self.mount.display()
        );
        assert!(!self.dir.exists(), "{} is still there", self.dir.display());
        for pid in self.pids {
            // SAFETY: signal 0 only checks that the process exists.
            assert!(
                unsafe { libc::kill(pid as libc::pid_t, 0) } != 0,
                "process {pid} still runs"
            );
        }
    }
}
