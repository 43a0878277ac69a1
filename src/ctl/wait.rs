//! `agentctl wait ID` and `agentctl wait --batch B`: poll the task API until the task, or every
//! task of the batch, is finished; a progress bar on a terminal; the exit status says how it
//! ended.
//!
//! Polling (not a result queue) because waiting must work for tasks submitted by anyone, from
//! anywhere, long before `wait` started; the API answers from Postgres, which holds the truth.
//! The interval starts short (a quick task is reported at once) and backs off to
//! [`MAX_INTERVAL`] (a batch of thousands costs one small request every two seconds).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::{api, encode, escape, list_all, print_data, style, Cli, CtlError, Output};
use crate::domain::phase::Phase;
use crate::http::TaskView;
use crate::store::{BatchStatus, TaskSummary};

/// Exit status when `--timeout` passed before everything finished.
pub const EXIT_TIMEOUT: u8 = 3;

const FIRST_INTERVAL: Duration = Duration::from_millis(250);
const MAX_INTERVAL: Duration = Duration::from_secs(2);
/// How long a task or batch the API does not know yet is waited for: a task published a moment
/// ago may not be ingested yet, but a typo should not hang until `--timeout`.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(15);
/// Unsuccessful tasks listed by name at the end; the rest are counted, with the command that
/// lists them all.
const LIST_AT_MOST: usize = 20;

#[derive(Debug, Args)]
#[command(after_help = "Exit status: 0 when every task Succeeded; 1 when any Failed, was Rejected or \
                        Cancelled; 2 for usage and connection errors, or a task or batch the API does \
                        not know (after waiting 15s for it to appear); 3 when --timeout passed first.")]
pub struct WaitArgs {
    /// Task id (uuid), or your client id with --tenant
    #[arg(required_unless_present = "batch", conflicts_with = "batch")]
    pub id: Option<String>,
    /// Wait for every task of this batch (of --tenant)
    #[arg(long)]
    pub batch: Option<String>,
    /// With --batch: also wait until the batch has at least N tasks (those just published may
    /// not all be ingested yet)
    #[arg(long, value_name = "N", requires = "batch")]
    pub expect: Option<u64>,
    /// Give up after this many seconds (exit status 3) [default: wait as long as it takes]
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// Where a batch stands, for the progress bar and the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// Still running (or fewer tasks than expected so far).
    Waiting,
    Succeeded,
    /// Finished, and some task did not succeed.
    Unsuccessful,
}

/// Whether batch `s` is done: nothing queued or running, and at least `expect` tasks.
pub fn batch_state(s: &BatchStatus, expect: Option<u64>) -> BatchState {
    let finished = s.queued == 0 && s.running == 0 && s.total >= expect.unwrap_or(1).max(1) as i64;
    match (finished, s.failed + s.rejected + s.cancelled) {
        (false, _) => BatchState::Waiting,
        (true, 0) => BatchState::Succeeded,
        (true, _) => BatchState::Unsuccessful,
    }
}

/// The non-zero counts by phase, e.g. `2 queued, 1 running, 5 succeeded, 1 failed`.
pub fn phase_counts(s: &BatchStatus) -> String {
    let parts: Vec<String> = [
        ("queued", s.queued),
        ("running", s.running),
        ("succeeded", s.succeeded),
        ("failed", s.failed),
        ("rejected", s.rejected),
        ("cancelled", s.cancelled),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(name, n)| format!("{n} {name}"))
    .collect();
    if parts.is_empty() {
        "no tasks yet".into()
    } else {
        parts.join(", ")
    }
}

/// The line `wait --batch` ends with, for people.
pub fn batch_summary(s: &BatchStatus, state: BatchState) -> String {
    let name = format!("batch {} of tenant {}", escape::line(&s.batch_id), escape::line(&s.tenant));
    match state {
        BatchState::Succeeded => format!("{name}: all {} tasks succeeded", s.total),
        BatchState::Unsuccessful => format!(
            "{name}: {} of {} tasks did not succeed ({})",
            s.failed + s.rejected + s.cancelled,
            s.total,
            phase_counts(s)
        ),
        BatchState::Waiting => format!("{name}: not finished: {} of {} tasks ({})", done(s), s.total, phase_counts(s)),
    }
}

fn done(s: &BatchStatus) -> i64 {
    s.succeeded + s.failed + s.rejected + s.cancelled
}

