//! The local backend: runs a job under bubblewrap on this host.
//!
//! Baseline isolation: fresh namespaces (no network), the host visible read-only, a private
//! writable scratch directory as working directory, a clean environment, the wall-clock timeout
//! killing the whole sandbox (bwrap's pid namespace dies with its init), capped output.

use std::path::PathBuf;
use std::process::Stdio;


use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Backend, BoxFuture, Captured, Job, Outcome, ProgramResult, Termination};
use crate::domain::result::sanitize_output;
use crate::domain::task::Language;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Per-task scratch directories live under `<data_dir>/runs`.
    pub data_dir: PathBuf,
    /// Cap on each of stdout and stderr.
    pub output_limit_bytes: usize,
    pub bwrap: PathBuf,
    pub python: PathBuf,
    pub rscript: PathBuf,
}

impl LocalConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        LocalConfig {
            data_dir,
            output_limit_bytes: 1 << 20,
            bwrap: "/usr/bin/bwrap".into(),
            python: "/usr/bin/python3".into(),
            rscript: "/usr/bin/Rscript".into(),
        }
    }
}

pub struct LocalBackend {
    config: LocalConfig,
}

impl LocalBackend {
    pub fn new(config: LocalConfig) -> Result<Self, String> {
        if !config.bwrap.exists() {
            return Err(format!(
                "{} not found: install bubblewrap (deploy/local/install-sandbox.sh does it)",
                config.bwrap.display()
            ));
        }
        std::fs::create_dir_all(config.data_dir.join("runs")).map_err(|e| {
            format!("cannot create data directory {}: {e}", config.data_dir.display())
        })?;
        Ok(LocalBackend { config })
    }

    async fn run_job(&self, job: Job) -> Outcome {
        let started_at = Utc::now();
        let dir = self.config.data_dir.join("runs").join(job.task_id.to_string());
        let outcome = self.run_in(&dir, &job).await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        outcome.unwrap_or_else(|e| Outcome::backend_error(e, started_at))
    }

    async fn run_in(&self, dir: &std::path::Path, job: &Job) -> Result<Outcome, String> {
        let io = |e: std::io::Error| format!("preparing the sandbox: {e}");
        let work = dir.join("work");
        tokio::fs::create_dir_all(&work).await.map_err(io)?;
        for (name, bytes) in &job.files {
            tokio::fs::write(work.join(name), bytes).await.map_err(io)?;
        }
        let (main, runtime) = match job.language {
            Language::Python => ("main.py", self.config.python.clone()),
            Language::R => ("main.R", self.config.rscript.clone()),
        };
        tokio::fs::write(work.join(main), &job.code).await.map_err(io)?;

        let mut cmd = Command::new(&self.config.bwrap);
        cmd.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"])
            .arg("--bind").arg(&work).arg("/work")
            .args(["--chdir", "/work", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"])
            .args(["--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin"])
            .args(["--setenv", "HOME", "/work", "--setenv", "LANG", "C.UTF-8"])
            .args(["--setenv", "AGENTTASK_RESULT_FILE", "/work/.agenttask-result.json"])
            .args(["--setenv", "AGENTTASK_ARTIFACTS_DIR", "/work/artifacts"])
            .args(["--setenv", "AGENTTASK_TASK_ID"]).arg(job.task_id.to_string());
        for (k, v) in &job.env {
            cmd.arg("--setenv").arg(k).arg(v);
        }
        cmd.arg("--").arg(&runtime);
        match job.language {
            Language::Python => cmd.args(["-I", "-B", main]),
            Language::R => cmd.args(["--vanilla", main]),
        };
        cmd.args(&job.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started_at = Utc::now();
        let mut child = cmd.spawn().map_err(|e| format!("cannot start bwrap: {e}"))?;
        let mut stdin = child.stdin.take();
        let input = job.stdin.clone().unwrap_or_default();
        let feed = async move {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(input.as_bytes()).await;
            }
            drop(stdin);
        };
        let cap = self.config.output_limit_bytes;
        let out = read_capped(child.stdout.take(), cap);
        let err = read_capped(child.stderr.take(), cap);
        let run = async {
            let (_, out, err, status) = tokio::join!(feed, out, err, child.wait());
            (out, err, status)
        };
        let (termination, exit_code, stdout, stderr) = match tokio::time::timeout(job.timeout, run).await {
            Ok((out, err, status)) => {
                let status = status.map_err(|e| format!("waiting for the sandbox: {e}"))?;
                let code = status.code().or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    status.signal().map(|s| 128 + s)
                });
                let term = if out.truncated || err.truncated {
                    Termination::OutputLimitExceeded
                } else {
                    Termination::Exited
                };
                (term, code, out, err)
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                (Termination::TimedOut, None, Captured::default(), Captured::default())
            }
        };
        let result = read_result(&work.join(".agenttask-result.json")).await;
        Ok(Outcome {
            termination,
            exit_code,
            stdout,
            stderr,
            result,
            artifacts: Vec::new(),
            started_at,
            finished_at: Utc::now(),
        })
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn run(&self, job: Job) -> BoxFuture<'_, Outcome> {
        Box::pin(self.run_job(job))
    }
}

/// Reads a stream to its end, keeping at most `cap` bytes.
async fn read_capped<R: AsyncRead + Unpin>(stream: Option<R>, cap: usize) -> Captured {
    let Some(mut stream) = stream else {
        return Captured::default();
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut truncated = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                if n > room {
                    truncated = true;
                    break;
                }
            }
        }
    }
    Captured { text: sanitize_output(&kept), truncated }
}

async fn read_result(path: &std::path::Path) -> ProgramResult {
    const MAX_RESULT_BYTES: u64 = 1 << 20;
    match tokio::fs::symlink_metadata(path).await {
        Err(_) => ProgramResult::Missing,
        Ok(m) if !m.is_file() => ProgramResult::Invalid("it is not a regular file".into()),
        Ok(m) if m.len() > MAX_RESULT_BYTES => {
            ProgramResult::Invalid(format!("it is larger than {MAX_RESULT_BYTES} bytes"))
        }
        Ok(_) => match tokio::fs::read(path).await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => ProgramResult::Json(v),
                Err(e) => ProgramResult::Invalid(format!("it is not valid JSON: {e}")),
            },
            Err(e) => ProgramResult::Invalid(format!("it could not be read: {e}")),
        },
    }
}

