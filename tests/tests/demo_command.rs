//! `xlb demo` as a user runs it: the command itself, its rounds with
//! failures found by the daemons' probes, its refusal without root, and
//! its teardown, at the end and on Ctrl-C.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use xlb::demo::Footprint;

const XLB: &str = env!("CARGO_BIN_EXE_xlb-for-tests");
/// The exit status of an interrupted demo (128 + SIGINT, as a shell's).
const EXIT_INTERRUPTED: i32 = 130;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this test may run: as root always; otherwise it skips, unless
/// CI is set, where missing privileges are a failure.
fn may_run() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the demo tests need root (network namespaces, XDP); under CI they must not skip"
    );
    eprintln!("skipped: needs root");
    false
}

/// The namespace prefix the demo names in its "site ready ... in
/// namespaces PREFIX.*" line.
fn prefix_of(stdout: &str) -> String {
    stdout
        .split("in namespaces ")
        .nth(1)
        .and_then(|rest| rest.split(".*").next())
        .unwrap_or_else(|| panic!("no namespace prefix in:\n{stdout}"))
        .to_owned()
}

/// Nothing of the demo with this prefix is left: no namespace, no scratch
/// directory or bpffs, and no process whose command line names the prefix
/// (the daemons run with a config under the scratch directory).
fn assert_nothing_left(prefix: &str) {
    let scratch = std::env::temp_dir().join(prefix);
    let footprint = Footprint {
        prefix: prefix.to_owned(),
        bpffs: scratch.join("bpf"),
        scratch,
        pids: Vec::new(),
    };
    let mut left = footprint.leftovers();
    for entry in std::fs::read_dir("/proc").expect("listing /proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(prefix) {
            left.push(format!("process {}", entry.file_name().to_string_lossy()));
        }
    }
    assert!(left.is_empty(), "left behind: {left:#?}");
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_demo_fails_and_recovers_backends_through_the_daemons_probes() {
    if !may_run() {
        return;
    }
    let output = Command::new(XLB)
        .args(["demo", "--backends", "1", "--connections", "10"])
        .stdin(Stdio::null())
        .output()
        .expect("running xlb demo");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // With one backend per cluster: east-1 fails and comes back, then west
    // fails and comes back; each change noticed by both daemons' probes.
    let noticed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("noticed by the probes of xlb1 in ") && l.contains(", xlb2 in "))
        .collect();
    assert_eq!(noticed.len(), 4, "{stdout}");
    for round in ["round 2, east-1 down", "round 3, west down"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(round))
            .unwrap_or_else(|| panic!("no {round:?} in:\n{stdout}"));
        assert!(
            line.contains("10 answered") && line.contains("; 0 reached a failed backend"),
            "{line}"
        );
    }
    assert!(
        stdout.ends_with("removing the namespaces, daemons and pins... done\n"),
        "{stdout}"
    );
    assert_nothing_left(&prefix_of(&stdout));
}

/// Runs `xlb demo ARGS`, sends it SIGINT once it printed a line starting
/// with `at`, and returns how it exited, everything it printed and its
/// namespace prefix.
fn interrupt_demo(args: &[&str], at: &str) -> (std::process::ExitStatus, String, String, String) {
    let mut child = Command::new(XLB)
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting xlb demo");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("reading the demo");
        assert!(n > 0, "the demo ended before {at:?}:\n{seen}");
        seen.push_str(&line);
        if line.starts_with(at) {
            break;
        }
    }
    let prefix = prefix_of(&seen);
    assert!(
        Path::new("/run/netns")
            .join(format!("{prefix}.client"))
            .exists(),
        "the site is up while the demo runs:\n{seen}"
    );
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    // SAFETY: kill(2) of the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = child.wait().expect("waiting for the demo");
    stdout.read_to_string(&mut seen).expect("reading the demo");
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut stderr).expect("reading stderr");
    }
    (status, seen, stderr, prefix)
}

/// Ctrl-C while the rounds run: the demo stops, removes everything and
/// exits with 130, as an interrupted shell command does.
#[test]
fn ctrl_c_in_the_middle_of_the_demo_removes_everything() {
    if !may_run() {
        return;
    }
    // Enough connections that the first round is still running.
    let (status, stdout, stderr, prefix) = interrupt_demo(
        &["--backends", "1", "--connections", "100000"],
        "health probes",
    );
    assert_eq!(
        status.code(),
        Some(EXIT_INTERRUPTED),
        "{status:?} (signal {:?})\n{stdout}\n{stderr}",
        status.signal()
    );
    assert!(!stdout.contains("round 1"), "{stdout}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_nothing_left(&prefix);
}

/// `--keep` stays up until Ctrl-C, which is its normal end: the site goes
/// and the demo exits successfully.
#[test]
fn ctrl_c_ends_a_kept_demo_and_removes_everything() {
    if !may_run() {
        return;
    }
    let (status, stdout, stderr, prefix) = interrupt_demo(
        &["--backends", "1", "--connections", "5", "--keep"],
        "The site stays up until Ctrl-C",
    );
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");
    assert!(
        stdout.ends_with("removing the namespaces, daemons and pins... done\n"),
        "{stdout}"
    );
    assert_nothing_left(&prefix);
}

#[test]
fn the_demo_documents_its_options_and_refuses_to_run_without_root() {
    let help = Command::new(XLB)
        .args(["demo", "--help"])
        .output()
        .expect("running xlb demo --help");
    let (stdout, _) = text(&help);
    assert!(help.status.success());
    for option in ["--backends", "--connections", "--keep"] {
        assert!(stdout.contains(option), "{option} undocumented:\n{stdout}");
    }

    let mut command = Command::new(XLB);
    command.args(["demo", "--backends", "1"]);
    if is_root() {
        // As nobody: the demo must see it is not root and build nothing.
        command.uid(65534).gid(65534);
    }
    let refused = command.output().expect("running xlb demo");
    let (stdout, stderr) = text(&refused);
    assert!(!refused.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("xlb demo needs root"), "{stderr}");
    assert!(!stdout.contains("site ready"), "{stdout}");
}
