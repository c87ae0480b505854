//! A bpffs of a test's own, and reads of the maps pinned in it through the
//! map syscalls, independently of the controller's map owners.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use lb_common::{Counter, RingLine, map_names};

use crate::scratch::unique_dir;

/// A bpffs mounted for one test; unmounted (lazily, so open descriptors do
/// not hold it up) and its mount point removed when dropped, also while
/// unwinding.
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// On a new directory under the system's temporary directory, named
    /// after `test`.
    pub fn mount(test: &str) -> Self {
        Self::at(unique_dir("bpffs", test))
    }

    /// On `path` (created if missing), say inside a test's [`Scratch`].
    ///
    /// [`Scratch`]: crate::scratch::Scratch
    pub fn at(path: PathBuf) -> Self {
        fs::create_dir_all(&path).expect("creating the bpffs mount point");
        let target = CString::new(path.as_os_str().as_bytes()).expect("mount point path");
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
            let _ = fs::remove_dir(&path);
            panic!("mount -t bpf bpf {}: {err}", path.display());
        }
        Self { path }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pin directory inside the mount: not created yet, so that loading
    /// creates it.
    pub fn pin_dir(&self) -> PathBuf {
        self.path.join("xlb")
    }

    /// Whether anything is mounted on `path` in this mount namespace: after
    /// a drop, nothing may be.
    pub fn is_mounted(path: &Path) -> bool {
        fs::read_to_string("/proc/self/mounts")
            .expect("reading /proc/self/mounts")
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(path.to_str().expect("utf-8 path")))
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_bytes()).expect("mount point path");
        // SAFETY: `target` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount {}: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// The map `name` pinned in `pin_dir`.
pub fn pinned(pin_dir: &Path, name: &str) -> MapData {
    MapData::from_pin(pin_dir.join(name))
        .unwrap_or_else(|err| panic!("opening the pinned {name}: {err}"))
}

/// `len` slots of the `RINGS` pinned in `pin_dir` from slot `offset`, one
/// `bpf_map_lookup_elem` per line: what the kernel holds, whoever wrote it.
/// The layout is spelled out here rather than taken from lb-common, so that
/// a change there shows: slot `i` is lane `i % 32` of element `i / 32`.
pub fn pinned_ring(pin_dir: &Path, offset: u32, len: u32) -> Vec<u32> {
    let rings: Array<MapData, RingLine> =
        Array::try_from(Map::Array(pinned(pin_dir, map_names::RINGS))).expect("RINGS");
    let mut line: Option<(u32, RingLine)> = None;
    (offset..offset + len)
        .map(|slot| {
            let (index, lane) = (slot / 32, (slot % 32) as usize);
            let (_, values) = match line {
                Some((at, values)) if at == index => (at, values),
                _ => *line.insert((index, rings.get(&index, 0).expect("reading RINGS"))),
            };
            u32::from(values.slots[lane])
        })
        .collect()
}

/// Every global counter pinned in `pin_dir`, summed over CPUs.
pub fn pinned_counters(pin_dir: &Path) -> BTreeMap<Counter, u64> {
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(pin_dir, map_names::COUNTERS)))
            .expect("COUNTERS");
    Counter::ALL
        .iter()
        .map(|c| {
            let values = counters.get(&(*c as u32), 0).expect("reading COUNTERS");
            (*c, values.iter().sum())
        })
        .collect()
}
