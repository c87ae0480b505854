//! Pieces shared by xlb's XDP objects: the one bounds-checked accessor of
//! packet memory and the wire headers.
#![no_std]

pub mod headers;
pub mod packet;
