//! llama.cpp as a benchmark peer: its Python binding in a child process (installed by
//! `server/bench/setup-llama-cpp.sh`), fed the same prompt tokens as our own runs, one JSON line
//! per run.

use crate::bench::Speed;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

const SCRIPT: &str = include_str!("../bench/llama_cpp_peer.py");

pub struct LlamaCppPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LlamaCppPeer {
    /// Starts `python` (a venv with llama-cpp-python) on `gguf` and waits until it has loaded.
    pub fn start(python: &Path, gguf: &Path, decode_tokens: usize, threads: usize) -> Result<Self> {
        let mut child = Command::new(python)
            .arg("-c")
            .arg(SCRIPT)
            .arg(gguf)
            .arg(decode_tokens.to_string())
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (make it with server/bench/setup-llama-cpp.sh)",
                    python.display()
                )
            })?;
        let stdin = child.stdin.take().context("peer stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        let mut peer = Self {
            child,
            stdin,
            stdout,
        };
        peer.read_line().context("llama.cpp did not start")?;
        Ok(peer)
    }

    /// Prefill of `prompt`, then greedy decoding.
    pub fn run(&mut self, prompt: &[u32]) -> Result<Speed> {
        writeln!(self.stdin, "{}", serde_json::to_string(prompt)?)?;
        self.stdin.flush()?;
        Ok(serde_json::from_str(&self.read_line()?)?)
    }

    fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the llama.cpp peer exited (see its messages above)");
        }
        Ok(line)
    }
}

impl Drop for LlamaCppPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
