//! Python virtual environments of the benchmarks' comparison sides.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// A Python virtual environment for a benchmark's comparison side (implicit, FastAPI, …),
/// created once and reused while its requirements stay the same.
#[derive(Clone, Debug)]
pub struct Venv {
    /// The venv directory.
    pub dir: PathBuf,
    /// Interpreter that creates it.
    pub python: String,
    /// `pip install` arguments.
    pub requirements: Vec<String>,
}

impl Venv {
    fn python_bin(&self) -> PathBuf {
        self.dir.join("bin").join("python")
    }

    /// Creates the venv and installs the requirements unless a previous run did so already.
    pub fn ensure(&self) -> anyhow::Result<PathBuf> {
        let marker = self.dir.join(".recsys-bench-requirements");
        let wanted = self.requirements.join(" ");
        if std::fs::read_to_string(&marker).is_ok_and(|s| s == wanted) && self.python_bin().exists()
        {
            return Ok(self.python_bin());
        }
        eprintln!(
            "creating {} with {wanted} (once per version)",
            self.dir.display()
        );
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let status = Command::new(&self.python)
            .args(["-m", "venv", "--clear"])
            .arg(&self.dir)
            .status()
            .with_context(|| format!("running {} -m venv", self.python))?;
        if !status.success() {
            bail!("{} -m venv failed: {status}", self.python);
        }
        let status = Command::new(self.python_bin())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&self.requirements)
            .status()
            .context("running pip install")?;
        if !status.success() {
            bail!("pip install {wanted} failed: {status}");
        }
        std::fs::write(&marker, &wanted)?;
        Ok(self.python_bin())
    }
}
