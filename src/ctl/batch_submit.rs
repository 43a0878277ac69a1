//! `agentctl batch submit FILE.jsonl`: publishes a file of tasks to the tenant's queue, with
//! publisher confirms, many in flight at once, resumably.
//!
//! Policy for bad lines: the whole file is checked before anything is published. If any line
//! is bad, every bad line is reported (`FILE:LINE: reason`) and nothing is submitted (exit 1),
//! unless `--skip-invalid`, which submits the good lines and reports the bad ones.
//!
//! Resuming: every line has an idempotency key (see [`super::jsonl`]). Before publishing, the
//! API is asked which keys the batch already has, and those lines are skipped; a line that was
//! published but not yet stored when that question was asked is dropped by the service's own
//! idempotency check, so running the command twice never makes a task twice.

use std::collections::HashSet;
use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use serde::Serialize;

use super::jsonl::{self, BadLine};
use super::{api, encode, escape, list_all, print_data, style, Cli, CtlError, Output};
use crate::amqp::TASKS_EXCHANGE;
use crate::domain::tenant::{TenantName, TenantPolicy};
use crate::store::TenantStatus;

/// Publishes in flight at once: enough to keep the broker busy, bounded so a huge file does not
/// hold every unconfirmed message in memory.
const IN_FLIGHT: usize = 512;
/// More tasks than this, on a terminal, are confirmed first (`--yes` skips the question).
const CONFIRM_ABOVE: usize = 100;

#[derive(Debug, Args)]
#[command(after_help = "Each line is one task message as in the AMQP contract (id, language, code, files, \
                        stdin, args, env, timeout_seconds, resources, priority, labels, isolation). The \
                        tenant and batch come from the flags. A line without an id gets BATCH:LINE as its \
                        idempotency key, so keep the file's lines in place between runs, or give ids.\n\n\
                        Exit status: 0 when every line was submitted or already accepted; 1 when some line \
                        is invalid (nothing is submitted unless --skip-invalid) or RabbitMQ refused a task; \
                        2 for usage and connection errors (re-running resumes where it stopped).")]
pub struct SubmitArgs {
    /// The tasks, one JSON object per line (`-` reads standard input)
    pub file: PathBuf,
    /// The batch id every task gets
    #[arg(long)]
    pub batch: String,
    /// Language of lines without one: python or r [default: python]
    #[arg(long = "lang", visible_alias = "language")]
    pub language: Option<String>,
    /// Submit the valid lines even if some are invalid (they are reported either way)
    #[arg(long)]
    pub skip_invalid: bool,
    /// Do not ask before submitting many tasks
    #[arg(short = 'y', long)]
    pub yes: bool,
}

/// What the command did, for `-o json|yaml`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    tenant: &'a str,
    batch: &'a str,
    /// Non-blank lines in the file.
    lines: usize,
    /// Published and confirmed by RabbitMQ in this run.
    submitted: usize,
    /// Already accepted by the service (an earlier run): not published again.
    skipped: usize,
    invalid: &'a [BadLine],
}

