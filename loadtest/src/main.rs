//! `agenttask-loadtest`: offers load to AgentTask the way agent platforms and batch evaluations
//! do, over RabbitMQ, and reports what came back: throughput, publish-to-result and admission-wait
//! percentiles, each tenant's share, and Jain's fairness index for every 1-second window, as a
//! table, JSON or CSV, with an SVG chart of the shares over time.
//!
//!   agenttask-loadtest --tenant demo --count 50
//!   agenttask-loadtest --tenants-file tenants.toml --count 100000 --concurrency 2048 \
//!       --spread zipf --mix print=8,fail=1,invalid=1 --svg shares.svg
//!   agenttask-loadtest --raw --count 20000      (RabbitMQ alone, messages of the same size)
//!   agenttask-loadtest --relay --count 100000 --queues 100 --concurrency 4096
//!                                               (RabbitMQ alone doing the service's message work)
//!
//! Bounded in count and time, and it only talks to a broker on this machine (loopback), which
//! is also what lets it compare its clock with the service's `admitted_at`.

mod chart;
mod plan;
mod relay;
mod report;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};

use agenttask::amqp::{connect, TASKS_EXCHANGE};
use agenttask::domain::result::ResultMessage;
use plan::{Arrival, Body, Spread};

#[derive(Parser)]
#[command(version, about, long_about = None, after_help = "\
Examples:
  One tenant, one task at a time (latency):
    agenttask-loadtest --tenant demo --count 50
  Every tenant of a tenants file, Zipf-skewed, all published at once (throughput, fairness):
    agenttask-loadtest --tenants-file tenants.toml --count 100000 --concurrency 4096 --spread zipf --svg shares.svg
  Bursts of 200 at 500 tasks/s on average, a mix of bodies, figures for a program:
    agenttask-loadtest --tenant demo --count 5000 --concurrency 1000 --arrival bursty --rate 500 --burst 200 \\
        --mix print=8,sleep=1,invalid=1 -o json

Fairness is read per window from the service's admitted_at: only tenants with a task waiting
through the whole window count, and admissions are divided by the tenant's weight from the
tenants file. Exits 1 if any task ended other than its body should (e.g. print not Succeeded).
Ctrl-C (SIGINT) stops publishing and reports the results so far, then exits 130.")]
struct Args {
    /// Submit to this one tenant
    #[arg(long, env = "AGENTCTL_TENANT", conflicts_with = "tenants_file", required_unless_present_any = ["raw", "relay", "tenants_file"])]
    tenant: Option<String>,
    /// Submit to every tenant of this tenants file (the service's), weighting fairness by each
    /// tenant's `weight`
    #[arg(long, value_name = "FILE")]
    tenants_file: Option<PathBuf>,
    /// Tasks to submit in all
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Tasks in flight at once (1 measures latency; thousands keep every tenant backlogged)
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How tasks are spread over tenants: even, or zipf (rank k gets 1/k^s of them)
    #[arg(long, value_enum, default_value_t = SpreadArg::Even)]
    spread: SpreadArg,
    /// The exponent s of --spread zipf
    #[arg(long, default_value_t = 1.0)]
    zipf_exponent: f64,
    /// When tasks are published: flood (all at once, bounded by --concurrency), steady (at
    /// --rate), bursty (--burst at a time, --rate on average)
    #[arg(long, value_enum, default_value_t = ArrivalArg::Flood)]
    arrival: ArrivalArg,
    /// Tasks per second for --arrival steady and bursty
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Tasks per burst for --arrival bursty
    #[arg(long, default_value_t = 50)]
    burst: usize,
    /// The task bodies and their weights: print, sleep (50 ms), cpu, fail (exits 3), r (R's
    /// cat(1)), invalid (an unknown language, Rejected at the door)
    #[arg(long, default_value = "print=1")]
    mix: String,
    /// Seed of the tenant and body choices; the same seed gives the same plan
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Length of a fairness window, in seconds
    #[arg(long, default_value_t = 1.0)]
    window: f64,
    /// Give up after this many seconds in all
    #[arg(long, default_value_t = 600)]
    deadline: u64,
    #[arg(long, env = "AGENTCTL_AMQP_URL", default_value = agenttask::config::DEFAULT_AMQP_URL)]
    amqp_url: String,
    /// table for people, json (the whole report) or csv (one row per window and tenant)
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Also draw each tenant's share and Jain's index over time into this SVG file
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Measure RabbitMQ alone instead of the service: publish --count messages of a task's size
    /// to a private queue with pipelined confirms, then consume them all with no processing.
    /// The machine's own ceiling for the same messages, to read service figures against.
    #[arg(long)]
    raw: bool,
    /// Measure RabbitMQ alone doing the message work the service does per task, with no
    /// Postgres: publish each task to one of --queues quorum queues (as tenants' task queues
    /// are), and a relay on a few shared connections consumes it, replies with a result-sized
    /// message under a confirm, and acks it. The floor any service run stands on
    #[arg(long, conflicts_with_all = ["raw", "tenants_file"])]
    relay: bool,
    /// Quorum queues for --relay (as many as the service run's tenants)
    #[arg(long, default_value_t = 100, requires = "relay")]
    queues: usize,
    /// With --relay, classic queues instead of quorum ones: what the task queues would cost
    /// without the broker's delivery limit (which dead-letters a message that keeps killing
    /// the consumer)
    #[arg(long, requires = "relay")]
    classic_queues: bool,
    /// Delete the task and result queues of every tenant of --tenants-file (or of --tenant) and
    /// exit: what a benchmark leaves behind. Each is a quorum queue, which the broker keeps
    /// (and recovers at every start) until it is deleted.
    #[arg(long)]
    delete_tenant_queues: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SpreadArg {
    Even,
    Zipf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArrivalArg {
    Flood,
    Steady,
    Bursty,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Csv,
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

/// The host of an AMQP URL, if it is a loopback address.
fn loopback_host(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "the load generator only talks to a broker on this machine; {host:?} is not a loopback address (use 127.0.0.1)"
        ))
    }
}

