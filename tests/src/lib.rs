//! xlb's test kit: everything the packet-level tests under `tests/` share,
//! written to be read as the specification of the data plane's inputs and
//! outputs.
//!
//! - [`world`]: the standard world — named clients, VIPs (TCP, UDP, IPv6,
//!   port wildcards, client affinity, a VIP without a ring, an IPv4 VIP with
//!   IPv6 backends), backends and their next hops, settings.
//! - [`fixture`]: [`Fixture`] loads the real XDP object (the verifier runs
//!   then), programs that world through the controller's own map owners,
//!   and runs packets through the programs with BPF_PROG_TEST_RUN. It also
//!   predicts a flow's backend from the ring, with the flow hash and slot
//!   mapping of `lb-common` that the kernel runs.
//! - [`packet`]: [`Pkt`] builds client frames with etherparse (TCP SYN or
//!   ACK, UDP, ICMP, IPv4 or IPv6, a VLAN tag, IPv4 options, fragments).
//! - [`expect`]: the exact frame the balancer must send for a packet
//!   ([`encapsulated`]) or the decap program must pass up
//!   ([`decapsulated`]), computed independently of the XDP code, and
//!   [`parse_encap`], which checks an output frame with etherparse.
//! - [`counters`]: counter snapshots and deltas, to assert exactly which
//!   counters a packet moved.
//!
//! The tests that run real `xlb run` daemons in namespaces share:
//!
//! - [`scratch`]: [`scratch::Scratch`], a test's own directory, and
//!   [`bpffs`]: [`bpffs::BpfFs`], a test's own bpffs (on a fresh directory
//!   or inside its scratch directory) with reads of the maps pinned in it;
//!   both removed on drop, also while a failed test unwinds.
//! - [`daemon`]: [`daemon::await_ready`], the wait for a started `xlb run`
//!   to answer on its control socket.
//! - [`site`]: [`site::Site`], built by [`site::SiteBuilder`]: a client,
//!   an xlb node running the real `xlb run` and decapsulating backends on
//!   one bridge, IPv4 or dual-stack; and the [`site::Ground`] and
//!   [`site::Node`] it is made of, which [`fleet`] shares.
//! - [`teardown`]: [`teardown::Teardown`], the check that a dropped site
//!   left no namespace, mount, directory or process behind.
//! - [`plan`]: what the controller's reconcile step plans for a desired
//!   state, to compare with what a daemon programmed.
//! - [`exposition`]: the samples of a `/metrics` exposition, and `promtool
//!   check metrics` on it.
//! - [`fleet`]: [`fleet::Fleet`], a real etcd and several real `xlb run
//!   --store etcd://...` daemons, each in its own namespace, and their maps.
//!
//! Every fixture lives in a network namespace of its own (see
//! [`enter_private_netns`]), and [`privileged`] decides whether a test may
//! skip for lack of root: only outside CI.

pub mod bpffs;
pub mod counters;
pub mod daemon;
pub mod expect;
pub mod exposition;
pub mod fixture;
pub mod fleet;
pub mod packet;
pub mod plan;
pub mod scratch;
pub mod site;
pub mod stream;
pub mod teardown;
pub mod world;

pub use counters::*;
pub use expect::*;
pub use fixture::*;
pub use packet::*;
pub use stream::*;
pub use world::*;
