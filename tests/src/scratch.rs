//! A test's scratch directory and private bpffs, both removed on drop,
//! also while a failed test unwinds.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
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
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xlb-{kind}-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
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

/// A private bpffs for the test's pins.
pub struct BpfFs {
    pub mount: PathBuf,
}

impl BpfFs {
    pub fn mount(at: PathBuf) -> Self {
        fs::create_dir_all(&at).expect("creating the bpffs mount point");
        let target = CString::new(at.as_os_str().as_bytes()).expect("mount point path");
        // SAFETY: NUL-terminated strings that outlive the call; bpffs takes
        // no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount -t bpf bpf {}: {}",
            at.display(),
            io::Error::last_os_error()
        );
        Self { mount: at }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.mount.as_os_str().as_bytes()).expect("mount point path");
        // SAFETY: a NUL-terminated path that outlives the call. Lazily, so
        // that a descriptor still open does not keep it mounted.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount {}: {}",
                self.mount.display(),
                io::Error::last_os_error()
            );
        }
    }
}
