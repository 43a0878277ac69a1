//! `agentctl`: submit tasks and inspect them.
//!
//! Submitting goes straight to RabbitMQ, like any agent platform would (`AGENTCTL_AMQP_URL`);
//! `--wait` listens on RabbitMQ's direct reply-to. Reading tasks goes through the service's HTTP
//! API (`AGENTCTL_SERVER`, `AGENTCTL_TOKEN`). Exit status: 0 when the command did what it said
//! (and, with `--wait`, the task succeeded), 1 when a waited-for task did not succeed, 2 for
//! usage and connection errors, 3 when `wait --timeout` passed first.
//!
//! # Layout
//! - `settings`: flags, then env, then the config file (pure precedence, thin file reading).
//! - `submit`, `batch_submit` (with the pure `jsonl`): publishing tasks over AMQP.
//! - `wait`, `batch`: polling and exporting through the task API.
//! - `style`, `escape`: what reaches a terminal: colours, progress bars, escaped tenant text.

mod batch;
mod batch_submit;
mod escape;
mod jsonl;
mod settings;
mod style;
mod submit;
mod wait;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::domain::quantity::{format_cpu, format_memory};
use crate::http::{ApplyResult, BatchCancelAnswer, CancelAnswer, CreatedToken, ErrorBody, SqlRole, TaskPage, TaskView};
use crate::store::{Position, TaskSummary, TenantStatus, TokenInfo};

/// agentctl: submit untrusted code to AgentTask and inspect its tasks.
///
/// Examples:
///   agentctl submit --tenant acme -c 'print(1)' --wait
///   agentctl submit --tenant acme analysis.R --wait -o json
///   agentctl get 6f1c0e8a-...            (needs AGENTCTL_TOKEN)
///   agentctl batch submit tasks.jsonl --tenant acme --batch eval-42
///   agentctl wait --tenant acme --batch eval-42
///   agentctl position 6f1c0e8a-...
///   agentctl cancel 6f1c0e8a-...
///   agentctl tenant apply -f tenants.toml
///   agentctl tenant token create acme  (prints acme's new API token once)
///
/// Settings: a flag, else its AGENTCTL_* variable, else the same key (server, token, tenant,
/// amqp_url) in $XDG_CONFIG_HOME/agentctl/config.toml (~/.config/agentctl/config.toml).
/// NO_COLOR=1 turns colours off.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
pub struct Cli {
    /// Base URL of the service's HTTP API [default: http://127.0.0.1:9464]
    #[arg(long = "server", global = true, env = "AGENTCTL_SERVER", value_name = "URL")]
    pub server_arg: Option<String>,
    /// The API's base URL in effect (from `--server`, the env, the config file or the default).
    #[arg(skip)]
    pub server: String,
    /// API token (a tenant's, or the service's admin token)
    #[arg(long, global = true, env = "AGENTCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Tenant to act as
    #[arg(long, global = true, env = "AGENTCTL_TENANT")]
    pub tenant: Option<String>,
    /// RabbitMQ URL used to submit [default: the service's default]
    #[arg(long = "amqp-url", global = true, env = "AGENTCTL_AMQP_URL", value_name = "URL")]
    pub amqp_url_arg: Option<String>,
    /// The RabbitMQ URL in effect (from `--amqp-url`, the env, the config file or the default).
    #[arg(skip)]
    pub amqp_url: String,
    /// Output format: table (for people, the default), json or yaml (for programs); jsonl or csv
    /// for `batch results`; for `artifacts`, the directory to write into
    #[arg(short = 'o', long = "output", global = true, value_name = "FORMAT|DIR")]
    pub output_arg: Option<String>,
    /// The format `-o` names (resolved once the command is known: `artifacts` takes a directory).
    #[arg(skip)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// The shells `agentctl completion` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
    /// One JSON result per line (`batch results` only)
    Jsonl,
    /// Comma-separated values with a header (`batch results` only)
    Csv,
}