pub async fn run(cli: &Cli, args: &SubmitArgs) -> Result<ExitCode, CtlError> {
    let tenant_name = cli
        .tenant
        .as_deref()
        .ok_or_else(|| CtlError::Usage("a batch belongs to a tenant: pass --tenant (or set AGENTCTL_TENANT)".into()))?;
    let tenant = TenantName::parse(tenant_name).map_err(CtlError::Usage)?;
    let batch = args.batch.as_str();
    if !crate::domain::validate::is_valid_key(batch) {
        return Err(CtlError::Usage(format!("--batch {batch:?}: use 1-128 letters, digits, '.', '_', ':' or '-'")));
    }
    let language = args.language.as_deref().map(str::to_lowercase);
    if let Some(l) = &language {
        l.parse::<crate::domain::task::Language>().map_err(|e| CtlError::Usage(format!("--lang: {e}")))?;
    }
    let name = args.file.display().to_string();
    let text = if name == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.file).map_err(|e| CtlError::Usage(format!("cannot read {name}: {e}")))?
    };

    let policy = tenant_policy(cli, tenant_name).await?;
    let (tasks, bad) = jsonl::prepare(&text, &tenant, batch, language.as_deref(), policy.as_ref());
    let lines = tasks.len() + bad.len();
    for b in &bad {
        eprintln!("{}:{}: {}", escape::line(&name), b.line, escape::line(&b.message));
    }
    if !bad.is_empty() && !args.skip_invalid {
        eprintln!(
            "{} of {lines} lines are invalid; nothing was submitted. Fix them, or pass --skip-invalid to submit the others.",
            bad.len()
        );
        if cli.output != Output::Table {
            print_data(cli, &Report { tenant: tenant_name, batch, lines, submitted: 0, skipped: 0, invalid: &bad })?;
        }
        return Ok(ExitCode::from(1));
    }

    let accepted = accepted_keys(cli, tenant_name, batch).await?;
    let (skip, todo): (Vec<_>, Vec<_>) = tasks.into_iter().partition(|t| accepted.contains(&t.key));
    let skipped = skip.len();
    if todo.len() > CONFIRM_ABOVE && !args.yes && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        eprint!("Submit {} tasks to tenant {tenant_name} as batch {batch}? [y/N] ", todo.len());
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing was submitted");
            return Ok(ExitCode::from(1));
        }
    }

    let mut submitted = 0usize;
    let mut refused: Vec<usize> = Vec::new();
    if !todo.is_empty() {
        let conn = crate::amqp::connect(&cli.amqp_url, "agentctl")
            .await
            .map_err(|e| CtlError::Unreachable(format!("{e} (set AGENTCTL_AMQP_URL)")))?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let bar = style::progress_bar(Some(todo.len() as u64));
        bar.set_message(format!("publishing batch {}", escape::line(batch)));
        let mut in_flight = FuturesUnordered::new();
        let mut next = todo.iter();
        let broken = loop {
            // Fill the window, then wait for one confirm; stop when all are confirmed.
            let mut failed = None;
            while in_flight.len() < IN_FLIGHT {
                let Some(task) = next.next() else { break };
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(task.key.as_str().into());
                match channel
                    .basic_publish(
                        TASKS_EXCHANGE.into(),
                        tenant_name.into(),
                        BasicPublishOptions::default(),
                        &task.body,
                        props,
                    )
                    .await
                {
                    Ok(confirm) => in_flight.push(async move { (task.line, confirm.await) }),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                break Some(e);
            }
            match in_flight.next().await {
                None => break None,
                Some((_, Ok(Confirmation::Ack(_)))) | Some((_, Ok(Confirmation::NotRequested))) => submitted += 1,
                Some((line, Ok(Confirmation::Nack(_)))) => refused.push(line),
                Some((_, Err(e))) => break Some(e),
            }
            bar.set_position((submitted + refused.len()) as u64);
        };
        bar.finish_and_clear();
        if let Some(e) = broken {
            return Err(CtlError::Broker(format!(
                "the connection to RabbitMQ failed ({e}) after {submitted} of {} tasks were confirmed \
                 ({skipped} were already accepted before). Run the same command again to resume: \
                 what was accepted is skipped.",
                todo.len()
            )));
        }
        let _ = conn.close(200, "bye".into()).await;
    }

    match cli.output {
        Output::Table => {
            let mut line = format!("batch {batch} of tenant {tenant_name}: submitted {submitted}");
            if skipped > 0 {
                line += &format!(", skipped {skipped} already accepted");
            }
            if !bad.is_empty() {
                line += &format!(", skipped {} invalid", bad.len());
            }
            println!("{line} ({lines} lines)");
            if refused.is_empty() {
                println!(
                    "wait for it: agentctl wait --tenant {tenant_name} --batch {batch} --expect {}",
                    submitted + skipped
                );
            }
        }
        _ => print_data(cli, &Report { tenant: tenant_name, batch, lines, submitted, skipped, invalid: &bad })?,
    }
    if !refused.is_empty() {
        refused.sort_unstable();
        eprintln!(
            "RabbitMQ refused {} tasks (lines {}); run the same command again to retry them",
            refused.len(),
            refused.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The tenant's quotas, so that a line over them is reported now rather than rejected later.
/// `None` (with a note) when this token may not read them: the service checks them on arrival.
async fn tenant_policy(cli: &Cli, tenant: &str) -> Result<Option<TenantPolicy>, CtlError> {
    let url = format!("{}/v1/tenants/{}", cli.server.trim_end_matches('/'), encode(tenant));
    match api::<TenantStatus>(cli, reqwest::Method::GET, &url, None).await {
        Ok(t) => Ok(Some(t.policy)),
        Err(CtlError::Api { status: reqwest::StatusCode::NOT_FOUND, .. }) => {
            Err(CtlError::Usage(format!("the service has no tenant {tenant} (agentctl tenant list shows them)")))
        }
        Err(e) => {
            eprintln!(
                "note: cannot read tenant {tenant}'s quotas ({e}); the service checks them when the tasks arrive"
            );
            Ok(None)
        }
    }
}

/// The idempotency keys batch `batch` already has. Without an API to ask (no token, say), none:
/// the service's idempotency check still drops what it has.
async fn accepted_keys(cli: &Cli, tenant: &str, batch: &str) -> Result<HashSet<String>, CtlError> {
    let query = vec![("tenant", tenant.to_owned()), ("batch", batch.to_owned())];
    match list_all(cli, &query, None).await {
        Ok(items) => Ok(items.into_iter().filter_map(|t| t.id).collect()),
        Err(e @ (CtlError::Api { .. } | CtlError::Unreachable(_))) => {
            eprintln!(
                "note: cannot ask the API what batch {batch} already has ({e}); publishing every line \
                 (the service drops ids it already has)"
            );
            Ok(HashSet::new())
        }
        Err(e) => Err(e),
    }
}
