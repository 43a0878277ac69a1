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
    #[command(subcommand)]
    command: Command,
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
        Command::Render(args) => return agenttask::kube::render::main(args),
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTTASK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let settings = Settings::resolve(args).map_err(anyhow::Error::msg)?;
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                agenttask::service::run(settings, shutdown).await
            }
            Command::Crd | Command::Render(_) => unreachable!("handled before the runtime starts"),
            Command::Migrate(args) => {
                let settings = Settings::resolve(args).map_err(anyhow::Error::msg)?;
                agenttask::store::Store::connect(&settings.database_url, 2).await?;
                eprintln!("migrations applied to {}", agenttask::store::redact(&settings.database_url));
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM stops the service cleanly: running tasks are handed back, not lost.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