// Parsed once per run of agentctl: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Submit code as a task (from FILE, -c CODE, or standard input).
    ///
    /// With --wait, prints the program's stdout, its stderr to stderr, and a status line;
    /// exits 0 only if the task succeeded.
    Submit(submit::SubmitArgs),
    /// Show one task: by task id, or by your client id with --tenant.
    Get {
        /// Task id (uuid) or client id
        id: String,
    },
    /// List tasks, newest first (of --tenant; a tenant's token lists its own tenant only).
    ///
    /// Examples: agentctl list --tenant acme --batch eval-42 --phase Failed,Cancelled
    ///           agentctl list --label team=search --since 2026-11-27T00:00:00Z -o json
    List(ListArgs),
    /// Wait until a task, or every task of a batch, is finished (polling the API; a progress
    /// bar on a terminal). -o json prints the final status.
    ///
    /// Examples: agentctl wait 6f1c0e8a-...    agentctl wait --tenant acme --batch eval-42 --timeout 600
    Wait(wait::WaitArgs),
    /// Show a queued task's place in its tenant's queue and an estimate of the wait.
    Position {
        /// Task id (uuid)
        id: String,
    },
    /// Print a task's stdout; with -f, follow it while the task runs and return when it ends.
    ///
    /// On a terminal, control characters in the output are shown escaped; piped, the output is
    /// passed on as the task wrote it. Works for every backend.
    ///
    /// Examples: agentctl logs 6f1c0e8a-...    agentctl logs -f 6f1c0e8a-... | tee run.log
    Logs {
        /// Task id (uuid)
        id: String,
        /// Keep printing the output as the task writes it, until it ends
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Print a shell completion script.
    ///
    /// Examples: agentctl completion bash > ~/.local/share/bash-completion/completions/agentctl
    ///           agentctl completion zsh > "${fpath[1]}/_agentctl"
    ///           agentctl completion fish > ~/.config/fish/completions/agentctl.fish
    Completion {
        /// bash, zsh or fish
        shell: CompletionShell,
    },
    /// Download a finished task's artifacts into the directory given with -o, checking each
    /// one's sha256; prints what it wrote.
    ///
    /// Example: agentctl artifacts 6f1c0e8a-... -o ./out
    Artifacts {
        /// Task id (uuid)
        id: String,
    },
    /// Cancel a task, or with --batch every unfinished task of a batch (of --tenant).
    ///
    /// A task that has not started ends Cancelled without running; a running one is killed.
    /// Either way it gets exactly one result, with phase and reason Cancelled. Exits 1 when the
    /// task had already finished.
    ///
    /// Examples: agentctl cancel 6f1c0e8a-...    agentctl cancel --tenant acme --batch eval-42
    Cancel {
        /// Task id (uuid)
        #[arg(required_unless_present = "batch", conflicts_with = "batch")]
        id: Option<String>,
        /// Cancel every unfinished task of this batch (needs --tenant or AGENTCTL_TENANT)
        // Not `requires = "tenant"`: clap would not see a global --tenant given before the
        // subcommand, nor AGENTCTL_TENANT; `cancel` checks it instead.
        #[arg(long)]
        batch: Option<String>,
    },
    /// A batch of tasks: submit one from a JSONL file, its status, its results.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Tenants and their quotas (admin token needed).
    #[command(subcommand)]
    Tenant(TenantCommand),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only this batch
    #[arg(long)]
    pub batch: Option<String>,
    /// Only these phases (comma-separated, e.g. Failed,Cancelled)
    #[arg(long)]
    pub phase: Option<String>,
    /// Only tasks with this label KEY=VALUE (repeatable: all must match)
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Only tasks submitted at or after this time (RFC 3339)
    #[arg(long)]
    pub since: Option<String>,
    /// Only tasks submitted before this time (RFC 3339)
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many tasks [default: all]
    #[arg(long)]
    pub limit: Option<u64>,
}

/// See `agentctl tenant apply --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RemovedTasks {
    Keep,
    Cancel,
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Make a tenants file the configuration of every running process, without a restart.
    /// Queued tasks are kept. The file is checked whole first; nothing changes if it is invalid.
    Apply {
        /// The tenants file (TOML), as in deploy/tenants.example.toml
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        /// Tasks not yet started of tenants the file no longer has: keep them queued until the
        /// tenant comes back, or cancel them (each gets a Cancelled result)
        #[arg(long, value_enum, default_value = "keep")]
        removed: RemovedTasks,
    },
    /// List tenants with their weight, concurrency and current load.
    List,
    /// Show one tenant's quotas and load.
    Get { name: String },
    /// Create TENANT's read-only Postgres role (or give it a new password) and print its
    /// connection string. The role reads agenttask.task_results, batch_summary and tenant_usage,
    /// only TENANT's rows (row-level security), and no table.
    SqlRole { tenant: String },
    /// A tenant's API tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