/// The line `wait ID` ends with, for people.
pub fn task_summary(v: &TaskView, colour: bool) -> String {
    let r = &v.result;
    let id = r.id.as_deref().map(|i| format!(" ({})", escape::line(i))).unwrap_or_default();
    let reason = r.reason.map(|x| format!(" ({x})")).unwrap_or_default();
    let after = r.duration_ms.map(|d| format!(" after {d} ms")).unwrap_or_default();
    let message = r.message.as_deref().map(|m| format!(": {}", escape::line(m))).unwrap_or_default();
    format!("task {}{id}: {}{reason}{after}{message}", r.task_id, style::phase(r.phase, colour))
}

/// The table of tasks that did not succeed.
pub fn unsuccessful_table(items: &[TaskSummary], colour: bool) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header([
        "TASK".to_owned(),
        "ID".to_owned(),
        style::phase_header("PHASE", colour),
        "REASON".to_owned(),
        "EXIT".to_owned(),
    ]);
    for t in items {
        table.add_row([
            t.task_id.to_string(),
            t.id.as_deref().map_or_else(|| "-".into(), |s| escape::line(s).into_owned()),
            style::phase(t.phase, colour),
            t.reason.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            t.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
        ]);
    }
    table
}

/// The next poll's interval: doubling, up to [`MAX_INTERVAL`].
fn next_interval(d: Duration) -> Duration {
    (d * 2).min(MAX_INTERVAL)
}

/// How a poll went: an answer, or the API does not know the thing (yet).
enum Poll<T> {
    Found(T),
    NotFound(CtlError),
}

async fn poll<T: serde::de::DeserializeOwned>(cli: &Cli, url: &str) -> Result<Poll<T>, CtlError> {
    match api(cli, reqwest::Method::GET, url, None).await {
        Ok(v) => Ok(Poll::Found(v)),
        Err(e @ CtlError::Api { status: reqwest::StatusCode::NOT_FOUND, .. }) => Ok(Poll::NotFound(e)),
        Err(e) => Err(e),
    }
}

/// `-o json|yaml` on a batch: its final (or, on timeout, latest) status and whether it finished.
#[derive(Serialize)]
struct BatchAnswer<'a> {
    #[serde(flatten)]
    status: &'a BatchStatus,
    finished: bool,
}

pub async fn run(cli: &Cli, args: &WaitArgs) -> Result<ExitCode, CtlError> {
    let deadline = args.timeout.map(|s| Instant::now() + Duration::from_secs(s));
    match (&args.batch, &args.id) {
        (Some(batch), _) => wait_batch(cli, batch, args.expect, deadline).await,
        (None, Some(id)) => wait_task(cli, id, deadline).await,
        (None, None) => {
            Err(CtlError::Usage("say what to wait for: agentctl wait ID, or agentctl wait --batch B".into()))
        }
    }
}

/// Sleeps until the next poll; `false` when the deadline comes first.
async fn pause(interval: Duration, deadline: Option<Instant>) -> bool {
    let now = Instant::now();
    match deadline {
        Some(d) if d <= now => false,
        Some(d) => {
            tokio::time::sleep(interval.min(d - now)).await;
            true
        }
        None => {
            tokio::time::sleep(interval).await;
            true
        }
    }
}

