//! Test harness: a service per test, its own database and tenants, and an AMQP client.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use agenttask::config::{Component, ServeArgs, Settings};

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672";

pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// An isolated environment: a database, tenant names nobody else uses, a data dir.
///
/// Cleanup is panic-safe: dropping an `Env` (at the end of a test, or while a failed assertion
/// unwinds) drops its database, deletes the queues of every tenant it ever named (from its
/// tenants files and [`Env::tenant`]) and its vhost. [`Env::cleanup`] does the same, awaited.
pub struct Env {
    pub id: String,
    pub database_url: String,
    pub amqp_url: String,
    pub vhost: Option<String>,
    pub dir: tempfile::TempDir,
    pub tenants_path: PathBuf,
    /// Every tenant name this environment handed out or wrote into a tenants file.
    tenants_seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
    cleaned: bool,
}

/// A running service inside the test process.
pub struct Service {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), agenttask::service::ServiceError>>,
    pub http_addr: std::net::SocketAddr,
}

impl Env {
    /// `tenants_toml` uses `{t}` for this environment's prefix, e.g. `[tenants.{t}-a]`.
    pub async fn new(tenants_toml: &str) -> Env {
        Self::build(tenants_toml, None).await
    }

    /// Like [`Env::new`], in a fresh RabbitMQ vhost (for tests that close all connections).
    pub async fn with_vhost(tenants_toml: &str) -> Env {
        let vhost = format!("agenttask-test-{}", unique());
        rabbitmqctl(&["add_vhost", &vhost]).await;
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]).await;
        Self::build(tenants_toml, Some(vhost)).await
    }

    async fn build(tenants_toml: &str, vhost: Option<String>) -> Env {
        let id = unique();
        let dir = tempfile::tempdir().unwrap();
        let tenants_path = dir.path().join("tenants.toml");
        std::fs::write(&tenants_path, tenants_toml.replace("{t}", &format!("t{id}"))).unwrap();
        let amqp_url = match &vhost {
            Some(v) => format!("{AMQP}/{v}"),
            None => format!("{AMQP}/%2f"),
        };
        Env {
            database_url: format!("{PG}/agenttask_test_{id}"),
            amqp_url,
            vhost,
            tenants_path,
            dir,
            id,
            tenants_seen: Default::default(),
            cleaned: false,
        }
    }

    /// The tenant name for a suffix: `tenant("a")` is `t<id>-a`.
    pub fn tenant(&self, suffix: &str) -> String {
        let name = format!("t{}-{suffix}", self.id);
        self.tenants_seen.lock().unwrap().insert(name.clone());
        name
    }

    /// The tenants named in this environment's tenants file right now.
    fn tenants_in_file(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.tenants_path).unwrap_or_default();
        agenttask::domain::tenant::parse_tenants(&text)
            .map(|t| t.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    pub fn settings(&self, components: &[Component]) -> Settings {
        let port = free_port();
        Settings::resolve(ServeArgs {
            database_url: Some(self.database_url.clone()),
            amqp_url: Some(self.amqp_url.clone()),
            tenants: Some(self.tenants_path.clone()),
            http_addr: Some(format!("127.0.0.1:{port}").parse().unwrap()),
            components: Some(components.to_vec()),
            max_running: Some(4),
            // Many services run at once in this suite (and other suites on the same server): a
            // small pool each keeps them under Postgres' max_connections.
            database_pool_size: Some(8),
            data_dir: Some(self.dir.path().join("data")),
            admin_token: Some("test-admin-token".into()),
            config: Some(self.dir.path().join("none.toml")).filter(|p| p.exists()),
            ..Default::default()
        })
        .unwrap()
    }

    pub async fn start(&self) -> Service {
        self.start_with(self.settings(&Component::ALL)).await
    }

    pub async fn start_with(&self, settings: Settings) -> Service {
        let components_include_ingest = settings.runs(Component::Ingest);
        let shutdown = CancellationToken::new();
        let http_addr = settings.http_addr;
        let runs_http = settings.runs(Component::Http);
        let handle = tokio::spawn(agenttask::service::run(settings, shutdown.clone()));
        let svc = Service { shutdown, handle, http_addr };
        // Ready when `/readyz` says so (database and RabbitMQ up); then, with ingest, when every
        // tenant's task queue has a consumer (before that, a message for the tenant would be
        // routed to the alternate exchange as an unknown tenant).
        if runs_http {
            await_ready(http_addr).await;
        }
        if components_include_ingest {
            let conn = self.connect().await;
            for t in self.tenants_in_file() {
                self.tenants_seen.lock().unwrap().insert(t.clone());
                let q = format!("agenttask.tasks.{t}");
                eventually(Duration::from_secs(30), || queue_has_consumer(&conn, &q)).await;
            }
            let _ = conn.close(200, "ok".into()).await;
        }
        svc
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default()).await.expect("RabbitMQ reachable")
    }

    pub async fn pg(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&self.database_url).await.unwrap()
    }

    /// Drops the database, the tenants' queues and the vhost. Call at the end of a test (dropping
    /// the `Env` does the same, for a test that panicked before it got here).
    pub async fn cleanup(mut self) {
        self.remove_everything().await;
        self.cleaned = true;
    }

    async fn remove_everything(&self) {
        if self.vhost.is_none() {
            // Queues are durable: remove this test's, or every run leaves some behind.
            // A broker that accepts connections but never answers must not hang the cleanup.
            let connect = Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default());
            if let Ok(Ok(conn)) = tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
                let mut tenants = self.tenants_seen.lock().unwrap().clone();
                tenants.extend(self.tenants_in_file());
                for t in tenants {
                    for q in [format!("agenttask.tasks.{t}"), format!("agenttask.results.{t}")] {
                        if let Ok(ch) = conn.create_channel().await {
                            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                            let _ = ch.close(200, "ok".into()).await;
                        }
                    }
                }
                let _ = conn.close(200, "ok".into()).await;
            }
        }
        if let Ok(pool) = sqlx::PgPool::connect(&format!("{PG}/postgres")).await {
            let stmt = format!("drop database if exists agenttask_test_{} with (force)", self.id);
            let _ = sqlx::query(sqlx::AssertSqlSafe(stmt)).execute(&pool).await;
        }
        if let Some(v) = &self.vhost {
            rabbitmqctl(&["delete_vhost", v]).await;
        }
    }
}

