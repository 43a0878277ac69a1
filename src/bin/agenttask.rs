//! `agenttask`: the service binary. Only parses flags and hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use agenttask::config::{ServeArgs, Settings};

/// AgentTask runs untrusted Python and R code for many tenants: tasks come in on RabbitMQ,
/// live in Postgres, are admitted under each tenant's quotas, run in a sandbox, and end in
/// exactly one result message.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: text for people, json (one object per line) for log collectors
    /// [default: text on a terminal, json otherwise]. AGENTTASK_LOG sets the level (e.g. debug).
    #[arg(long, global = true, env = "AGENTTASK_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: ingest, scheduler, executor, result publisher and HTTP endpoints
    /// (or a subset, with --components). Applies migrations first.
    ///
    /// Example: agenttask serve --tenants deploy/tenants.example.toml
    Serve(ServeArgs),
    /// Create the database if needed and apply migrations, then exit.
    Migrate(ServeArgs),
    /// Print the AgentTask CustomResourceDefinition as YAML (deploy/crd.yaml is this output).
    ///
    /// Example: agenttask crd | kubectl apply -f -
    Crd,
    /// Print the OpenAPI document of the HTTP API as JSON (deploy/openapi.json is this output;
    /// the service serves the same at /openapi.json).
    ///
    /// Example: agenttask openapi > deploy/openapi.json
    Openapi,
    /// Print, as YAML, every Kubernetes object a task would become (a dry run; no cluster needed).
    ///
    /// Example: agenttask render --backend podjob --tenant acme task.json
    Render(agenttask::kube::render::RenderArgs),
}

fn main() -> ExitCode {
    agenttask::amqp::reserve_parser_stack();
    let cli = Cli::parse();
    match &cli.command {
        Command::Crd => {
            print!("{}", agenttask::kube::crd::crd_yaml());
            return ExitCode::SUCCESS;
        }
        Command::Openapi => {
            print!("{}", agenttask::http::openapi::json());
            return ExitCode::SUCCESS;
        }
        Command::Render(args) => return agenttask::kube::render::main(args),
        Command::Serve(_) | Command::Migrate(_) => {}
    }
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(agenttask::amqp::THREAD_STACK_BYTES)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let settings = Settings::resolve(args)?;
                let shutdown = CancellationToken::new();
                // The signal handler runs beside the service on this task, not spawned: it only
                // has to turn the first SIGINT/SIGTERM into a graceful shutdown.
                let service = agenttask::service::run(settings, shutdown.clone());
                tokio::pin!(service);
                tokio::select! {
                    result = &mut service => return Ok(result?),
                    () = stop_on_signal() => shutdown.cancel(),
                }
                Ok(service.await?)
            }
            Command::Migrate(args) => {
                let settings = Settings::resolve(args)?;
                agenttask::store::Store::connect(&settings.database_url, 2).await?;
                eprintln!("migrations applied to {}", agenttask::store::redact(&settings.database_url));
                Ok(())
            }
            Command::Crd | Command::Openapi | Command::Render(_) => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: our error types already quote their cause in their
/// message (so logs show it), and `{:#}` would print it again after them.
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn init_logs(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTTASK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format.unwrap_or(if terminal { LogFormat::Text } else { LogFormat::Json }) {
        // Spans' fields (task id, tenant) go into every event's object.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
        // Colours only for a person at a terminal, never escape codes in a file.
        LogFormat::Text => logs.with_ansi(terminal).init(),
    }
}

/// Returns at the first SIGINT or SIGTERM. The service then stops cleanly: running tasks are
/// handed back, not lost. If the handlers cannot be installed, it never returns (the process
/// can still be killed), and says so.
async fn stop_on_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers; stop the service with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach X: {0}")]
    struct Quotes(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        // A cause already in the message is not repeated ...
        assert_eq!(report(&anyhow::Error::new(Quotes(refused()))), "cannot reach X: refused");
        // ... one that is not, is added.
        let e = anyhow::Error::new(refused()).context("starting");
        assert_eq!(report(&e), "starting: refused");
    }
}