async fn wait_batch(
    cli: &Cli,
    batch: &str,
    expect: Option<u64>,
    deadline: Option<Instant>,
) -> Result<ExitCode, CtlError> {
    let tenant = cli
        .tenant
        .as_deref()
        .ok_or_else(|| CtlError::Usage("a batch belongs to a tenant: pass --tenant (or set AGENTCTL_TENANT)".into()))?;
    let base = cli.server.trim_end_matches('/');
    let url = format!("{base}/v1/batches/{}/{}", encode(tenant), encode(batch));
    let started = Instant::now();
    let bar = style::progress_bar(expect.filter(|n| *n > 0));
    bar.set_message(format!("waiting for batch {}", escape::line(batch)));
    let mut interval = FIRST_INTERVAL;
    let mut last: Option<BatchStatus> = None;
    let outcome = loop {
        match poll::<BatchStatus>(cli, &url).await? {
            Poll::Found(s) => {
                bar.set_length((s.total.max(0) as u64).max(expect.unwrap_or(0)));
                bar.set_position(done(&s) as u64);
                bar.set_message(phase_counts(&s));
                let state = batch_state(&s, expect);
                last = Some(s);
                if state != BatchState::Waiting {
                    break Some(state);
                }
            }
            Poll::NotFound(e) if last.is_none() && started.elapsed() >= NOT_FOUND_GRACE => {
                bar.finish_and_clear();
                return Err(CtlError::Usage(format!(
                    "{e}; check the batch and tenant names (agentctl list --tenant {tenant})"
                )));
            }
            Poll::NotFound(_) => {}
        }
        if !pause(interval, deadline).await {
            break None;
        }
        interval = next_interval(interval);
    };
    bar.finish_and_clear();
    let Some(status) = last else {
        return Err(CtlError::Usage(format!(
            "no batch {batch} of tenant {tenant} appeared before the timeout; check the names (agentctl list --tenant {tenant})"
        )));
    };
    let state = outcome.unwrap_or(BatchState::Waiting);
    match cli.output {
        Output::Table => {
            println!("{}", batch_summary(&status, state));
            if state == BatchState::Unsuccessful {
                let query = vec![
                    ("tenant", tenant.to_owned()),
                    ("batch", batch.to_owned()),
                    ("phase", "Failed,Rejected,Cancelled".to_owned()),
                ];
                let bad = list_all(cli, &query, Some(LIST_AT_MOST as u64 + 1)).await?;
                let shown = &bad[..bad.len().min(LIST_AT_MOST)];
                println!("{}", unsuccessful_table(shown, style::stdout_colour()));
                let unlisted = status.failed + status.rejected + status.cancelled - shown.len() as i64;
                if unlisted > 0 {
                    println!(
                        "... and {unlisted} more: agentctl list --tenant {tenant} --batch {} --phase Failed,Rejected,Cancelled",
                        escape::line(batch)
                    );
                }
            }
        }
        _ => print_data(cli, &BatchAnswer { status: &status, finished: state != BatchState::Waiting })?,
    }
    Ok(match state {
        BatchState::Succeeded => ExitCode::SUCCESS,
        BatchState::Unsuccessful => ExitCode::from(1),
        BatchState::Waiting => {
            eprintln!("timed out; the batch goes on: agentctl wait --batch {} --tenant {tenant}", escape::line(batch));
            ExitCode::from(EXIT_TIMEOUT)
        }
    })
}

