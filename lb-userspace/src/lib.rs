//! xlb's controller as a library: the binary, the tests and the benchmarks
//! all drive the data plane through these modules.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod doctor;
pub mod etcd;
pub mod fleet_health;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod monitor;
pub mod pktgen;
pub mod policy;
pub mod reconcile;
pub mod state;
pub mod topology;