pub enum BatchCommand {
    /// Submit every line of a JSONL file as a task of batch --batch (of --tenant), over AMQP with
    /// publisher confirms. The whole file is checked first. Running it again resumes: tasks
    /// already accepted are skipped.
    ///
    /// Example: agentctl batch submit tasks.jsonl --tenant acme --batch eval-42
    Submit(batch_submit::SubmitArgs),
    /// Counts by phase and duration percentiles of batch BATCH (of --tenant).
    Status { batch: String },
    /// Every task's result of batch BATCH (of --tenant), oldest first: -o jsonl (the result
    /// messages, one per line; the default) or -o csv (one row per task, the result as JSON text).
    Results { batch: String },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create an API token for TENANT and print it. It is shown only this once (only its hash is
    /// kept): give it to the tenant as their AGENTCTL_TOKEN.
    Create { tenant: String },
    /// List tokens (of TENANT, or of every tenant): id, tenant, created, last used, revoked.
    List { tenant: Option<String> },
    /// Revoke a token by its id (from `token list`): it authenticates nothing from now on.
    Revoke { id: String },
}

/// A failure of agentctl itself (not of a task), with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// What was typed or given cannot be used (arguments, input files).
    #[error("{0}")]
    Usage(String),
    /// The service's API or RabbitMQ cannot be reached (the message says which setting).
    #[error("{0}")]
    Unreachable(String),
    /// The API answered with an error body.
    #[error("{status}: {message} ({code})")]
    Api { status: reqwest::StatusCode, code: String, message: String },
    /// RabbitMQ refused or failed the submit.
    #[error("{0}")]
    Broker(String),
    /// An answer agentctl cannot read, or local I/O failing.
    #[error("{0}")]
    Unexpected(String),
}

impl From<serde_json::Error> for CtlError {
    fn from(e: serde_json::Error) -> Self {
        CtlError::Unexpected(e.to_string())
    }
}

impl From<std::io::Error> for CtlError {
    fn from(e: std::io::Error) -> Self {
        CtlError::Unexpected(e.to_string())
    }
}

impl From<reqwest::Error> for CtlError {
    fn from(e: reqwest::Error) -> Self {
        CtlError::Unreachable(e.to_string())
    }
}

impl From<lapin::Error> for CtlError {
    fn from(e: lapin::Error) -> Self {
        CtlError::Broker(e.to_string())
    }
}

pub fn main() -> ExitCode {
    // Like any Unix filter: `agentctl get ID | head` ends quietly when the reader goes away,
    // instead of panicking on a broken pipe (Rust ignores SIGPIPE by default).
    // SAFETY: restoring the default disposition of one signal, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    crate::amqp::reserve_parser_stack();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_stack_size(crate::amqp::THREAD_STACK_BYTES)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Error messages may quote tenant-supplied text (ids, names).
            eprintln!("error: {}", escape::line(&e.to_string()));
            ExitCode::from(2)
        }
    }
}

async fn run(mut cli: Cli) -> Result<ExitCode, CtlError> {
    if !matches!(cli.command, Command::Completion { .. }) {
        let resolved = settings::load(settings::Layer {
            server: cli.server_arg.take(),
            token: cli.token.take(),
            tenant: cli.tenant.take(),
            amqp_url: cli.amqp_url_arg.take(),
        })
        .map_err(CtlError::Usage)?;
        cli.server = resolved.server;
        cli.token = resolved.token;
        cli.tenant = resolved.tenant;
        cli.amqp_url = resolved.amqp_url;
    }
    if let (Some(raw), false) = (&cli.output_arg, matches!(cli.command, Command::Artifacts { .. })) {
        cli.output = <Output as ValueEnum>::from_str(raw, false).map_err(|_| {
            CtlError::Usage(format!(
                "-o {raw:?}: use table, json or yaml (jsonl or csv for `batch results`; a directory for `artifacts`)"
            ))
        })?;
    }
    let exports = matches!(cli.command, Command::Batch(BatchCommand::Results { .. }));
    if matches!(cli.output, Output::Jsonl | Output::Csv) && !exports {
        return Err(CtlError::Usage("-o jsonl and -o csv are for `batch results`; use -o json, yaml or table".into()));
    }
    if matches!(cli.output, Output::Json | Output::Yaml) && exports {
        return Err(CtlError::Usage("`batch results` writes -o jsonl (the default) or -o csv".into()));
    }
    match &cli.command {
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "agentctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(args) => submit::run(&cli, args).await,
        Command::Get { id } => get(&cli, id).await,
        Command::List(args) => list(&cli, args).await,
        Command::Wait(args) => wait::run(&cli, args).await,
        Command::Position { id } => position(&cli, id).await,
        Command::Logs { id, follow } => logs(&cli, id, *follow).await,
        Command::Artifacts { id } => artifacts(&cli, id).await,
        Command::Cancel { id, batch } => cancel(&cli, id.as_deref(), batch.as_deref()).await,
        Command::Tenant(cmd) => tenant(&cli, cmd).await,
        Command::Batch(cmd) => batch::run(&cli, cmd).await,
    }
}

