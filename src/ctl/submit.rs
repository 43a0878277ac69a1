//! `agentctl submit`: builds a task message and publishes it to the tenant's queue.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use serde_json::json;

use super::{escape, Cli, CtlError, Output};
use crate::amqp::TASKS_EXCHANGE;
use crate::domain::phase::Phase;
use crate::domain::result::ResultMessage;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// File with the code; `-` or nothing reads standard input
    pub file: Option<PathBuf>,
    /// The code itself
    #[arg(short = 'c', long = "code", conflicts_with = "file")]
    pub code: Option<String>,
    /// python or r [default: from the file extension, else python]
    #[arg(long = "lang", visible_alias = "language")]
    pub language: Option<String>,
    /// Wait for the result and print it
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds
    #[arg(long, default_value_t = 900, requires = "wait")]
    pub wait_timeout: u64,
    /// Batch id to group tasks
    #[arg(long = "batch")]
    pub batch: Option<String>,
    /// Idempotency key [default: a new uuid]
    #[arg(long)]
    pub id: Option<String>,
    /// Wall-clock limit in seconds [default: the tenant's]
    #[arg(long)]
    pub timeout: Option<u32>,
    /// CPU, e.g. 500m or 1 [default: the tenant's]
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory, e.g. 256Mi [default: the tenant's]
    #[arg(long)]
    pub memory: Option<String>,
    /// Priority within the tenant's queue, -100..100
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// An argument for the program (repeatable)
    #[arg(long = "arg", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable NAME=VALUE (repeatable)
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// An input file copied into the working directory (repeatable)
    #[arg(long = "input")]
    pub inputs: Vec<PathBuf>,
    /// A label KEY=VALUE (repeatable)
    #[arg(long = "label")]
    pub labels: Vec<String>,
}

fn pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>, CtlError> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| CtlError::Usage(format!("--{what} {kv:?}: use NAME=VALUE")))
        })
        .collect()
}

/// The task message for these arguments.
pub fn build_task(args: &SubmitArgs, id: &str) -> Result<serde_json::Value, CtlError> {
    let code = match (&args.code, &args.file) {
        (Some(code), _) => code.clone(),
        (None, Some(path)) if path.as_os_str() != "-" => std::fs::read_to_string(path)
            .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", path.display())))?,
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
    };
    let language = match &args.language {
        Some(l) => l.to_lowercase(),
        None => match args.file.as_ref().and_then(|p| p.extension()).and_then(|e| e.to_str()) {
            Some("R") | Some("r") => "r".to_owned(),
            _ => "python".to_owned(),
        },
    };
    let mut task = json!({ "id": id, "language": language, "code": code });
    if let Some(b) = &args.batch {
        task["batch_id"] = json!(b);
    }
    if let Some(t) = args.timeout {
        task["timeout_seconds"] = json!(t);
    }
    if let Some(p) = args.priority {
        task["priority"] = json!(p);
    }
    if args.cpu.is_some() || args.memory.is_some() {
        let mut r = serde_json::Map::new();
        if let Some(c) = &args.cpu {
            r.insert("cpu".into(), json!(c));
        }
        if let Some(m) = &args.memory {
            r.insert("memory".into(), json!(m));
        }
        task["resources"] = serde_json::Value::Object(r);
    }
    if !args.args.is_empty() {
        task["args"] = json!(args.args);
    }
    if !args.env.is_empty() {
        task["env"] = json!(pairs(&args.env, "env")?);
    }
    if !args.labels.is_empty() {
        task["labels"] = json!(pairs(&args.labels, "label")?);
    }
    if !args.inputs.is_empty() {
        use base64::Engine as _;
        let mut files = serde_json::Map::new();
        for path in &args.inputs {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| CtlError::Usage(format!("--input {}: not a file name", path.display())))?;
            let bytes =
                std::fs::read(path).map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", path.display())))?;
            files.insert(
                name.to_owned(),
                json!({"content_base64": base64::engine::general_purpose::STANDARD.encode(bytes)}),
            );
        }
        task["files"] = serde_json::Value::Object(files);
    }
    Ok(task)
}

