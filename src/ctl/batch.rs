//! `agentctl batch status|results`: a batch's counts and percentiles, and every result of it
//! exported as JSON lines or CSV. (`batch submit` is in `batch_submit`.)

use std::io::Write;
use std::process::ExitCode;

use super::{api, encode, escape, print_data, BatchCommand, Cli, CtlError, Output};
use crate::domain::result::ResultMessage;
use crate::http::ResultPage;
use crate::store::BatchStatus;

pub async fn run(cli: &Cli, cmd: &BatchCommand) -> Result<ExitCode, CtlError> {
    let tenant = cli
        .tenant
        .as_deref()
        .ok_or_else(|| CtlError::Usage("a batch belongs to a tenant: pass --tenant (or set AGENTCTL_TENANT)".into()))?;
    let base = cli.server.trim_end_matches('/');
    match cmd {
        BatchCommand::Submit(args) => return super::batch_submit::run(cli, args).await,
        BatchCommand::Status { batch } => {
            let url = format!("{base}/v1/batches/{}/{}", encode(tenant), encode(batch));
            let s: BatchStatus = api(cli, reqwest::Method::GET, &url, None).await?;
            match cli.output {
                Output::Table => print!("{}", status_text(&s)),
                _ => print_data(cli, &s)?,
            }
        }
        BatchCommand::Results { batch } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let csv = cli.output == Output::Csv;
            if csv {
                writeln!(out, "{}", CSV_HEADER.join(","))?;
            }
            let mut cursor: Option<String> = None;
            loop {
                let mut url = format!("{base}/v1/batches/{}/{}/results?limit=500", encode(tenant), encode(batch));
                if let Some(c) = cursor.take() {
                    url.push_str(&format!("&cursor={}", encode(&c)));
                }
                let page: ResultPage = api(cli, reqwest::Method::GET, &url, None).await?;
                for r in &page.items {
                    if csv {
                        writeln!(out, "{}", csv_row(r))?;
                    } else {
                        writeln!(out, "{}", serde_json::to_string(r)?)?;
                    }
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `batch status` for people.
fn status_text(s: &BatchStatus) -> String {
    let ms = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
    let mut text = String::new();
    text += &format!("BATCH       {} (tenant {})\n", escape::line(&s.batch_id), escape::line(&s.tenant));
    text += &format!("TOTAL       {}\n", s.total);
    for (name, n) in [
        ("QUEUED", s.queued),
        ("RUNNING", s.running),
        ("SUCCEEDED", s.succeeded),
        ("FAILED", s.failed),
        ("REJECTED", s.rejected),
        ("CANCELLED", s.cancelled),
    ] {
        text += &format!("{name:<12}{n}\n");
    }
    text += &format!("DURATION    p50 {}, p95 {}\n", ms(s.p50_duration_ms), ms(s.p95_duration_ms));
    text += &format!("SUBMITTED   {} (first)\n", time(s.first_submitted_at));
    text += &format!("FINISHED    {} (last)\n", time(s.last_finished_at));
    text
}

const CSV_HEADER: [&str; 17] = [
    "task_id",
    "id",
    "tenant",
    "batch_id",
    "phase",
    "reason",
    "message",
    "exit_code",
    "result",
    "stdout",
    "stderr",
    "backend",
    "submitted_at",
    "started_at",
    "finished_at",
    "queue_wait_ms",
    "duration_ms",
];

/// One CSV row (RFC 4180: a field with a comma, quote or line break is quoted, quotes doubled).
fn csv_row(r: &ResultMessage) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| opt(t.map(|t| t.to_rfc3339()));
    let fields = [
        r.task_id.to_string(),
        opt(r.id.clone()),
        r.tenant.clone(),
        opt(r.batch_id.clone()),
        r.phase.to_string(),
        opt(r.reason.map(|x| x.to_string())),
        opt(r.message.clone()),
        opt(r.exit_code.map(|c| c.to_string())),
        opt(r.result.as_ref().map(|v| v.to_string())),
        r.stdout.clone(),
        r.stderr.clone(),
        opt(r.backend.clone()),
        r.submitted_at.to_rfc3339(),
        time(r.started_at),
        time(r.finished_at),
        opt(r.queue_wait_ms.map(|v| v.to_string())),
        opt(r.duration_ms.map(|v| v.to_string())),
    ];
    fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(",")
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_status_for_people_is_exactly_this() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-27T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let s = BatchStatus {
            tenant: "acme".into(),
            batch_id: "eval-42".into(),
            total: 10,
            queued: 1,
            running: 2,
            succeeded: 4,
            failed: 1,
            rejected: 1,
            cancelled: 1,
            first_submitted_at: Some(at),
            last_finished_at: None,
            p50_duration_ms: Some(300),
            p95_duration_ms: Some(480),
        };
        assert_eq!(
            status_text(&s),
            "BATCH       eval-42 (tenant acme)\n\
             TOTAL       10\n\
             QUEUED      1\n\
             RUNNING     2\n\
             SUCCEEDED   4\n\
             FAILED      1\n\
             REJECTED    1\n\
             CANCELLED   1\n\
             DURATION    p50 300 ms, p95 480 ms\n\
             SUBMITTED   2026-11-27T12:00:00+00:00 (first)\n\
             FINISHED    - (last)\n"
        );
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(""), "");
    }
}
