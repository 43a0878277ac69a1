//! agentctl's batch commands against a running service: `batch submit` (validation, resume, a
//! connection lost halfway), `wait` (output and exit codes), and where settings come from.
//! Each runs the real binary with a private config directory, so the machine's own
//! ~/.config/agentctl cannot leak in.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use agenttask::config::{BackendKind, Component};

use crate::support::*;

const ADMIN: &str = "test-admin-token";

/// Runs agentctl with `AGENTCTL_SERVER`, `AGENTCTL_AMQP_URL` and the admin token from the
/// environment (as a user's shell would set them), `XDG_CONFIG_HOME` = `config_home`, and
/// `extra` environment variables; returns (exit code, stdout, stderr).
async fn ctl(
    svc: &Service,
    amqp_url: &str,
    config_home: &Path,
    extra: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"));
    cmd.args(args)
        .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
        .env("AGENTCTL_AMQP_URL", amqp_url)
        .env("AGENTCTL_TOKEN", ADMIN)
        .env("XDG_CONFIG_HOME", config_home)
        .env("NO_COLOR", "1")
        .env_remove("AGENTCTL_TENANT");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("agentctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Human output with what changes between runs replaced: uuids by `<uuid>`, the tenant by
/// `<tenant>`, durations by `<n> ms`, and trailing spaces cut.
fn normalise(text: &str, tenant: &str) -> String {
    let mut out = String::new();
    for line in text.replace(tenant, "<tenant>").lines() {
        let mut words: Vec<String> = Vec::new();
        let mut rest = line;
        // Keep the spacing: replace within the line, token by token.
        while !rest.is_empty() {
            let end = rest.find(' ').map_or(rest.len(), |i| i + 1);
            let (word, tail) = rest.split_at(end);
            let bare = word.trim_end();
            let w =
                if uuid::Uuid::parse_str(bare).is_ok() { word.replacen(bare, "<uuid>", 1) } else { word.to_owned() };
            words.push(w);
            rest = tail;
        }
        let mut l = words.concat();
        if let Some(i) = l.find(" after ") {
            if let Some(j) = l[i..].find(" ms") {
                l.replace_range(i..i + j, " after <n>");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    out
}

/// Tasks of `batch` stored for `tenant`, and how many distinct client ids they have.
async fn stored(pool: &sqlx::PgPool, tenant: &str, batch: &str) -> (i64, i64) {
    sqlx::query_as(
        "select count(*), count(distinct client_id) from agenttask.tasks where tenant = $1 and batch_id = $2",
    )
    .bind(tenant)
    .bind(batch)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn batch_submit_then_wait_with_golden_output_and_a_resume_that_submits_nothing_twice() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let svc = env.start().await;
    let pool = env.pg().await;
    let t = env.tenant("a");
    let home = env.dir.path().join("config");
    let file = env.dir.path().join("tasks.jsonl");
    let lines = [
        r#"{"id": "ok-1", "code": "print(1)"}"#,
        r#"{"code": "cat(2)", "language": "r"}"#,
        "",
        r#"{"code": "import sys; sys.exit(3)", "labels": {"kind": "bad"}}"#,
        r#"{"id": "ok-5", "code": "print(5)"}"#,
    ];
    let run = |args: &'static [&'static str]| {
        let (svc, amqp, home, t, file) = (&svc, env.amqp_url.clone(), home.clone(), t.clone(), file.clone());
        async move {
            let mut all = vec!["--tenant", t.as_str()];
            all.extend(args.iter().map(|a| if *a == "FILE" { file.to_str().unwrap() } else { a }));
            ctl(svc, &amqp, &home, &[], &all).await
        }
    };

    // The first two lines, as if an earlier run had stopped there.
    std::fs::write(&file, lines[..2].join("\n")).unwrap();
    let (code, out, err) = run(&["batch", "submit", "FILE", "--batch", "eval"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        normalise(&out, &t),
        "batch eval of tenant <tenant>: submitted 2 (2 lines)\n\
         wait for it: agentctl wait --tenant <tenant> --batch eval --expect 2\n"
    );
    eventually(Duration::from_secs(30), || async { stored(&pool, &t, "eval").await.0 == 2 }).await;

    // The whole file: the two accepted lines are skipped, the rest submitted.
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, out, err) = run(&["batch", "submit", "FILE", "--batch", "eval"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        normalise(&out, &t),
        "batch eval of tenant <tenant>: submitted 2, skipped 2 already accepted (4 lines)\n\
         wait for it: agentctl wait --tenant <tenant> --batch eval --expect 4\n"
    );

    // wait --batch: exit 1 (one task failed), the summary and the task that failed.
    let (code, out, err) = run(&["wait", "--batch", "eval", "--expect", "4", "--timeout", "120"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        normalise(&out, &t),
        // (The uuid column is as wide as a uuid; `normalise` shortened the uuid only.)
        "batch eval of tenant <tenant>: 1 of 4 tasks did not succeed (3 succeeded, 1 failed)\n \
         TASK                                  ID      PHASE   REASON       EXIT\n \
         <uuid>  eval:4  Failed  NonZeroExit  3\n"
    );
    let (code, out, _) = run(&["-o", "json", "wait", "--batch", "eval"]).await;
    assert_eq!(code, 1);
    let mut status: Value = serde_json::from_str(&out).unwrap();
    for k in ["first_submitted_at", "last_finished_at", "p50_duration_ms", "p95_duration_ms"] {
        assert!(!status[k].is_null(), "{k} in {status:#}");
        status[k] = json!("<normalised>");
    }
    assert_eq!(
        status,
        json!({
            "tenant": t, "batch_id": "eval", "total": 4, "queued": 0, "running": 0, "succeeded": 3,
            "failed": 1, "rejected": 0, "cancelled": 0, "finished": true,
            "first_submitted_at": "<normalised>", "last_finished_at": "<normalised>",
            "p50_duration_ms": "<normalised>", "p95_duration_ms": "<normalised>",
        })
    );

    // wait for one task, by client id: exit 0 for a success, 1 for the failure.
    let (code, out, err) = run(&["wait", "ok-1"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(normalise(&out, &t), "task <uuid> (ok-1): Succeeded after <n> ms: exited with code 0\n");
    let (code, out, err) = run(&["wait", "eval:4"]).await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(normalise(&out, &t), "task <uuid> (eval:4): Failed (NonZeroExit) after <n> ms: exited with code 3\n",);
    let (code, out, _) = run(&["-o", "json", "wait", "eval:2"]).await;
    assert_eq!(code, 0);
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (view["phase"].as_str(), view["language"].as_str(), view["stdout"].as_str()),
        (Some("Succeeded"), Some("r"), Some("2"))
    );

    // Again, whole: nothing new, and no task twice.
    let (code, out, err) = run(&["-o", "json", "batch", "submit", "FILE", "--batch", "eval"]).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report, json!({"tenant": t, "batch": "eval", "lines": 4, "submitted": 0, "skipped": 4, "invalid": []}));
    settled(&env, &pool, &t).await;
    assert_eq!(stored(&pool, &t, "eval").await, (4, 4));

    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_file_with_bad_lines_is_reported_by_line_and_nothing_is_submitted_unless_asked() {
    let env = Env::new("[tenants.{t}-a]\nmax_timeout_seconds = 60\n").await;
    let svc = env.start().await;
    let pool = env.pg().await;
    let t = env.tenant("a");
    let home = env.dir.path().join("config");
    let file = env.dir.path().join("tasks.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"id": "good-1", "code": "print(1)"}"#,
            r#"{"id": "good-2", "code": "print(2)""#,
            r#"{"id": "typo", "code": "print(3)", "langauge": "python"}"#,
            r#"{"id": "good-4", "code": "print(4)"}"#,
            r#"{"id": "slow", "code": "print(5)", "timeout_seconds": 600}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) =
        ctl(&svc, &env.amqp_url, &home, &[], &["--tenant", &t, "batch", "submit", path, "--batch", "b"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out, "", "nothing on stdout: nothing was done");
    let err_lines: Vec<&str> = err.lines().collect();
    assert_eq!(err_lines.len(), 4, "{err}");
    assert!(err_lines[0].starts_with(&format!("{path}:2: not valid JSON")), "{err}");
    assert!(err_lines[1].starts_with(&format!("{path}:3: ")) && err_lines[1].contains("langauge"), "{err}");
    // The tenant's quota (the admin token may read it) is checked before anything is sent.
    assert!(err_lines[2].starts_with(&format!("{path}:5: timeout_seconds 600 is out of range")), "{err}");
    assert_eq!(
        err_lines[3],
        "3 of 5 lines are invalid; nothing was submitted. Fix them, or pass --skip-invalid to submit the others."
    );
    let (code, out, _) =
        ctl(&svc, &env.amqp_url, &home, &[], &["--tenant", &t, "-o", "json", "batch", "submit", path, "--batch", "b"])
            .await;
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((report["submitted"].as_u64(), report["lines"].as_u64()), (Some(0), Some(5)));
    assert_eq!(
        report["invalid"].as_array().unwrap().iter().map(|b| b["line"].as_u64().unwrap()).collect::<Vec<_>>(),
        [2, 3, 5]
    );
    assert_eq!(queue_messages(&env, &format!("agenttask.tasks.{t}")).await, Some(0), "nothing was published");
    assert_eq!(stored(&pool, &t, "b").await.0, 0);

    // --skip-invalid: the good lines go, the bad ones are still reported.
    let (code, out, err) = ctl(
        &svc,
        &env.amqp_url,
        &home,
        &[],
        &["--tenant", &t, "batch", "submit", path, "--batch", "b", "--skip-invalid"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with(&format!("batch b of tenant {t}: submitted 2, skipped 3 invalid (5 lines)")), "{out}");
    assert!(err.contains(":2: not valid JSON"), "{err}");
    settled(&env, &pool, &t).await;
    assert_eq!(stored(&pool, &t, "b").await, (2, 2));

    // Usage errors: exit 2, saying what to do.
    let (code, _, err) = ctl(&svc, &env.amqp_url, &home, &[], &["batch", "submit", path, "--batch", "b"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--tenant"), "{err}");
    let (code, _, err) =
        ctl(&svc, &env.amqp_url, &home, &[], &["--tenant", &t, "batch", "submit", "/no/such.jsonl", "--batch", "b"])
            .await;
    assert_eq!(code, 2);
    assert!(err.contains("cannot read /no/such.jsonl"), "{err}");
    let (code, _, err) =
        ctl(&svc, &env.amqp_url, &home, &[], &["--tenant", "nobody", "batch", "submit", path, "--batch", "b"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no tenant nobody"), "{err}");

    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn wait_exits_3_on_timeout_2_for_what_does_not_exist_and_1_for_a_cancelled_batch() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let svc = env.start().await;
    let t = env.tenant("a");
    let home = env.dir.path().join("config");
    let file = env.dir.path().join("slow.jsonl");
    std::fs::write(&file, serde_json::to_string(&sleeper("slow", 60.0)).unwrap()).unwrap();
    let amqp = env.amqp_url.as_str();
    let (code, _, err) =
        ctl(&svc, amqp, &home, &[], &["--tenant", &t, "batch", "submit", file.to_str().unwrap(), "--batch", "s"]).await;
    assert_eq!(code, 0, "{err}");

    let (code, out, err) =
        ctl(&svc, amqp, &home, &[], &["--tenant", &t, "wait", "--batch", "s", "--timeout", "2"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("not finished: 0 of 1 tasks"), "{out}");
    assert!(err.contains("timed out"), "{err}");

    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, _, err) = ctl(&svc, amqp, &home, &[], &["wait", &unknown, "--timeout", "1"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("check the id"), "{err}");
    let (code, _, err) =
        ctl(&svc, amqp, &home, &[], &["--tenant", &t, "wait", "--batch", "nope", "--timeout", "1"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no batch nope"), "{err}");
    let (code, _, err) = ctl(&svc, amqp, &home, &[], &["wait", "--batch", "s"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--tenant"), "{err}");

    let (code, _, err) = ctl(&svc, amqp, &home, &[], &["--tenant", &t, "cancel", "--batch", "s"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) =
        ctl(&svc, amqp, &home, &[], &["--tenant", &t, "wait", "--batch", "s", "--timeout", "60"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with(&format!("batch s of tenant {t}: 1 of 1 tasks did not succeed (1 cancelled)")), "{out}");
    assert!(out.contains("Cancelled  Cancelled"), "{out}");

    svc.stop().await;
    env.cleanup().await;
}

/// A TCP proxy to RabbitMQ that breaks the connection once the client has sent `limit` bytes:
/// a connection lost halfway through a batch, at a point that does not depend on timing.
async fn breaking_proxy(limit: usize) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (inbound, _) = listener.accept().await.unwrap();
        let outbound = tokio::net::TcpStream::connect("127.0.0.1:5672").await.unwrap();
        let (mut in_read, mut in_write) = inbound.into_split();
        let (mut out_read, mut out_write) = outbound.into_split();
        let back = tokio::spawn(async move { tokio::io::copy(&mut out_read, &mut in_write).await });
        let mut sent = 0;
        let mut buf = vec![0u8; 8192];
        while sent < limit {
            let n = in_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            let n = n.min(limit - sent);
            if out_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n;
        }
        back.abort();
        // Dropping both halves of both sides closes the connection mid-frame.
    });
    port
}

#[tokio::test]
async fn a_connection_lost_halfway_says_how_far_it_got_and_running_again_completes_the_batch() {
    let env = Env::new("[tenants.{t}-a]\nmax_queued = 100000\nrate_per_second = 100000\n").await;
    let mut settings = env.settings(&Component::ALL);
    settings.backend = BackendKind::Null;
    let svc = env.start_with(settings).await;
    let pool = env.pg().await;
    let t = env.tenant("a");
    let home = env.dir.path().join("config");
    let file = env.dir.path().join("many.jsonl");
    const N: usize = 1200;
    let text: String = (0..N).map(|i| format!("{{\"code\": \"print({i})\"}}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();

    // Well past the first window of unconfirmed publishes (each message is about 200 bytes on
    // the wire), before the end.
    let port = breaking_proxy(180_000).await;
    let broken = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let (code, out, err) =
        ctl(&svc, &broken, &home, &[], &["--tenant", &t, "batch", "submit", path, "--batch", "big"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(out, "");
    assert!(
        err.contains("the connection to RabbitMQ failed") && err.contains(&format!(" of {N} tasks were confirmed")),
        "{err}"
    );
    assert!(err.contains("Run the same command again to resume"), "{err}");
    let confirmed: usize = err.split(" after ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(confirmed > 0 && confirmed < N, "{err}");

    let (code, out, err) = ctl(
        &svc,
        &env.amqp_url,
        &home,
        &[],
        &["--tenant", &t, "-o", "json", "batch", "submit", path, "--batch", "big"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let (submitted, skipped) =
        (report["submitted"].as_u64().unwrap() as usize, report["skipped"].as_u64().unwrap() as usize);
    assert_eq!(submitted + skipped, N, "{report}");
    assert!(skipped <= confirmed + 1 && submitted < N, "{report} after {confirmed} confirmed");
    let (code, _, err) = ctl(
        &svc,
        &env.amqp_url,
        &home,
        &[],
        &["--tenant", &t, "wait", "--batch", "big", "--expect", &N.to_string(), "--timeout", "120"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    settled(&env, &pool, &t).await;
    assert_eq!(stored(&pool, &t, "big").await, (N as i64, N as i64), "every line once");

    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn settings_come_from_flags_then_env_then_the_config_file() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let now = chrono::Utc::now();
    insert_task_row(&pool, &a, "of-a", None, "Queued", json!({}), now).await;
    insert_task_row(&pool, &b, "of-b", None, "Queued", json!({}), now).await;
    let home = env.dir.path().join("config");
    let dir = home.join("agentctl");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    let server = format!("http://{}", svc.http_addr);
    let write = |text: String, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // Nothing from the environment: `list` runs on the file's server, token and tenant.
    let bare = |extra: Vec<(&'static str, String)>, args: Vec<String>| {
        let home = home.clone();
        async move {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentctl"));
            cmd.args(&args).env("XDG_CONFIG_HOME", &home).env("NO_COLOR", "1");
            for k in ["AGENTCTL_SERVER", "AGENTCTL_TOKEN", "AGENTCTL_TENANT", "AGENTCTL_AMQP_URL"] {
                cmd.env_remove(k);
            }
            for (k, v) in extra {
                cmd.env(k, v);
            }
            let out = cmd.output().await.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let ids = |out: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
        v.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect()
    };
    let list = || vec!["-o".to_owned(), "json".to_owned(), "list".to_owned()];

    write(format!("server = \"{server}\"\ntoken = \"{ADMIN}\"\ntenant = \"{a}\"\n"), 0o600);
    let (code, out, err) = bare(vec![], list()).await;
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(ids(&out), ["of-a"], "the file's tenant");
    // The environment beats the file; a flag beats the environment.
    let (code, out, err) = bare(vec![("AGENTCTL_TENANT", b.clone())], list()).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out), ["of-b"], "the environment's tenant");
    let mut flagged = list();
    flagged.extend(["--tenant".to_owned(), a.clone()]);
    let (code, out, err) = bare(vec![("AGENTCTL_TENANT", b.clone())], flagged).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out), ["of-a"], "the flag's tenant");
    let (code, _, err) = bare(vec![("AGENTCTL_SERVER", "http://127.0.0.1:1".into())], list()).await;
    assert_eq!(code, 2, "the environment's (unreachable) server, not the file's");
    assert!(err.contains("http://127.0.0.1:1") && err.contains("AGENTCTL_SERVER"), "{err}");
    let (code, _, err) = bare(vec![("AGENTCTL_TOKEN", "wrong".into())], list()).await;
    assert_eq!(code, 2, "the environment's (wrong) token, not the file's");
    assert!(err.contains("401"), "{err}");

    // The file's server is used only when neither a flag nor the environment names one.
    write(format!("server = \"http://127.0.0.1:1\"\ntoken = \"{ADMIN}\"\ntenant = \"{a}\"\n"), 0o600);
    let (code, out, err) = bare(vec![("AGENTCTL_SERVER", server.clone())], list()).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out), ["of-a"]);

    // A token in a file others can read: a warning, and the command still runs.
    write(format!("server = \"{server}\"\ntoken = \"{ADMIN}\"\n"), 0o644);
    let (code, out, err) = bare(vec![], list()).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out).len(), 2, "no tenant anywhere: the admin sees both");
    assert!(err.contains("warning:") && err.contains("chmod 600") && err.contains(config.to_str().unwrap()), "{err}");

    // An unknown key is an error naming the file and the key.
    write("server = \"http://x\"\ntokn = \"abc\"\n".into(), 0o600);
    let (code, out, err) = bare(vec![], list()).await;
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains(config.to_str().unwrap()) && err.contains("tokn"), "{err}");

    svc.stop().await;
    env.cleanup().await;
}

/// Runs agentctl on a terminal (a pseudo-terminal from util-linux `script`), typing `input`;
/// returns (exit code, everything the terminal showed).
async fn on_terminal(svc: &Service, env: &Env, extra: &[(&str, &str)], args: &[&str], input: &str) -> (i32, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut line = env!("CARGO_BIN_EXE_agentctl").to_owned();
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
        .env("AGENTCTL_AMQP_URL", &env.amqp_url)
        .env("AGENTCTL_TOKEN", ADMIN)
        .env("XDG_CONFIG_HOME", env.dir.path().join("config"))
        .env_remove("NO_COLOR")
        .env_remove("AGENTCTL_TENANT")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("script runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn on_a_terminal_many_tasks_are_confirmed_first_and_phases_are_coloured_unless_no_color() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let mut settings = env.settings(&Component::ALL);
    settings.backend = BackendKind::Null;
    let svc = env.start_with(settings).await;
    let pool = env.pg().await;
    let t = env.tenant("a");
    let file = env.dir.path().join("many.jsonl");
    std::fs::write(&file, (0..101).map(|i| format!("{{\"code\": \"print({i})\"}}\n")).collect::<String>()).unwrap();
    let submit = ["--tenant", t.as_str(), "batch", "submit", file.to_str().unwrap(), "--batch", "b"];

    let (code, shown) = on_terminal(&svc, &env, &[], &submit, "n\n").await;
    assert_eq!(code, 1, "{shown}");
    assert!(shown.contains(&format!("Submit 101 tasks to tenant {t} as batch b? [y/N]")), "{shown}");
    assert!(shown.contains("nothing was submitted"), "{shown}");
    assert_eq!(queue_messages(&env, &format!("agenttask.tasks.{t}")).await, Some(0));
    assert_eq!(stored(&pool, &t, "b").await.0, 0);

    let (code, shown) = on_terminal(&svc, &env, &[], &submit, "y\n").await;
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains(&format!("batch b of tenant {t}: submitted 101 (101 lines)")), "{shown}");
    let home = env.dir.path().join("config");
    let (code, _, err) =
        ctl(&svc, &env.amqp_url, &home, &[], &["--tenant", &t, "wait", "--batch", "b", "--expect", "101"]).await;
    assert_eq!(code, 0, "{err}");
    settled(&env, &pool, &t).await;
    assert_eq!(stored(&pool, &t, "b").await, (101, 101));

    // Phases in colour on a terminal; not with NO_COLOR.
    let list = ["--tenant", t.as_str(), "list", "--limit", "1"];
    let (code, shown) = on_terminal(&svc, &env, &[], &list, "").await;
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("\x1b[32mSucceeded\x1b[0m"), "{shown:?}");
    let (code, shown) = on_terminal(&svc, &env, &[("NO_COLOR", "1")], &list, "").await;
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("Succeeded") && !shown.contains('\x1b'), "{shown:?}");

    svc.stop().await;
    env.cleanup().await;
}
