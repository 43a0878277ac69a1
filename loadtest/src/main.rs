//! `agenttask-loadtest`: publishes tasks to a tenant the way an agent platform does and measures
//! the time from publish to result (direct reply-to), so figures include RabbitMQ, Postgres, the
//! scheduler, the sandbox and the result publisher.
//!
//!   agenttask-loadtest --tenant demo --count 50 --concurrency 1
//!   agenttask-loadtest --tenant demo --count 20000 --raw     (RabbitMQ alone, same messages)
//!
//! Bounded in count and time; talks only to the broker it is given (loopback by default).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

use agenttask::amqp::{connect, TASKS_EXCHANGE};
use agenttask::domain::result::ResultMessage;

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Tenant to submit to
    #[arg(long, env = "AGENTCTL_TENANT", required_unless_present = "raw")]
    tenant: Option<String>,
    /// Tasks to submit in all
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Tasks in flight at once (1 measures latency, more measures throughput)
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Python code of each task
    #[arg(long, default_value = "print(1)")]
    code: String,
    /// Give up after this many seconds in all
    #[arg(long, default_value_t = 600)]
    deadline: u64,
    #[arg(long, env = "AGENTCTL_AMQP_URL", default_value = agenttask::config::DEFAULT_AMQP_URL)]
    amqp_url: String,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// Measure RabbitMQ alone instead of the service: publish --count messages of a task's size
    /// to a private queue with pipelined confirms, then consume them all with no processing.
    /// The machine's own ceiling for the same messages, to read service figures against.
    #[arg(long)]
    raw: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.raw {
        return raw(args).await;
    }
    let tenant = args.tenant.clone().expect("clap requires --tenant without --raw");
    let conn = connect(&args.amqp_url, "agenttask-loadtest").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "loadtest".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    let started = Instant::now();
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(args.count);
    let mut phases: HashMap<String, usize> = HashMap::new();
    let (mut sent, mut done) = (0usize, 0usize);
    while done < args.count {
        while sent < args.count && sent - done < args.concurrency.max(1) {
            let id = uuid::Uuid::new_v4().to_string();
            let body = serde_json::to_vec(&serde_json::json!({"id": id, "language": "python", "code": args.code}))?;
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(id.as_str().into())
                .with_reply_to("amq.rabbitmq.reply-to".into());
            sent_at.insert(id.clone(), Instant::now());
            channel
                .basic_publish(
                    TASKS_EXCHANGE.into(),
                    tenant.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?
                .await?;
            sent += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(delivery)) = tokio::time::timeout(left, replies.next()).await else {
            return Err(format!("deadline passed with {done} of {} results", args.count).into());
        };
        let delivery = delivery?;
        let result: ResultMessage = serde_json::from_slice(&delivery.data)?;
        if let Some(t0) = result.id.as_ref().and_then(|id| sent_at.remove(id)) {
            latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            *phases.entry(result.phase.to_string()).or_default() += 1;
            done += 1;
            if !args.json && (done % 10 == 0 || done == args.count) {
                eprint!("\r{done}/{} results", args.count);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let summary = serde_json::json!({
        "tasks": args.count,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "tasks_per_second": args.count as f64 / elapsed,
        "latency_ms": {
            "p50": percentile(&latencies, 0.5),
            "p95": percentile(&latencies, 0.95),
            "p99": percentile(&latencies, 0.99),
            "max": latencies.last().copied().unwrap_or(f64::NAN),
        },
        "phases": phases,
    });
    if args.json {
        println!("{summary}");
    } else {
        eprintln!();
        println!(
            "{} tasks, concurrency {}: {:.1} tasks/s; publish-to-result p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; phases {:?}",
            args.count,
            args.concurrency,
            args.count as f64 / elapsed,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.95),
            percentile(&latencies, 0.99),
            phases
        );
    }
    let all_ok = phases.keys().all(|p| p == "Succeeded");
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The broker alone: publish with confirms, then consume, the same number of task-sized messages.
async fn raw(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use lapin::options::{BasicAckOptions, BasicQosOptions, QueueDeclareOptions};
    let conn = connect(&args.amqp_url, "agenttask-loadtest-raw").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    // Durable messages on a classic queue, like the service's results; exclusive so nothing is
    // left behind.
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    let id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&serde_json::json!({"id": id, "language": "python", "code": args.code}))?;
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let props = BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
        confirms.push(
            channel
                .basic_publish("".into(), queue.name().as_str().into(), BasicPublishOptions::default(), &body, props)
                .await?,
        );
    }
    for c in confirms {
        if !c.await?.is_ack() {
            return Err("the broker refused a message".into());
        }
    }
    let published = started.elapsed().as_secs_f64();
    channel.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consume_start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    for _ in 0..args.count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(d)) = tokio::time::timeout(left, consumer.next()).await else {
            return Err("deadline passed while consuming".into());
        };
        d?.acker.ack(BasicAckOptions::default()).await?;
    }
    let consumed = consume_start.elapsed().as_secs_f64();
    let _ = conn.close(200, "done".into()).await;
    let summary = serde_json::json!({
        "messages": args.count,
        "message_bytes": body.len(),
        "publish_per_second": args.count as f64 / published,
        "consume_per_second": args.count as f64 / consumed,
        "publish_then_consume_per_second": args.count as f64 / (published + consumed),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "raw RabbitMQ, {} messages of {} bytes: publish with confirms {:.0}/s, consume {:.0}/s, publish then consume {:.0}/s",
            args.count,
            body.len(),
            args.count as f64 / published,
            args.count as f64 / consumed,
            args.count as f64 / (published + consumed)
        );
    }
    Ok(ExitCode::SUCCESS)
}
