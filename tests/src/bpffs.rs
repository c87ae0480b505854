//! A bpffs of a test's own, and reads of the maps pinned in it through the
//! map syscalls, independently of the controller's map owners.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{Array, Map, MapData};
use lb_common::map_names;

/// A bpffs mounted on a new directory under the system's temporary
/// directory for one test; unmounted (lazily, so open descriptors do not
/// hold it up) and removed when dropped, also while unwinding.
pub struct BpfFs {
    mount: PathBuf,
}

impl BpfFs {
    pub fn mount(test: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mount = std::env::temp_dir().join(format!(
            "xlb-bpffs-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&mount).expect("creating the bpffs mount point");
        let target = CString::new(mount.as_os_str().as_bytes()).expect("mount point path");
        // SAFETY: every argument is a NUL-terminated string that outlives
        // the call; bpffs takes no data.
        let mounted = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if mounted != 0 {
            let err = io::Error::last_os_error();
            let _ = fs::remove_dir(&mount);
            panic!("mount -t bpf bpf {}: {err}", mount.display());
        }
        Self { mount }
    }

    /// The pin directory inside the mount: not created yet, so that loading
    /// creates it.
    pub fn pin_dir(&self) -> PathBuf {
        self.mount.join("xlb")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.mount.as_os_str().as_bytes()).expect("mount point path");
        // SAFETY: `target` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount {}: {}",
                self.mount.display(),
                io::Error::last_os_error()
            );
        }
        let _ = fs::remove_dir(&self.mount);
    }
}

/// `len` slots of the `RINGS` pinned in `pin_dir` from `offset`, one
/// `bpf_map_lookup_elem` each: what the kernel holds, whoever wrote it.
pub fn pinned_ring(pin_dir: &Path, offset: u32, len: u32) -> Vec<u32> {
    let path = pin_dir.join(map_names::RINGS);
    let data =
        MapData::from_pin(&path).unwrap_or_else(|err| panic!("opening {}: {err}", path.display()));
    let rings: Array<MapData, u32> = Array::try_from(Map::Array(data)).expect("RINGS");
    (offset..offset + len)
        .map(|i| rings.get(&i, 0).expect("reading RINGS"))
        .collect()
}
