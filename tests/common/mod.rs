// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

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

/// A running `attune serve` on a free loopback port; stopped (SIGTERM) when dropped.
pub struct Server {
    child: Option<std::process::Child>,
    pub base: String,
    _config: Option<tempfile::NamedTempFile>,
}

impl Server {
    /// Starts the server with `config_toml` as its config file (on the default model unless the
    /// file lists models; the port is set by the harness) and `extra` flags; waits until /ready.
    pub fn start(config_toml: &str, extra: &[&str]) -> Self {
        let model = default_model();
        let port = free_port();
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config.path(), config_toml).unwrap();
        let mut command = attune();
        command
            .args(["serve", "--port", &port.to_string(), "--config"])
            .arg(config.path());
        // A config that lists its own models keeps them; otherwise serve the default model.
        if !config_toml.contains("[[models]]") {
            command.args(["--model", model.to_str().unwrap()]);
        }
        let child = command
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("attune serve starts");
        let mut server = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            _config: Some(config),
        };
        let api_key = extra
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| extra[i + 1]);
        server.wait_ready(api_key);
        server
    }

    fn wait_ready(&mut self, api_key: Option<&str>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                panic!("attune serve exited early with {status}");
            }
            let mut request = agent().get(&format!("{}/ready", self.base));
            if let Some(key) = api_key {
                request = request.header("authorization", &format!("Bearer {key}"));
            }
            if let Ok(r) = request.call() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("attune serve did not become ready within 120 s");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON and returns (status, body as JSON).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let mut r = agent()
            .post(&self.url(path))
            .send_json(body)
            .expect("request reaches the server");
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (status, json)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let mut r = agent()
            .get(&self.url(path))
            .call()
            .expect("request reaches the server");
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    /// POSTs a streaming request and returns the `data:` payloads in order.
    pub fn stream(&self, path: &str, body: &serde_json::Value) -> Vec<String> {
        let mut r = agent()
            .post(&self.url(path))
            .send_json(body)
            .expect("request reaches the server");
        assert_eq!(r.status().as_u16(), 200);
        let text = r.body_mut().read_to_string().unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        sigterm_and_wait(&mut self.child.take().expect("running"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            sigterm_and_wait(child);
        }
    }
}

fn sigterm_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An HTTP client that returns 4xx/5xx responses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(300)))
        .build()
        .into()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