impl Drop for Env {
    /// Panic-safe cleanup: a test that failed halfway still leaves no database, queue or vhost
    /// behind. Runs on its own thread and runtime, since `drop` cannot await.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let env = Env {
            id: self.id.clone(),
            database_url: self.database_url.clone(),
            amqp_url: self.amqp_url.clone(),
            vhost: self.vhost.clone(),
            dir: tempfile::tempdir().unwrap(),
            tenants_path: self.tenants_path.clone(),
            tenants_seen: std::sync::Mutex::new(self.tenants_seen.lock().map(|s| s.clone()).unwrap_or_default()),
            cleaned: true,
        };
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(env.remove_everything());
        })
        .join();
    }
}

/// Waits until the service's `/readyz` answers 200 (database and RabbitMQ up).
pub async fn await_ready(addr: std::net::SocketAddr) {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/readyz");
    eventually(Duration::from_secs(30), || {
        let req = client.get(&url).send();
        async move { req.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
}

impl Service {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let res = tokio::time::timeout(Duration::from_secs(20), self.handle).await.expect("service stops within 20s");
        res.expect("service task").expect("service ran cleanly");
    }
}

/// What most tests start from: an environment, its service running, a client and the tenant `a`.
pub struct Started {
    pub env: Env,
    pub svc: Service,
    pub client: Client,
    pub tenant: String,
}

/// [`Env::new`] with `tenants_toml`, its service started with every component, a client, and
/// the tenant `a`.
pub async fn started(tenants_toml: &str) -> Started {
    started_with(tenants_toml, |env| env.settings(&Component::ALL)).await
}

/// Like [`started`], the service started with the settings `settings` makes for the environment.
pub async fn started_with(tenants_toml: &str, settings: impl FnOnce(&Env) -> Settings) -> Started {
    let env = Env::new(tenants_toml).await;
    let svc = env.start_with(settings(&env)).await;
    let client = Client::new(&env).await;
    let tenant = env.tenant("a");
    Started { env, svc, client, tenant }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl").args(args).output().await.expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A client of the service: publishes tasks, reads results from a private reply queue.
pub struct Client {
    pub conn: Connection,
    pub channel: Channel,
    pub reply_queue: String,
    replies: Consumer,
}

impl Client {
    pub async fn new(env: &Env) -> Client {
        let conn = env.connect().await;
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_queue = q.name().as_str().to_owned();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "test".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Client { conn, channel, reply_queue, replies }
    }

    /// Publishes a raw body to the tenant's routing key, replying to this client's queue.
    pub async fn publish_raw(&self, tenant: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish("agenttask.tasks".into(), tenant.into(), BasicPublishOptions::default(), body, props)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
    }

    pub fn props(&self, correlation: &str) -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation.into())
            .with_reply_to(self.reply_queue.as_str().into())
    }

    pub async fn submit(&self, tenant: &str, task: &Value) {
        let corr = task.get("id").and_then(Value::as_str).unwrap_or("no-id").to_owned();
        self.publish_raw(tenant, &serde_json::to_vec(task).unwrap(), self.props(&corr)).await;
    }

    /// The next result on the reply queue, with its AMQP properties.
    pub async fn next(&mut self, within: Duration) -> (Value, BasicProperties) {
        let d = tokio::time::timeout(within, self.replies.next())
            .await
            .expect("a result within the deadline")
            .expect("consumer open")
            .expect("delivery");
        (serde_json::from_slice(&d.data).expect("result is JSON"), d.properties)
    }

    /// Whether another result arrives within `within` (for "exactly one" checks).
    pub async fn more(&mut self, within: Duration) -> Option<Value> {
        match tokio::time::timeout(within, self.replies.next()).await {
            Ok(Some(Ok(d))) => Some(serde_json::from_slice(&d.data).unwrap()),
            _ => None,
        }
    }
}

/// Reads one header of a result as text.
pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Waits until `f` returns true, checking every 50 ms.
pub async fn eventually<F, Fut>(within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within {within:?}");
}

pub const ONE_TENANT: &str = "[tenants.{t}-a]\n";

/// A service in its own OS process (`agenttask serve`), for tests that kill processes.
pub struct Process {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Env {
    pub fn spawn_process(&self, name: &str, components: &str, http_port: u16, max_running: u32) -> Process {
        self.spawn_process_with(name, components, http_port, max_running, &[])
    }

    /// [`Env::spawn_process`] with more settings, e.g. `("AGENTTASK_BACKEND", "null")`.
    pub fn spawn_process_with(
        &self,
        name: &str,
        components: &str,
        http_port: u16,
        max_running: u32,
        extra_env: &[(&str, &str)],
    ) -> Process {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agenttask"))
            .args(["serve", "--components", components])
            .env("AGENTTASK_DATABASE_URL", &self.database_url)
            .env("AGENTTASK_AMQP_URL", &self.amqp_url)
            .env("AGENTTASK_TENANTS", &self.tenants_path)
            .env("AGENTTASK_DATA_DIR", self.dir.path().join(format!("data-{name}")))
            .env("AGENTTASK_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("AGENTTASK_MAX_RUNNING", max_running.to_string())
            .env("AGENTTASK_ADMIN_TOKEN", "test-admin-token")
            .env("AGENTTASK_LOG", "info,agenttask=debug")
            .envs(extra_env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("agenttask starts");
        Process { child, log }
    }
}

/// The lines of a service's JSON log that its own code (not a library) logged at error.
pub fn service_errors(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(r#""level":"ERROR""#) && l.contains(r#""target":"agenttask"#)).collect()
}

impl Process {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    /// A failing test shows what the process said.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let status = self.child.try_wait();
            eprintln!("----- {} ({status:?}) -----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Counts rows of a query returning one bigint.
/// The task id stored for the client's id.
pub async fn task_id(pool: &sqlx::PgPool, client_id: &str) -> String {
    let id: uuid::Uuid = sqlx::query_scalar("select task_id from agenttask.tasks where client_id = $1")
        .bind(client_id)
        .fetch_one(pool)
        .await
        .unwrap();
    id.to_string()
}

/// The task's phase, or "" while it is not stored yet.
pub async fn phase(pool: &sqlx::PgPool, client_id: &str) -> String {
    sqlx::query_scalar("select phase from agenttask.tasks where client_id = $1")
        .bind(client_id)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or_default()
}

pub async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until `sql`, a query returning one bigint, answers what `ok` accepts.
pub async fn until_count(within: Duration, pool: &sqlx::PgPool, sql: &'static str, ok: impl Fn(i64) -> bool) {
    eventually(within, || async { ok(count(pool, sql).await) }).await;
}

/// A task that sleeps, for tests that need tasks to hold their slot for a while.
pub fn sleeper(id: &str, seconds: f64) -> Value {
    serde_json::json!({"id": id, "language": "python", "code": format!("import time\ntime.sleep({seconds})"), "timeout_seconds": 60})
}

/// Publishes without a reply queue (results go to the tenant's results queue), and waits for
/// the broker's confirm: when this returns, the message is in the tenant's queue. `ch` must be
/// in confirm mode (`confirm_select`); otherwise there is no confirm and this fails.
pub async fn publish_plain(ch: &Channel, tenant: &str, task: &Value) {
    let props = BasicProperties::default().with_content_type("application/json".into());
    let confirm = ch
        .basic_publish(
            "agenttask.tasks".into(),
            tenant.into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(task).unwrap(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
}

/// Whether `queue` exists and has a consumer. Uses a throwaway channel: a passive declare of a
/// missing queue closes the channel it runs on.
pub async fn queue_has_consumer(conn: &Connection, queue: &str) -> bool {
    let Ok(ch) = conn.create_channel().await else { return false };
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let found = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .map(|q| q.consumer_count() > 0)
        .unwrap_or(false);
    let _ = ch.close(200, "ok".into()).await;
    found
}

/// A TCP proxy in front of a real server, to cause an outage for real without touching the
/// server that every other test shares: [`Proxy::cut`] closes every connection through it and
/// turns new ones away; [`Proxy::restore`] lets them through again.
pub struct Proxy {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: &'static str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (o, l) = (open.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    // Down: the client sees its connection closed at once.
                    drop(inbound);
                    continue;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { continue };
                let link = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                l.lock().unwrap().push(link.abort_handle());
            }
        });
        Proxy { port, open, links, accept }
    }

    /// The outage: every connection through the proxy is dropped, new ones are turned away.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// The end of the outage.
    pub fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `/readyz`: its status code and body.
pub async fn readyz(addr: std::net::SocketAddr) -> (u16, Value) {
    match reqwest::get(format!("http://{addr}/readyz")).await {
        Ok(r) => {
            let code = r.status().as_u16();
            (code, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Messages in `queue` of this environment's vhost, ready and unacknowledged together (None
/// when the queue does not exist). Ingest acks a message only after storing it, so 0 means
/// every message published to the queue has been handled.
pub async fn queue_messages(env: &Env, queue: &str) -> Option<u64> {
    let vhost = env.vhost.clone().unwrap_or_else(|| "/".into());
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", &vhost, "name", "messages"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
}

/// The positive signal before asserting that nothing more arrives: every message published to
/// the tenant's task queue was handled (acked after its commit), and every stored result was
/// published (the outbox is empty). Whatever has not arrived by then was never sent.
pub async fn settled(env: &Env, pool: &sqlx::PgPool, tenant: &str) {
    let queue = format!("agenttask.tasks.{tenant}");
    eventually(Duration::from_secs(60), || async { queue_messages(env, &queue).await == Some(0) }).await;
    eventually(Duration::from_secs(60), || async { count(pool, "select count(*) from agenttask.outbox").await == 0 })
        .await;
}

/// Runs the real agentctl binary against the service with `token` (none when empty); returns
/// (exit code, stdout, stderr).
pub async fn agentctl_as(svc: &Service, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"));
    cmd.args(["--server", &format!("http://{}", svc.http_addr)]);
    if !token.is_empty() {
        cmd.args(["--token", token]);
    }
    let out = cmd
        .args(args)
        .env_remove("AGENTCTL_TENANT")
        .env_remove("AGENTCTL_TOKEN")
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("agentctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One task API request with `token` (none when empty): (status, JSON body or Null).
pub async fn api_call(svc: &Service, method: reqwest::Method, path: &str, token: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", svc.http_addr));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("the API answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Stores a task row directly (for API tests that need no ingest); returns its task id.
pub async fn insert_task_row(
    pool: &sqlx::PgPool,
    tenant: &str,
    client_id: &str,
    batch: Option<&str>,
    phase: &str,
    labels: Value,
    submitted_at: chrono::DateTime<chrono::Utc>,
) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "insert into agenttask.tasks (task_id, tenant, client_id, batch_id, language, phase, labels, \
           timeout_seconds, reply_exchange, reply_routing_key, submitted_at) \
         values ($1, $2, $3, $4, 'python', $5, $6, 30, '', 'nowhere', $7)",
    )
    .bind(id)
    .bind(tenant)
    .bind(client_id)
    .bind(batch)
    .bind(phase)
    .bind(labels)
    .bind(submitted_at)
    .execute(pool)
    .await
    .unwrap();
    id
}
