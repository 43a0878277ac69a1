//! `agenttask-kubesim`: a Kubernetes API server emulator with a node, so the Kubernetes path of
//! AgentTask (and `kubectl --server`) can be exercised on a machine without a cluster.
//!
//! ```text
//! agenttask-kubesim --addr 127.0.0.1:PORT [--kubelet simulate|exec|none] [--pv-root DIR]
//! ```
//! serves the REST API on plain HTTP, keeps everything in memory, and prints one line with its URL
//! (`http://127.0.0.1:PORT`) once it accepts connections. Test support only: the service never
//! links it.
//!
//! # Layout
//! - `api`: HTTP routing, content negotiation (JSON, `Table`, `PartialObjectMetadata`), get, list
//!   (selectors, `limit`/`continue`), watch (replay from a resourceVersion, bookmarks, 410) and
//!   discovery.
//! - `objects`: the write path (create, update, patch, apply, delete) with metadata, preconditions,
//!   status subresource rules, finalizers and graceful pod deletion.
//! - `store`: objects, the global resourceVersion and the bounded change log watches replay.
//! - `registry`: the served kinds (built-in and CRD-defined) and their discovery documents.
//! - `admission`: RuntimeClass and Pod Security admission for pods.
//! - `schema`: CRD structural schemas (pruning, defaulting, validation), unknown-field detection
//!   for built-ins, metadata validation.
//! - `protobuf`: decoding the protobuf request bodies of client-go's typed clients.
//! - `patch`: JSON merge patch, JSON patch, strategic merge patch.
//! - `ssa`: managedFields and server-side apply.
//! - `openapi`: the OpenAPI v3 surface kubectl checks for server-side field validation.
//! - `table`: printer columns.
//! - `yaml`: YAML responses.
//! - `selectors`: label and field selectors, the JSONPath of printer columns.
//! - `gc`: garbage collector, namespace controller, CRD cleanup.
//! - `kubelet`: scheduler, the pod lifecycle, the `simulate` kubelet, container logs.
//! - `exec`: the `exec` kubelet: containers run for real under bubblewrap.
//! - `agent_sandbox`: the kubernetes-sigs/agent-sandbox controllers (Sandbox, SandboxWarmPool,
//!   SandboxClaim), active once their CRDs are applied, with its failure switches.
//!
//! # The simulated kubelet
//! Every pod is bound to the node `kubesim-node`, then goes Pending (ContainerCreating) → Running
//! → Succeeded or Failed, with `status.containerStatuses` (states, exit codes, restart counts),
//! conditions, Events (Scheduled, Pulled, Created, Started, Killing, Failed, BackOff,
//! DeadlineExceeded) and logs. `restartPolicy` is honoured (Always and OnFailure restart the
//! containers with a CrashLoopBackOff wait after a failure). `activeDeadlineSeconds` always
//! applies: a pod still active when it runs out fails with reason `DeadlineExceeded`. A graceful
//! delete stops the containers (exit 137) and then removes the pod. Pod annotations choose the
//! rest (`<name>.<container>` overrides a per-container value where noted):
//!
//! | annotation | meaning | default |
//! |---|---|---|
//! | `kubesim.agenttask.io/outcome` | `exit` (containers exit with `exit-code`), `OOMKilled` (exit 137, reason OOMKilled), `DeadlineExceeded` (runs until `activeDeadlineSeconds` ends it, or forever), `ErrImagePull` / `ImagePullBackOff` (the pull fails: waiting ErrImagePull, then ImagePullBackOff, alternating, the pod stays Pending), `vanish` (the pod disappears while running, without a final status) | `exit` |
//! | `kubesim.agenttask.io/exit-code[.<container>]` | exit code of the containers | `0` |
//! | `kubesim.agenttask.io/stdout[.<container>]` | what the container prints (its log) | empty |
//! | `kubesim.agenttask.io/termination-message[.<container>]` | what the container writes to its `terminationMessagePath` (`state.terminated.message`); without it, `FallbackToLogsOnError` takes the log's tail on failure | none |
//! | `kubesim.agenttask.io/start-delay-ms` | time in ContainerCreating (a slow start) | `50` |
//! | `kubesim.agenttask.io/run-ms` | time Running before the containers exit | `200` |
//! | `kubesim.agenttask.io/restart-delay-ms` | wait before a restart (restartPolicy Always/OnFailure) | `1000` |
//!
//! # Test controls
//! `POST /kubesim/close-watches` ends every open watch (clients must re-watch);
//! `POST /kubesim/compact` forgets the change log, so re-watching from an older resourceVersion
//! gets `410 Gone` (`Expired`), as after an etcd compaction.

mod admission;
mod agent_sandbox;
mod api;
mod errors;
mod exec;
mod gc;
mod kubelet;
mod objects;
mod openapi;
mod patch;
mod protobuf;
mod registry;
mod schema;
mod selectors;
mod ssa;
mod store;
mod table;
mod yaml;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::api::App;
use crate::objects::WriteCtx;
use crate::store::Inner;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KubeletMode {
    /// Plays every pod's life from its annotations.
    Simulate,
    /// Runs containers for real under bubblewrap as the user agenttask-sandbox.
    Exec,
    /// No node: pods stay Pending and unscheduled.
    None,
}

/// A Kubernetes API server emulator with a simulated node (test support).
#[derive(Debug, Parser)]
#[command(name = "agenttask-kubesim", version)]
struct Args {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// What plays the node.
    #[arg(long, value_enum, default_value = "simulate")]
    kubelet: KubeletMode,
    /// How many changes watches can replay; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    watch_window: usize,
    /// Seconds between watch bookmarks (for watches that allow them).
    #[arg(long, default_value_t = 1.0)]
    bookmark_interval: f64,
    /// Directory holding PersistentVolumeClaims' data for the exec kubelet: claim NAME in
    /// namespace NS is DIR/NS/NAME, created when a pod first mounts it [default: claims cannot be
    /// mounted]
    #[arg(long)]
    pv_root: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agenttask-kubesim: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (close_watches, _) = tokio::sync::watch::channel(0u64);
    let app = Arc::new(App {
        inner: Mutex::new(Inner::new(args.watch_window)),
        gc_wake: tokio::sync::Notify::new(),
        close_watches,
        logs: Default::default(),
        url: url.clone(),
        bookmark_interval: Duration::from_secs_f64(args.bookmark_interval.max(0.05)),
        pv_root: args.pv_root,
    });
    seed(&app);
    tokio::spawn(gc::run(app.clone()));
    if args.kubelet != KubeletMode::None {
        kubelet::register_node(&app);
        tokio::spawn(kubelet::run(app.clone(), args.kubelet == KubeletMode::Exec));
        tokio::spawn(agent_sandbox::run(app.clone()));
    }
    let router = axum::Router::new().fallback(api::handle).with_state(app);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{url}")?;
    out.flush()?;
    drop(out);
    // Open watches never end by themselves: after SIGTERM/SIGINT, requests in flight get a
    // moment to finish, then the process exits as an API server's shutdown closes its watches.
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown().await;
        let _ = stopping_tx.send(());
    });
    let drain = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served,
        () = drain => Ok(()),
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The namespaces every cluster has.
fn seed(app: &App) {
    let mut inner = app.lock();
    let rt = inner.registry.find("", "v1", "namespaces").cloned().expect("namespaces are built in");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let mut ctx = WriteCtx::internal("kube-apiserver");
        objects::create(&mut inner, &rt, "v1", "", json!({"metadata": {"name": ns}}), &mut ctx)
            .expect("seed namespace");
    }
}
