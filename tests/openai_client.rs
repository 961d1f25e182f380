//! The official `openai` Python client against `attune serve` (tests/openai_client.py).

mod common;

use common::Server;
use std::path::PathBuf;
use std::process::Command;

/// A Python with the `openai` and `openapi-spec-validator` packages: `ATTUNE_TEST_PYTHON`, or a venv under target/ that is
/// created (with pip) on first use.
fn python_with_openai() -> PathBuf {
    if let Some(python) = std::env::var_os("ATTUNE_TEST_PYTHON") {
        return python.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-venv");
    let python = venv.join("bin/python3");
    let has_packages = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import openai, openapi_spec_validator"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_packages(&python) {
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "openai",
                    "openapi-spec-validator",
                ])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && has_packages(&python),
            "cannot set up a Python venv with the test packages in {}",
            venv.display()
        );
    }
    python
}

#[test]
fn the_official_openai_client_works_against_attune() {
    let python = python_with_openai();
    let server = Server::start("", &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&server.base)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
