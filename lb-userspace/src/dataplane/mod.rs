//! Owns the loaded XDP object: load, attach, detach, and the typed map
//! writers and counter readers.

/// The XDP object built from `lb-ebpf` by this crate's build script.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb"));
