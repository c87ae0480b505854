//! Running subprocesses: every command is echoed as `$ cmd args` before it
//! runs, and a failure names the command that failed.

use std::ffi::OsStr;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// Builds a command that runs in the workspace root.
pub fn cmd<S: AsRef<OsStr>>(program: S, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).current_dir(crate::workspace_root());
    c
}

/// The command line as a user would type it in the workspace root.
pub fn display(c: &Command) -> String {
    let root = crate::workspace_root();
    let mut words = Vec::new();
    for (key, value) in c.get_envs() {
        if let Some(value) = value {
            words.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    let program = Path::new(c.get_program());
    let program = program.strip_prefix(root).unwrap_or(program);
    words.push(quote(&program.to_string_lossy()));
    words.extend(c.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = |ch: char| ch.is_ascii_alphanumeric() || "-_./=:+,@%^".contains(ch);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

pub fn echo(c: &Command) {
    eprintln!("$ {}", display(c));
}

/// Runs `c` with inherited stdio; fails unless it exits with status 0.
pub fn run(c: &mut Command) -> Result<()> {
    let status = status(c)?;
    if !status.success() {
        bail!("`{}` failed ({})", display(c), describe(status));
    }
    Ok(())
}

/// Runs `c` with inherited stdio and returns its exit status, whatever it is.
pub fn status(c: &mut Command) -> Result<ExitStatus> {
    echo(c);
    c.status()
        .with_context(|| format!("could not start `{}`", display(c)))
}

/// Runs `c` to inspect its output (stdout captured, stderr inherited). A
/// non-zero exit is not an error here: callers look at the status.
pub fn capture(c: &mut Command) -> Result<Output> {
    echo(c);
    c.stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", display(c)))
}

/// Replaces this process with `c`, so that signals (Ctrl-C) reach it directly
/// and its exit code becomes ours. Returns only on failure.
pub fn exec(c: &mut Command) -> anyhow::Error {
    echo(c);
    let err = c.exec();
    anyhow::Error::new(err).context(format!("could not execute `{}`", display(c)))
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    }
}