async fn wait_task(cli: &Cli, id: &str, deadline: Option<Instant>) -> Result<ExitCode, CtlError> {
    let mut url = format!("{}/v1/tasks/{}", cli.server.trim_end_matches('/'), encode(id));
    if let Some(t) = &cli.tenant {
        url.push_str(&format!("?tenant={}", encode(t)));
    }
    let started = Instant::now();
    let bar = style::progress_bar(Some(1));
    bar.set_message(format!("waiting for task {}", escape::line(id)));
    let mut interval = FIRST_INTERVAL;
    let mut last: Option<TaskView> = None;
    let mut not_found: Option<CtlError> = None;
    loop {
        match poll::<TaskView>(cli, &url).await? {
            Poll::Found(v) => {
                bar.set_message(v.result.phase.to_string());
                let terminal = v.result.phase.is_terminal();
                last = Some(v);
                if terminal {
                    bar.set_position(1);
                    break;
                }
            }
            Poll::NotFound(e) if last.is_none() && started.elapsed() >= NOT_FOUND_GRACE => {
                not_found = Some(e);
                break;
            }
            Poll::NotFound(e) => not_found = Some(e),
        }
        if !pause(interval, deadline).await {
            break;
        }
        interval = next_interval(interval);
    }
    bar.finish_and_clear();
    let Some(view) = last else {
        let e = not_found.map(|e| e.to_string()).unwrap_or_else(|| format!("no task {id}"));
        return Err(CtlError::Usage(format!("{e}; check the id (a client id needs --tenant, or a tenant's token)")));
    };
    match cli.output {
        Output::Table => println!("{}", task_summary(&view, style::stdout_colour())),
        _ => print_data(cli, &view)?,
    }
    Ok(match view.result.phase {
        Phase::Succeeded => ExitCode::SUCCESS,
        p if p.is_terminal() => ExitCode::from(1),
        _ => {
            eprintln!("timed out; the task goes on: agentctl wait {}", view.result.task_id);
            ExitCode::from(EXIT_TIMEOUT)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(queued: i64, running: i64, succeeded: i64, failed: i64, rejected: i64, cancelled: i64) -> BatchStatus {
        BatchStatus {
            tenant: "acme".into(),
            batch_id: "eval-42".into(),
            total: queued + running + succeeded + failed + rejected + cancelled,
            queued,
            running,
            succeeded,
            failed,
            rejected,
            cancelled,
            first_submitted_at: None,
            last_finished_at: None,
            p50_duration_ms: None,
            p95_duration_ms: None,
        }
    }

    #[test]
    fn a_batch_is_done_when_nothing_is_queued_or_running_and_enough_tasks_arrived() {
        let cases = [
            (status(1, 0, 3, 0, 0, 0), None, BatchState::Waiting),
            (status(0, 1, 3, 0, 0, 0), None, BatchState::Waiting),
            (status(0, 0, 4, 0, 0, 0), None, BatchState::Succeeded),
            (status(0, 0, 4, 0, 0, 0), Some(5), BatchState::Waiting),
            (status(0, 0, 4, 0, 0, 0), Some(4), BatchState::Succeeded),
            (status(0, 0, 3, 1, 0, 0), None, BatchState::Unsuccessful),
            (status(0, 0, 3, 0, 1, 0), None, BatchState::Unsuccessful),
            (status(0, 0, 3, 0, 0, 1), None, BatchState::Unsuccessful),
            // A failure decides nothing while others still run.
            (status(0, 2, 0, 1, 0, 0), None, BatchState::Waiting),
            (status(0, 0, 0, 0, 0, 0), None, BatchState::Waiting),
        ];
        for (s, expect, want) in cases {
            assert_eq!(batch_state(&s, expect), want, "{s:?} expect {expect:?}");
        }
    }

    #[test]
    fn summaries_for_people_are_exactly_these() {
        let ok = status(0, 0, 4, 0, 0, 0);
        assert_eq!(batch_summary(&ok, BatchState::Succeeded), "batch eval-42 of tenant acme: all 4 tasks succeeded");
        let bad = status(0, 0, 5, 2, 0, 1);
        assert_eq!(
            batch_summary(&bad, BatchState::Unsuccessful),
            "batch eval-42 of tenant acme: 3 of 8 tasks did not succeed (5 succeeded, 2 failed, 1 cancelled)"
        );
        let going = status(2, 1, 1, 0, 0, 0);
        assert_eq!(
            batch_summary(&going, BatchState::Waiting),
            "batch eval-42 of tenant acme: not finished: 1 of 4 tasks (2 queued, 1 running, 1 succeeded)"
        );
        assert_eq!(phase_counts(&status(0, 0, 0, 0, 0, 0)), "no tasks yet");
    }

    #[test]
    fn the_interval_backs_off_to_two_seconds() {
        let mut d = FIRST_INTERVAL;
        let mut seen = vec![d];
        for _ in 0..6 {
            d = next_interval(d);
            seen.push(d);
        }
        assert_eq!(seen.iter().map(|d| d.as_millis()).collect::<Vec<_>>(), [250, 500, 1000, 2000, 2000, 2000, 2000]);
    }

    #[test]
    fn the_unsuccessful_table_stays_aligned_with_colours() {
        use crate::domain::phase::Reason;
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let task = |n: u128, phase, reason, exit_code| TaskSummary {
            task_id: uuid::Uuid::from_u128(n),
            id: Some(format!("k{n}")),
            tenant: "acme".into(),
            batch_id: Some("eval-42".into()),
            language: Some("python".into()),
            phase,
            reason,
            exit_code,
            labels: serde_json::json!({}),
            submitted_at: at,
            started_at: None,
            finished_at: None,
            duration_ms: None,
        };
        let items = [
            task(1, Phase::Failed, Some(Reason::NonZeroExit), Some(1)),
            task(2, Phase::Cancelled, Some(Reason::Cancelled), None),
        ];
        let plain: Vec<String> =
            unsuccessful_table(&items, false).to_string().lines().map(|l| l.trim_end().to_owned()).collect();
        assert_eq!(
            plain,
            [
                " TASK                                  ID  PHASE      REASON       EXIT",
                " 00000000-0000-0000-0000-000000000001  k1  Failed     NonZeroExit  1",
                " 00000000-0000-0000-0000-000000000002  k2  Cancelled  Cancelled    -",
            ]
        );
        // With colour, the same table once the escape codes are taken out again.
        let coloured = unsuccessful_table(&items, true).to_string();
        assert!(coloured.contains("\x1b[31mFailed\x1b[0m"), "{coloured:?}");
        let stripped: Vec<String> = coloured
            .replace("\x1b[39m", "")
            .replace("\x1b[31m", "")
            .replace("\x1b[33m", "")
            .replace("\x1b[0m", "")
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect();
        assert_eq!(stripped, plain);
    }
}