fn task_message(id: &str, body: Body) -> Vec<u8> {
    let (language, code) = body.message();
    serde_json::to_vec(&serde_json::json!({"id": id, "language": language, "code": code}))
        .expect("a JSON object of strings serialises")
}

/// Where replies come back: RabbitMQ's direct reply-to, consumed on `channel`, which is also put
/// in confirm mode for the task publishes.
async fn reply_consumer(channel: &lapin::Channel, tag: &str) -> Result<lapin::Consumer, lapin::Error> {
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            tag.into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
}

/// A task message's properties: its id as message and correlation id, replies by direct reply-to.
fn task_properties(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_correlation_id(id.into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
}

/// The tenants and their weights: from the tenants file, or the one --tenant with weight 1.
fn tenants(args: &Args) -> Result<Vec<(String, u32)>, String> {
    if let Some(path) = &args.tenants_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let parsed = agenttask::domain::tenant::parse_tenants(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if parsed.is_empty() {
            return Err(format!("{} names no tenant", path.display()));
        }
        return Ok(parsed.into_iter().map(|(name, policy)| (name.as_str().to_owned(), policy.weight)).collect());
    }
    Ok(vec![(args.tenant.clone().unwrap_or_default(), 1)])
}

/// One updating line on a terminal, nothing otherwise.
struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress { on: std::io::stderr().is_terminal(), last: Instant::now() - Duration::from_secs(1) }
    }

    fn show(&mut self, sent: usize, done: usize, count: usize, started: Instant) {
        if !self.on || (self.last.elapsed() < Duration::from_millis(100) && done < count) {
            return;
        }
        self.last = Instant::now();
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        eprint!("\r\x1b[2Kpublished {sent}/{count}, results {done}/{count}, {rate:.0} results/s");
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.on {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Plans and samples are kept in memory; ten million is a few hundred MB.
const MAX_COUNT: usize = 10_000_000;

struct InFlight {
    tenant: usize,
    body: Body,
    sent: Instant,
    published_s: f64,
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    loopback_host(&args.amqp_url)?;
    if args.raw {
        return raw(args).await;
    }
    if args.relay {
        return relay(args).await;
    }
    if args.delete_tenant_queues {
        return delete_tenant_queues(&args).await;
    }
    let valid = |v: f64, min: f64| v.is_finite() && v >= min;
    if !(valid(args.window, 0.01) && valid(args.rate, f64::MIN_POSITIVE) && valid(args.zipf_exponent, 0.0)) {
        return Err("--window must be at least 0.01 s, --rate above 0, and --zipf-exponent at least 0".into());
    }
    if args.count > MAX_COUNT {
        return Err(format!("--count is at most {MAX_COUNT} in one run").into());
    }
    let tenants = tenants(&args)?;
    let mix = plan::parse_mix(&args.mix)?;
    let spread = match args.spread {
        SpreadArg::Even => Spread::Even,
        SpreadArg::Zipf => Spread::Zipf { exponent: args.zipf_exponent },
    };
    let arrival = match args.arrival {
        ArrivalArg::Flood => Arrival::Flood,
        ArrivalArg::Steady => Arrival::Steady { rate: args.rate },
        ArrivalArg::Bursty => Arrival::Bursty { rate: args.rate, burst: args.burst },
    };
    let plan = plan::plan(args.count, tenants.len(), spread, arrival, &mix, args.seed);

    let conn = connect(&args.amqp_url, "agenttask-loadtest").await?;
    let channel = conn.create_channel().await?;
    let mut replies = reply_consumer(&channel, "loadtest").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.deadline);
    let started = Instant::now();
    let started_wall = chrono::Utc::now();
    let mut progress = Progress::new();
    let mut in_flight: HashMap<String, InFlight> = HashMap::new();
    let mut confirms = FuturesUnordered::new();
    let mut samples = Vec::with_capacity(args.count);
    let mut sent = 0usize;
    // Ctrl-C (or SIGINT from a script) ends the run early with a report of what came back.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut partial = false;
    while samples.len() < args.count {
        while sent < args.count && in_flight.len() < args.concurrency.max(1) && started.elapsed() >= plan[sent].at {
            let task = plan[sent];
            let id = uuid::Uuid::new_v4().to_string();
            let props = task_properties(&id);
            let tenant = &tenants[task.tenant].0;
            let confirm = channel
                .basic_publish(
                    TASKS_EXCHANGE.into(),
                    tenant.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &task_message(&id, task.body),
                    props,
                )
                .await?;
            confirms.push(async move { (confirm.await, task.tenant) });
            let now = Instant::now();
            in_flight.insert(
                id,
                InFlight {
                    tenant: task.tenant,
                    body: task.body,
                    sent: now,
                    published_s: (now - started).as_secs_f64(),
                },
            );
            sent += 1;
        }
        let next_due = (sent < args.count && in_flight.len() < args.concurrency.max(1))
            .then(|| tokio::time::Instant::from_std(started + plan[sent].at));
        tokio::select! {
            reply = replies.next() => {
                let Some(delivery) = reply else { return Err("the broker closed the reply consumer".into()) };
                let delivery = delivery?;
                let result: ResultMessage = serde_json::from_slice(&delivery.data)?;
                // The reply carries the task's correlation id; the body's `id` is the fallback.
                let key = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()).or(result.id.clone());
                let Some(f) = key.and_then(|id| in_flight.remove(&id)) else { continue };
                if result.reason.map(|r| r.as_str()) == Some("UnknownTenant") {
                    progress.finish();
                    return Err(format!(
                        "the service has no tenant {:?}: is it in the service's tenants file (and was that file reloaded)?",
                        tenants[f.tenant].0
                    ).into());
                }
                let seconds_since_start = |t: chrono::DateTime<chrono::Utc>| (t - started_wall).num_microseconds().map(|us| us as f64 / 1e6);
                let phase = result.phase.to_string();
                samples.push(report::Sample {
                    tenant: f.tenant,
                    published_s: f.published_s,
                    latency_ms: f.sent.elapsed().as_secs_f64() * 1000.0,
                    unexpected: f.body.should_succeed() != (phase == "Succeeded"),
                    phase,
                    admitted_s: result.admitted_at.and_then(seconds_since_start),
                    admission_wait_ms: result.queue_wait_ms.map(|ms| ms as f64),
                });
                progress.show(sent, samples.len(), args.count, started);
            }
            Some((confirmed, tenant)) = confirms.next(), if !confirms.is_empty() => {
                match confirmed? {
                    Confirmation::Ack(None) => {}
                    Confirmation::Ack(Some(_)) => return Err(format!(
                        "tenant {:?} has no queue: is it in the service's tenants file, and is the service running?",
                        tenants[tenant].0).into()),
                    _ => return Err("the broker refused a message (nack)".into()),
                }
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or(deadline)), if next_due.is_some() => {}
            _ = tokio::time::sleep_until(deadline) => {
                progress.finish();
                return Err(format!("deadline passed with {} of {} results", samples.len(), args.count).into());
            }
            _ = &mut interrupted => {
                partial = true;
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    if partial {
        eprintln!(
            "interrupted: the report covers the {} of {} tasks whose results came back",
            samples.len(),
            args.count
        );
    }
    let _ = conn.close(200, "done".into()).await;
    let report = report::build(&samples, &tenants, seconds, args.window);
    match args.output {
        Output::Table => print!("{}", report::table(&report, 20)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Csv => print!("{}", report::csv(&report)),
    }
    if let Some(path) = &args.svg {
        chart::write_svg(&report, path).map_err(|e| format!("cannot write the chart to {}: {e}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(if partial {
        // The shell's convention for a run ended by SIGINT.
        ExitCode::from(130)
    } else if report.unexpected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn delete_tenant_queues(args: &Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use lapin::options::QueueDeleteOptions;
    let conn = connect(&args.amqp_url, "agenttask-loadtest-cleanup").await?;
    let mut deleted = 0;
    for (name, _) in tenants(args)? {
        let tenant = agenttask::domain::tenant::TenantName::parse(&name)?;
        for queue in [agenttask::amqp::tasks_queue(&tenant), agenttask::amqp::results_queue(&tenant)] {
            // A channel per queue: deleting one that does not exist closes its channel.
            let channel = conn.create_channel().await?;
            if channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.is_ok() {
                deleted += 1;
                let _ = channel.close(200, "deleted".into()).await;
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    eprintln!("deleted {deleted} queues");
    Ok(ExitCode::SUCCESS)
}

async fn relay(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !(1..=10_000).contains(&args.queues) || args.count == 0 || args.count > MAX_COUNT {
        return Err(format!("--relay needs --queues between 1 and 10000 and --count between 1 and {MAX_COUNT}").into());
    }
    let prefix = format!("agenttask-loadtest.relay.{}", uuid::Uuid::new_v4().simple());
    let f = relay::run(
        &args.amqp_url,
        &prefix,
        args.count,
        args.queues,
        !args.classic_queues,
        args.concurrency,
        Duration::from_secs(args.deadline),
    )
    .await?;
    let mut sorted = f.latency_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let pct =
        |p: f64| sorted.get(((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    let rate = f.tasks as f64 / f.seconds;
    if args.output == Output::Json {
        let summary = serde_json::json!({
            "tasks": f.tasks, "queues": f.queues, "queue_type": if f.quorum { "quorum" } else { "classic" }, "task_bytes": f.task_bytes, "result_bytes": f.result_bytes,
            "seconds": f.seconds, "tasks_per_second": rate,
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1.0)},
        });
        println!("{summary}");
    } else {
        println!(
            "RabbitMQ alone, the service's message work: {} tasks over {} {} queues (task {} bytes, result {} bytes): {rate:.0} tasks/s; publish->reply p50 {:.0} ms, p99 {:.0} ms",
            f.tasks, f.queues, if f.quorum { "quorum" } else { "classic" }, f.task_bytes, f.result_bytes, pct(0.5), pct(0.99)
        );
    }
    Ok(ExitCode::SUCCESS)
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
    let body = task_message(&id, Body::Print);
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
    if args.output == Output::Json {
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

#[cfg(test)]
mod tests {
    use super::loopback_host;

    #[test]
    fn only_loopback_brokers_are_accepted() {
        for ok in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://localhost",
            "amqp://u:p@[::1]:5672/v",
            "amqp://127.0.0.2/",
        ] {
            assert!(loopback_host(ok).is_ok(), "{ok}");
        }
        for bad in ["amqp://guest:guest@10.0.0.5:5672/%2f", "amqp://rabbit.example.com", "amqp://u:p@[2001:db8::1]/"] {
            assert!(loopback_host(bad).unwrap_err().contains("loopback"), "{bad}");
        }
    }
}
