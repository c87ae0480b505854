//! A test's `xlb run`, once started: ready only when its control socket
//! answers.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use xlb::{
    api::{Client, Request},
    topology::Spawned,
};

/// Waits until `process`, an `xlb run` that `who` names in messages,
/// answers a status request on `socket`. Panics with `log()` when it exits
/// first or has not answered within `patience` (a guard against hanging,
/// not a target).
#[track_caller]
pub fn await_ready(
    who: &str,
    process: &Spawned,
    socket: &Path,
    patience: Duration,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = process.try_wait().expect("polling the daemon") {
            panic!("{who} exited at start ({status}):\n{}", log());
        }
        if Client::connect(socket)
            .and_then(|mut c| c.call(&Request::Status))
            .is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who} did not answer within {patience:?}:\n{}",
            log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}