pub async fn run(cli: &Cli, args: &SubmitArgs) -> Result<ExitCode, CtlError> {
    let tenant = cli
        .tenant
        .clone()
        .ok_or_else(|| CtlError::Usage("no tenant: pass --tenant NAME or set AGENTCTL_TENANT".into()))?;
    crate::domain::tenant::TenantName::parse(&tenant).map_err(CtlError::Usage)?;
    let id = args.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if !crate::domain::validate::is_valid_key(&id) {
        return Err(CtlError::Usage(format!("--id {id:?}: use 1-128 letters, digits, '.', '_', ':' or '-'")));
    }
    let task = build_task(args, &id)?;
    let body = serde_json::to_vec(&task)?;

    let conn = crate::amqp::connect(&cli.amqp_url, "agentctl")
        .await
        .map_err(|e| CtlError::Unreachable(format!("{e} (set AGENTCTL_AMQP_URL)")))?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    const REPLY_TO: &str = "amq.rabbitmq.reply-to";
    let mut replies = if args.wait {
        Some(
            channel
                .basic_consume(
                    REPLY_TO.into(),
                    "agentctl".into(),
                    BasicConsumeOptions { no_ack: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?,
        )
    } else {
        None
    };
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(id.as_str().into())
        .with_correlation_id(id.as_str().into());
    if args.wait {
        props = props.with_reply_to(REPLY_TO.into());
    }
    let confirm = channel
        .basic_publish(
            TASKS_EXCHANGE.into(),
            tenant.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?
        .await
        .map_err(|e| {
            CtlError::Broker(format!(
                "publishing failed: {e}. If the exchange {TASKS_EXCHANGE} does not exist yet, start `agenttask serve` once"
            ))
        })?;
    if let Confirmation::Nack(_) = confirm {
        return Err(CtlError::Broker("RabbitMQ refused the task (nack); try again".into()));
    }

    let Some(replies) = replies.as_mut() else {
        match cli.output {
            Output::Json | Output::Jsonl | Output::Csv => println!("{}", json!({"id": id, "tenant": tenant})),
            Output::Yaml => super::print_data(cli, &json!({"id": id, "tenant": tenant}))?,
            Output::Table => {
                println!("submitted {id} to tenant {tenant}; the result goes to agenttask.results.{tenant}")
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        return Ok(ExitCode::SUCCESS);
    };
    if cli.output == Output::Table {
        eprintln!("submitted {id} to tenant {tenant}; waiting for the result...");
    }
    let wait = Duration::from_secs(args.wait_timeout);
    let delivery = tokio::time::timeout(wait, replies.next())
        .await
        .map_err(|_| {
            CtlError::Unexpected(format!(
                "no result after {}s; the task may still run: agentctl get {id} --tenant {tenant}",
                args.wait_timeout
            ))
        })?
        .ok_or_else(|| CtlError::Broker("the reply consumer was cancelled".into()))??;
    let _ = conn.close(200, "bye".into()).await;
    let result: ResultMessage = serde_json::from_slice(&delivery.data)
        .map_err(|e| CtlError::Unexpected(format!("unexpected result message: {e}")))?;
    match cli.output {
        Output::Json | Output::Jsonl | Output::Csv => println!("{}", String::from_utf8_lossy(&delivery.data)),
        Output::Yaml => super::print_data(cli, &result)?,
        Output::Table => print_result(&result),
    }
    Ok(if result.phase == Phase::Succeeded { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Program output on stdout/stderr as the program wrote it, except that terminal control
/// characters other than newline and tab are shown escaped; our status line on stderr.
fn print_result(r: &ResultMessage) {
    print!("{}", escape::block(&r.stdout));
    if r.stdout_truncated {
        println!("\n[stdout truncated]");
    }
    eprint!("{}", escape::block(&r.stderr));
    if r.stderr_truncated {
        eprintln!("\n[stderr truncated]");
    }
    if let Some(result) = &r.result {
        eprintln!("result: {}", escape::line(&result.to_string()));
    }
    let reason = r.reason.map(|x| format!(" ({x})")).unwrap_or_default();
    let timing = match (r.duration_ms, r.queue_wait_ms) {
        (Some(d), Some(q)) => format!(" after {d} ms (queued {q} ms)"),
        _ => String::new(),
    };
    let message = r.message.as_deref().map(|m| format!(": {}", escape::line(m))).unwrap_or_default();
    eprintln!("{}{reason}{timing}{message} — task {}", r.phase, r.task_id);
}
