//! The probe egress program (tc, `clsact` egress) on the interfaces the
//! balancer runs on: it encapsulates the node's via-VIP probe packets (see
//! `lb-ebpf/src/probe.rs`) and leaves every other packet alone.
//!
//! It is loaded from the same object as the balancer, so it reads the same
//! `BACKENDS`, `NEXTHOPS` and `SETTINGS` and counts in the same `COUNTERS`:
//! no map of its own, no second owner. Its attachments are this process's
//! (TCX links, or netlink filters on kernels before 6.6) and are not
//! pinned: a probe only runs while its daemon does, so the program need not
//! outlive it, and a restarted daemon attaches again.

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, SchedClassifierLinkId},
};
use lb_common::program_names;

use super::{Dataplane, DataplaneError};

pub(super) const NAME: &str = program_names::PROBE_EGRESS;

/// Loads the program (the verifier runs here).
pub(super) fn load(ebpf: &mut aya::Ebpf) -> Result<(), DataplaneError> {
    program_mut(ebpf)?
        .load()
        .map_err(|source| DataplaneError::Program { name: NAME, source })
}

fn program_mut(ebpf: &mut aya::Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(NAME)
        .and_then(|program| program.try_into().ok())
        .ok_or(DataplaneError::Missing {
            kind: "tc program",
            name: NAME,
        })
}

impl Dataplane {
    /// The loaded probe egress program, e.g. to run it on a test packet.
    pub fn probe_egress(&self) -> Result<&SchedClassifier, DataplaneError> {
        self.ebpf
            .program(NAME)
            .and_then(|program| program.try_into().ok())
            .ok_or(DataplaneError::Missing {
                kind: "tc program",
                name: NAME,
            })
    }

    /// Attaches the probe egress program to `interface`'s egress, once.
    pub(super) fn attach_egress(&mut self, interface: &str) -> Result<(), DataplaneError> {
        if self.egress_links.contains_key(interface) {
            return Ok(());
        }
        let program = program_mut(&mut self.ebpf)?;
        let attached = match program.attach(interface, TcAttachType::Egress) {
            Ok(link) => Ok(link),
            // Before TCX (6.6) the filter needs the clsact qdisc; adding
            // one that exists is refused, and harmless.
            Err(_) => {
                let _ = tc::qdisc_add_clsact(interface);
                program.attach(interface, TcAttachType::Egress)
            }
        };
        let link: SchedClassifierLinkId =
            attached.map_err(|source| DataplaneError::Program { name: NAME, source })?;
        self.egress_links.insert(interface.to_owned(), link);
        Ok(())
    }

    /// Takes the probe egress program off `interface`, if this process put
    /// it there.
    pub(super) fn detach_egress(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let Some(link) = self.egress_links.remove(interface) else {
            return Ok(());
        };
        program_mut(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| DataplaneError::Program { name: NAME, source })
    }

    /// The interfaces the probe egress program is attached to.
    pub fn egress_interfaces(&self) -> impl Iterator<Item = &str> {
        self.egress_links.keys().map(String::as_str)
    }
}