async fn cancel(cli: &Cli, id: Option<&str>, batch: Option<&str>) -> Result<ExitCode, CtlError> {
    let base = cli.server.trim_end_matches('/');
    if let Some(batch) = batch {
        let tenant = cli
            .tenant
            .as_deref()
            .ok_or_else(|| CtlError::Usage("--batch needs --tenant (or AGENTCTL_TENANT)".into()))?;
        let url = format!("{base}/v1/batches/{}/{}/cancel", encode(tenant), encode(batch));
        let answer: BatchCancelAnswer = api(cli, reqwest::Method::POST, &url, None).await?;
        match cli.output {
            Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &answer)?,
            Output::Table => println!(
                "batch {batch} of tenant {tenant}: {} cancelled before running, {} being stopped",
                answer.cancelled, answer.stopping
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = id.expect("clap requires an id without --batch");
    let url = format!("{base}/v1/tasks/{}/cancel", encode(id));
    match api::<CancelAnswer>(cli, reqwest::Method::POST, &url, None).await {
        Ok(answer) => {
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &answer)?,
                Output::Table => println!("task {}: {}", answer.task_id, answer.message),
            }
            Ok(ExitCode::SUCCESS)
        }
        // Already finished: nothing was cancelled, so the command did not do what it said.
        Err(e @ CtlError::Api { status: reqwest::StatusCode::CONFLICT, .. }) => {
            eprintln!("{}", escape::line(&e.to_string()));
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e),
    }
}

