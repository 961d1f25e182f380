//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `attune` binary built for this test run.
pub fn attune() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attune"));
    cmd.env("ATTUNE_LOG", "warn");
    cmd
}

/// Runs `attune ARGS` and returns its output, panicking with stderr if it failed.
pub fn attune_ok(args: &[&str]) -> Output {
    let out = attune().args(args).output().expect("attune runs");
    assert!(
        out.status.success(),
        "attune {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The default model, fetched into the cache if needed (as `attune models fetch` does).
pub fn default_model() -> PathBuf {
    let out = attune_ok(&["models", "fetch"]);
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
