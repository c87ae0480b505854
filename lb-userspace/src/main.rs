//! The `xlb` binary: everything, from logging to exit codes, is the
//! library's [`xlb::cli`], so that the tests run the very same command line.

fn main() -> std::process::ExitCode {
    xlb::cli::main()
}