/// Follows the API's cursors until every matching task (or `--limit` of them) is read.
async fn list(cli: &Cli, args: &ListArgs) -> Result<ExitCode, CtlError> {
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(t) = &cli.tenant {
        query.push(("tenant", t.clone()));
    }
    for (k, v) in [("batch", &args.batch), ("phase", &args.phase), ("since", &args.since), ("until", &args.until)] {
        if let Some(v) = v {
            query.push((k, v.clone()));
        }
    }
    for l in &args.labels {
        query.push(("label", l.clone()));
    }
    let items = list_all(cli, &query, args.limit).await?;
    match cli.output {
        Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &items)?,
        Output::Table => println!("{}", task_table(&items, style::stdout_colour())),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every task `GET /v1/tasks` lists for `query` (or the first `limit`), following its cursors.
pub(crate) async fn list_all(
    cli: &Cli,
    query: &[(&str, String)],
    limit: Option<u64>,
) -> Result<Vec<TaskSummary>, CtlError> {
    const PAGE: u64 = 500;
    let mut items: Vec<TaskSummary> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let want = limit.map_or(PAGE, |l| (l - items.len() as u64).min(PAGE));
        if want == 0 {
            break;
        }
        let mut q = query.to_vec();
        q.push(("limit", want.to_string()));
        if let Some(c) = cursor.take() {
            q.push(("cursor", c));
        }
        let qs: Vec<String> = q.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let url = format!("{}/v1/tasks?{}", cli.server.trim_end_matches('/'), qs.join("&"));
        let page: TaskPage = api(cli, reqwest::Method::GET, &url, None).await?;
        items.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(items)
}

async fn logs(cli: &Cli, id: &str, follow: bool) -> Result<ExitCode, CtlError> {
    use std::io::{IsTerminal as _, Write as _};
    let url = format!("{}/v1/tasks/{}/logs?follow={follow}", cli.server.trim_end_matches('/'), encode(id));
    let mut resp = send(cli, reqwest::Method::GET, &url, None).await?;
    let terminal = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    // A chunk may end inside a UTF-8 character: what is not yet whole waits for the next one.
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if !terminal {
            out.write_all(&chunk)?;
            out.flush()?;
            continue;
        }
        pending.extend_from_slice(&chunk);
        let whole = match std::str::from_utf8(&pending) {
            Ok(_) => pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        let text = String::from_utf8_lossy(&pending[..whole]).into_owned();
        write!(out, "{}", escape::block(&text))?;
        out.flush()?;
        pending.drain(..whole);
    }
    if !pending.is_empty() {
        write!(out, "{}", escape::block(&String::from_utf8_lossy(&pending)))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `list` for people: one line per task, kubectl-style.
fn task_table(items: &[TaskSummary], colour: bool) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(["TASK", "ID", "TENANT", "BATCH", "PHASE", "REASON", "SUBMITTED", "DURATION"].map(|h| {
        if h == "PHASE" {
            style::phase_header(h, colour)
        } else {
            h.to_owned()
        }
    }));
    let opt = |o: &Option<String>| o.as_deref().map_or_else(|| "-".into(), |s| escape::line(s).into_owned());
    for t in items {
        table.add_row([
            t.task_id.to_string(),
            opt(&t.id),
            escape::line(&t.tenant).into_owned(),
            opt(&t.batch_id),
            style::phase(t.phase, colour),
            t.reason.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            t.submitted_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            t.duration_ms.map(|ms| format!("{ms}ms")).unwrap_or_else(|| "-".into()),
        ]);
    }
    if let Some(c) = table.column_mut(7) {
        c.set_cell_alignment(comfy_table::CellAlignment::Right);
    }
    table
}

/// Where artifact `name` goes under `dir`, if it is a plain relative path (the service records
/// only such names; this does not trust it to).
fn artifact_path(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    use std::path::Component;
    let rel = std::path::Path::new(name);
    let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    plain.then(|| dir.join(rel))
}

async fn artifacts(cli: &Cli, id: &str) -> Result<ExitCode, CtlError> {
    use sha2::Digest as _;
    use std::io::Write as _;
    let dir = cli
        .output_arg
        .as_deref()
        .map(std::path::PathBuf::from)
        .ok_or_else(|| CtlError::Usage("say where to put the artifacts: agentctl artifacts ID -o DIR".into()))?;
    let base = cli.server.trim_end_matches('/');
    let view: TaskView = api(cli, reqwest::Method::GET, &format!("{base}/v1/tasks/{}", encode(id)), None).await?;
    let task_id = view.result.task_id;
    if view.result.artifacts.is_empty() {
        eprintln!("task {task_id} has no artifacts");
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&dir).map_err(|e| CtlError::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(["NAME", "SIZE", "PATH"]);
    for a in &view.result.artifacts {
        let Some(path) = artifact_path(&dir, &a.name) else {
            return Err(CtlError::Unexpected(format!(
                "refusing artifact name {:?}: not a plain relative path",
                a.name
            )));
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let segments: Vec<String> = a.name.split('/').map(encode).collect();
        let url = format!("{base}/v1/tasks/{task_id}/artifacts/{}", segments.join("/"));
        let mut resp = send(cli, reqwest::Method::GET, &url, None).await?;
        // Written beside its place and renamed once whole and checked: no half file is left.
        let partial = path.with_extension("agentctl-partial");
        let mut file = std::fs::File::create(&partial)?;
        let mut hash = sha2::Sha256::new();
        while let Some(chunk) = resp.chunk().await? {
            hash.update(&chunk);
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        let got = format!("{:x}", hash.finalize());
        if got != a.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(CtlError::Unexpected(format!(
                "artifact {:?} arrived with sha256 {got}, not {}; nothing was kept",
                a.name, a.sha256
            )));
        }
        std::fs::rename(&partial, &path)?;
        table.add_row([
            escape::line(&a.name).into_owned(),
            a.size.to_string(),
            escape::line(&path.display().to_string()).into_owned(),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

async fn position(cli: &Cli, id: &str) -> Result<ExitCode, CtlError> {
    let url = format!("{}/v1/tasks/{}/position", cli.server.trim_end_matches('/'), encode(id));
    let p: Position = api(cli, reqwest::Method::GET, &url, None).await?;
    match cli.output {
        Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &p)?,
        Output::Table => match p.position {
            Some(pos) => {
                let wait = p
                    .estimated_wait_seconds
                    .map(|s| format!("about {}", human_seconds(s)))
                    .unwrap_or_else(|| "unknown (nothing admitted for this tenant in the last 5 minutes)".into());
                println!(
                    "task {} is #{pos} of {} queued for tenant {}; estimated wait: {wait}",
                    p.task_id, p.queued, p.tenant
                );
            }
            None => println!("task {} is not queued (phase {})", p.task_id, p.phase),
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn human_seconds(s: f64) -> String {
    match s {
        s if s < 90.0 => format!("{s:.0}s"),
        s if s < 5400.0 => format!("{:.0}m", s / 60.0),
        s => format!("{:.1}h", s / 3600.0),
    }
}

async fn tenant(cli: &Cli, cmd: &TenantCommand) -> Result<ExitCode, CtlError> {
    let base = format!("{}/v1/tenants", cli.server.trim_end_matches('/'));
    match cmd {
        TenantCommand::Apply { file, removed } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", file.display())))?;
            // Check locally first, for an error that names the line before any network trip.
            crate::domain::tenant::parse_tenants(&text)
                .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?;
            let url = format!(
                "{base}?removed={}",
                match removed {
                    RemovedTasks::Keep => "keep",
                    RemovedTasks::Cancel => "cancel",
                }
            );
            let r: ApplyResult = api(cli, reqwest::Method::PUT, &url, Some(text)).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &r)?,
                Output::Table => {
                    println!("applied {} tenants: {}", r.tenants.len(), r.tenants.join(", "));
                    if *removed == RemovedTasks::Cancel {
                        println!("cancelled {} unstarted tasks of removed tenants", r.cancelled);
                    }
                }
            }
        }
        TenantCommand::List => {
            let list: Vec<TenantStatus> = api(cli, reqwest::Method::GET, &base, None).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &list)?,
                Output::Table => println!("{}", tenant_table(&list)),
            }
        }
        TenantCommand::Get { name } => {
            let t: TenantStatus = api(cli, reqwest::Method::GET, &format!("{base}/{}", encode(name)), None).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &t)?,
                Output::Table => {
                    let p = &t.policy;
                    println!("TENANT                  {}", t.tenant);
                    println!("WEIGHT                  {}", p.weight);
                    println!("MAX CONCURRENCY         {}", p.max_concurrency);
                    println!("MAX QUEUED              {}", p.max_queued);
                    println!("RATE / BURST            {}/s, burst {}", p.rate_per_second, p.burst);
                    println!("TIMEOUT default / max   {}s / {}s", p.default_timeout_seconds, p.max_timeout_seconds);
                    println!(
                        "CPU default / max       {} / {}",
                        format_cpu(p.default_cpu_millis),
                        format_cpu(p.max_cpu_millis)
                    );
                    println!(
                        "MEMORY default / max    {} / {}",
                        format_memory(p.default_memory_bytes),
                        format_memory(p.max_memory_bytes)
                    );
                    println!("MAX CODE BYTES          {}", p.max_code_bytes);
                    println!("ISOLATION               {}", p.isolation.join(", "));
                    println!("QUEUED / RUNNING        {} / {}", t.queued, t.running);
                    println!("ADMITTED LAST MINUTE    {}", t.admitted_last_minute);
                }
            }
        }
        TenantCommand::Token(cmd) => return token(cli, cmd).await,
        TenantCommand::SqlRole { tenant } => {
            let url = format!("{base}/{}/sql-role", encode(tenant));
            let r: SqlRole = api(cli, reqwest::Method::POST, &url, None).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &r)?,
                Output::Table => {
                    println!("{}", r.connection_string);
                    eprintln!(
                        "role {} of tenant {}: the password is shown only now (running this again sets a new one). \
                         Try: psql '<that string>' -c 'select * from agenttask.batch_summary'",
                        r.role,
                        escape::line(&r.tenant)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn token(cli: &Cli, cmd: &TokenCommand) -> Result<ExitCode, CtlError> {
    let base = cli.server.trim_end_matches('/');
    match cmd {
        TokenCommand::Create { tenant } => {
            let url = format!("{base}/v1/tenants/{}/tokens", encode(tenant));
            let created: CreatedToken = api(cli, reqwest::Method::POST, &url, None).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &created)?,
                Output::Table => {
                    // The token alone on stdout (for `$(...)`); the note on stderr.
                    println!("{}", created.token);
                    eprintln!(
                        "token {} for tenant {}: shown only now; use it as AGENTCTL_TOKEN. \
                         Revoke it with `agentctl tenant token revoke {}`.",
                        created.info.id,
                        escape::line(&created.info.tenant),
                        created.info.id
                    );
                }
            }
        }
        TokenCommand::List { tenant } => {
            let mut url = format!("{base}/v1/tokens");
            if let Some(t) = tenant {
                url.push_str(&format!("?tenant={}", encode(t)));
            }
            let list: Vec<TokenInfo> = api(cli, reqwest::Method::GET, &url, None).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &list)?,
                Output::Table => println!("{}", token_table(&list)),
            }
        }
        TokenCommand::Revoke { id } => {
            let url = format!("{base}/v1/tokens/{}", encode(id));
            let info: TokenInfo = api(cli, reqwest::Method::DELETE, &url, None).await?;
            match cli.output {
                Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &info)?,
                Output::Table => println!("token {} of tenant {} revoked", info.id, escape::line(&info.tenant)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tenant token list` for people.
fn token_table(list: &[TokenInfo]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(["ID", "TENANT", "CREATED", "LAST USED", "REVOKED"]);
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into())
    };
    for t in list {
        table.add_row([
            t.id.to_string(),
            escape::line(&t.tenant).into_owned(),
            time(Some(t.created_at)),
            time(t.last_used_at),
            time(t.revoked_at),
        ]);
    }
    table
}

async fn get(cli: &Cli, id: &str) -> Result<ExitCode, CtlError> {
    let mut url = format!("{}/v1/tasks/{}", cli.server.trim_end_matches('/'), encode(id));
    if let Some(t) = &cli.tenant {
        url.push_str(&format!("?tenant={}", encode(t)));
    }
    let view: TaskView = api(cli, reqwest::Method::GET, &url, None).await?;
    match cli.output {
        Output::Json | Output::Jsonl | Output::Csv | Output::Yaml => print_data(cli, &view)?,
        Output::Table => print_task(&view, style::stdout_colour()),
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends a request with the token; an error answer becomes [`CtlError::Api`].
async fn send(
    cli: &Cli,
    method: reqwest::Method,
    url: &str,
    body: Option<String>,
) -> Result<reqwest::Response, CtlError> {
    let client = reqwest::Client::new();
    let mut req = client.request(method, url);
    if let Some(body) = body {
        req = req.body(body);
    }
    if let Some(token) = &cli.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(|e| {
        CtlError::Unreachable(format!(
            "cannot reach the AgentTask API at {}: {e}. Is `agenttask serve` running? (set AGENTCTL_SERVER)",
            cli.server
        ))
    })?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            code: "unknown".into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
        });
        return Err(CtlError::Api { status, code: body.code, message: body.message });
    }
    Ok(resp)
}

pub(crate) async fn api<T: serde::de::DeserializeOwned>(
    cli: &Cli,
    method: reqwest::Method,
    url: &str,
    body: Option<String>,
) -> Result<T, CtlError> {
    let bytes = send(cli, method, url, body).await?.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| CtlError::Unexpected(format!("unexpected answer from {url}: {e}")))
}

/// `tenant list` for people: kubectl-style columns (no borders), numbers right-aligned.
fn tenant_table(list: &[TenantStatus]) -> comfy_table::Table {
    use comfy_table::{CellAlignment, Table};
    let mut table = Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(["TENANT", "WEIGHT", "MAXCONC", "QUEUED", "RUNNING", "ADMIT/MIN"]);
    for t in list {
        table.add_row([
            escape::line(&t.tenant).into_owned(),
            t.policy.weight.to_string(),
            t.policy.max_concurrency.to_string(),
            t.queued.to_string(),
            t.running.to_string(),
            t.admitted_last_minute.to_string(),
        ]);
    }
    for i in 1..6 {
        if let Some(c) = table.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Prints what a command answered for programs: pretty JSON, or YAML with `-o yaml`.
pub(crate) fn print_data<T: serde::Serialize>(cli: &Cli, value: &T) -> Result<(), CtlError> {
    match cli.output {
        Output::Yaml => {
            print!("{}", serde_saphyr::to_string(value).map_err(|e| CtlError::Unexpected(e.to_string()))?)
        }
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// Percent-encodes a path or query component.
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_task(v: &TaskView, colour: bool) {
    let r = &v.result;
    // Everything a tenant's message or program can set is escaped for the terminal.
    let opt = |o: &Option<String>| o.as_deref().map_or_else(|| "-".into(), |s| escape::line(s).into_owned());
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
    println!("TASK        {}", r.task_id);
    println!("ID          {}", opt(&r.id));
    println!("TENANT      {}", escape::line(&r.tenant));
    println!("BATCH       {}", opt(&r.batch_id));
    println!("LANGUAGE    {}", opt(&v.language));
    println!("PHASE       {}", style::phase(r.phase, colour));
    println!("REASON      {}", r.reason.map(|r| r.to_string()).unwrap_or_else(|| "-".into()));
    println!("MESSAGE     {}", opt(&r.message));
    println!("EXIT CODE   {}", r.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()));
    println!("BACKEND     {}", opt(&r.backend));
    println!("SUBMITTED   {}", r.submitted_at.to_rfc3339());
    println!("ADMITTED    {}", time(r.admitted_at));
    println!("STARTED     {}", time(r.started_at));
    println!("FINISHED    {}", time(r.finished_at));
    if let Some(ms) = r.duration_ms {
        println!("DURATION    {ms} ms");
    }
    if let Some(result) = &r.result {
        println!("RESULT      {}", escape::line(&result.to_string()));
    }
    for a in &r.artifacts {
        println!("ARTIFACT    {} ({} bytes, sha256 {})", escape::line(&a.name), a.size, escape::line(&a.sha256));
    }
    if !r.stdout.is_empty() {
        println!(
            "--- stdout{} ---\n{}",
            if r.stdout_truncated { " (truncated)" } else { "" },
            escape::block(r.stdout.trim_end())
        );
    }
    if !r.stderr.is_empty() {
        println!(
            "--- stderr{} ---\n{}",
            if r.stderr_truncated { " (truncated)" } else { "" },
            escape::block(r.stderr.trim_end())
        );
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn completion_scripts_know_every_command_and_bash_parses_its_own() {
        use clap::CommandFactory as _;
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "agentctl", &mut out);
            let text = String::from_utf8(out).unwrap();
            for cmd in ["submit", "wait", "logs", "artifacts", "cancel", "tenant", "batch", "completion"] {
                assert!(text.contains(cmd), "{shell:?} completion lacks {cmd}");
            }
            if shell == clap_complete::Shell::Bash {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("agentctl.bash");
                std::fs::write(&file, &text).unwrap();
                let status = std::process::Command::new("bash").arg("-n").arg(&file).status().unwrap();
                assert!(status.success(), "bash -n refused the bash completion");
            }
        }
    }

    use super::*;
    use crate::domain::tenant::TenantPolicy;

    #[test]
    fn the_tenant_table_has_a_header_and_one_aligned_row_per_tenant() {
        let status = |tenant: &str, queued| TenantStatus {
            tenant: tenant.into(),
            policy: TenantPolicy::default(),
            queued,
            running: 2,
            admitted_last_minute: 7,
        };
        let text = tenant_table(&[status("acme", 12345), status("a-much-longer-tenant-name", 1)]).to_string();
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].trim_start().starts_with("TENANT") && lines[0].ends_with("ADMIT/MIN"), "{text}");
        assert!(lines[1].trim_start().starts_with("acme") && lines[1].contains("12345"), "{text}");
        // Right-aligned numbers end in the same column as their header.
        let ends = |l: &str| -> Vec<usize> {
            let b = l.as_bytes();
            (0..b.len()).filter(|&i| b[i] != b' ' && (i + 1 == b.len() || b[i + 1] == b' ')).map(|i| i + 1).collect()
        };
        let (h, r1, r2) = (ends(lines[0]), ends(lines[1]), ends(lines[2]));
        assert_eq!((h.len(), r1.len(), r2.len()), (6, 6, 6), "{text}");
        assert_eq!((&h[1..], &r1[1..]), (&r2[1..], &r2[1..]), "{text}");
    }

    #[test]
    fn the_task_list_table_is_exactly_this() {
        use crate::domain::phase::{Phase, Reason};
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let task = |n: u128, id: Option<&str>, phase, reason, duration_ms| TaskSummary {
            task_id: uuid::Uuid::from_u128(n),
            id: id.map(str::to_owned),
            tenant: "acme".into(),
            batch_id: Some("eval-42".into()),
            language: Some("python".into()),
            phase,
            reason,
            exit_code: None,
            labels: serde_json::json!({}),
            submitted_at: at,
            started_at: None,
            finished_at: None,
            duration_ms,
        };
        let table = task_table(
            &[
                task(1, Some("k1"), Phase::Succeeded, None, Some(1234)),
                task(2, None, Phase::Failed, Some(Reason::NonZeroExit), Some(5)),
                task(3, Some("evil\x1b[2J"), Phase::Queued, None, None),
            ],
            false,
        );
        let text: Vec<String> = table.to_string().lines().map(|l| l.trim_end().to_owned()).collect();
        assert_eq!(
            text,
            [
                " TASK                                  ID           TENANT  BATCH    PHASE      REASON       SUBMITTED            DURATION",
                " 00000000-0000-0000-0000-000000000001  k1           acme    eval-42  Succeeded  -            2026-11-27 12:00:00    1234ms",
                " 00000000-0000-0000-0000-000000000002  -            acme    eval-42  Failed     NonZeroExit  2026-11-27 12:00:00       5ms",
                " 00000000-0000-0000-0000-000000000003  evil\\x1b[2J  acme    eval-42  Queued     -            2026-11-27 12:00:00         -",
            ]
        );
    }
}
