//! The `xlb` command line, built inside this package so that the daemon
//! tests (tests/daemon.rs) find it as `CARGO_BIN_EXE_xlb-for-tests`, always
//! up to date: cargo builds a package's binaries before its integration
//! tests, but not the binaries of the packages it depends on. It is
//! `lb-userspace`'s `xlb` binary line for line: both are only
//! [`xlb::cli::main`].

fn main() -> std::process::ExitCode {
    xlb::cli::main()
}
