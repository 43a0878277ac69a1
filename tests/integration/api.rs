//! The task API's tokens: two tenants' tokens against every endpoint. A tenant's token sees
//! and acts on its own tenant only (another tenant's task is a 404, and nothing changes), and
//! cannot manage tenants or tokens (403).

use reqwest::Method;
use serde_json::{json, Value};

use agenttask::config::Component;

use crate::support::*;

const ADMIN: &str = "test-admin-token";

/// Creates a token for `tenant` with agentctl; returns (id, token).
async fn new_token(svc: &Service, tenant: &str) -> (String, String) {
    let (code, out, err) = agentctl_as(svc, ADMIN, &["-o", "json", "tenant", "token", "create", tenant]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    (v["id"].as_str().unwrap().to_owned(), v["token"].as_str().unwrap().to_owned())
}

async fn phase_of(pool: &sqlx::PgPool, id: uuid::Uuid) -> String {
    sqlx::query_scalar("select phase from agenttask.tasks where task_id = $1").bind(id).fetch_one(pool).await.unwrap()
}

struct Side {
    tenant: String,
    token: String,
    token_id: String,
    /// In batch "b", stays queued until the tenant cancels its batch.
    in_batch: uuid::Uuid,
    /// Cancelled by its own tenant.
    single: uuid::Uuid,
}

#[tokio::test]
async fn each_tenants_token_sees_and_acts_on_its_own_tasks_only_on_every_endpoint() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let now = chrono::Utc::now();
    let mut sides = Vec::new();
    for s in ["a", "b"] {
        let tenant = env.tenant(s);
        let (token_id, token) = new_token(&svc, &tenant).await;
        let in_batch = insert_task_row(&pool, &tenant, "one", Some("b"), "Queued", json!({}), now).await;
        let single = insert_task_row(&pool, &tenant, "two", None, "Queued", json!({}), now).await;
        sides.push(Side { tenant, token, token_id, in_batch, single });
    }

    // Across tenants: every task endpoint says 404, exactly as for an unknown task, and nothing
    // changes; the admin endpoints say 403.
    for (me, other) in [(&sides[0], &sides[1]), (&sides[1], &sides[0])] {
        let t = me.token.as_str();
        let (o, ot) = (other.in_batch, &other.tenant);
        for (method, path) in [
            (Method::GET, format!("/v1/tasks/{o}")),
            (Method::GET, format!("/v1/tasks/one?tenant={ot}")),
            (Method::GET, format!("/v1/tasks/{o}?tenant={ot}")),
            (Method::GET, format!("/v1/tasks/{o}/position")),
            (Method::GET, format!("/v1/tasks/{o}/logs")),
            (Method::GET, format!("/v1/tasks/{o}/logs?follow=true")),
            (Method::GET, format!("/v1/tasks/{o}/artifacts/out.txt")),
            (Method::GET, format!("/v1/batches/{ot}/b")),
            (Method::GET, format!("/v1/batches/{ot}/b/results")),
            (Method::POST, format!("/v1/tasks/{o}/cancel")),
            (Method::POST, format!("/v1/tasks/{}/cancel", other.single)),
            (Method::POST, format!("/v1/batches/{ot}/b/cancel")),
            (Method::GET, format!("/v1/tasks/{}", uuid::Uuid::new_v4())),
            // A tenant's token reads its own tenant only: another is as absent as an unknown one.
            (Method::GET, format!("/v1/tenants/{ot}")),
            (Method::GET, "/v1/tenants/no-such-tenant".to_owned()),
        ] {
            let (status, body) = api_call(&svc, method.clone(), &path, t).await;
            assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{method} {path}: {body}");
        }
        for (method, path) in [
            (Method::GET, "/v1/tenants".to_owned()),
            (Method::PUT, "/v1/tenants".to_owned()),
            (Method::POST, format!("/v1/tenants/{}/tokens", me.tenant)),
            (Method::POST, format!("/v1/tenants/{ot}/tokens")),
            (Method::GET, "/v1/tokens".to_owned()),
            (Method::GET, format!("/v1/tokens?tenant={}", me.tenant)),
            (Method::DELETE, format!("/v1/tokens/{}", other.token_id)),
            (Method::DELETE, format!("/v1/tokens/{}", me.token_id)),
        ] {
            let (status, body) = api_call(&svc, method.clone(), &path, t).await;
            assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{method} {path}: {body}");
        }
        // And through agentctl: the same answers, exit status 2.
        let (code, _, err) = agentctl_as(&svc, t, &["get", &o.to_string()]).await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("404") && err.contains("no task"), "{err}");
        let (code, _, err) = agentctl_as(&svc, t, &["tenant", "token", "create", &me.tenant]).await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("403") && err.contains("admin token"), "{err}");
    }
    for s in &sides {
        for id in [s.in_batch, s.single] {
            assert_eq!(phase_of(&pool, id).await, "Queued", "another tenant's token changed nothing");
        }
    }
    let tokens: i64 = sqlx::query_scalar("select count(*) from agenttask.api_tokens").fetch_one(&pool).await.unwrap();
    assert_eq!(tokens, 2, "a tenant's token created no token");

    // Within its tenant: every endpoint works.
    for me in &sides {
        let t = me.token.as_str();
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/tasks/{}", me.in_batch), t).await;
        assert_eq!((status, body["tenant"].as_str()), (200, Some(me.tenant.as_str())), "{body}");
        // A client id needs no ?tenant= with a tenant's token: it is looked up in its own.
        let (status, body) = api_call(&svc, Method::GET, "/v1/tasks/one", t).await;
        assert_eq!((status, body["task_id"].as_str()), (200, Some(me.in_batch.to_string().as_str())), "{body}");
        let (status, _) = api_call(&svc, Method::GET, &format!("/v1/tasks/{}/logs", me.in_batch), t).await;
        assert_eq!(status, 200, "its own task's logs");
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/tenants/{}", me.tenant), t).await;
        assert_eq!((status, body["tenant"].as_str()), (200, Some(me.tenant.as_str())), "its own tenant: {body}");
        let (code, out, err) = agentctl_as(&svc, t, &["-o", "json", "tenant", "get", &me.tenant]).await;
        assert_eq!(code, 0, "agentctl tenant get with its own token: {out}{err}");
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/batches/{}/b", me.tenant), t).await;
        assert_eq!((status, body["total"].as_i64()), (200, Some(1)), "{body}");
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/tasks/{}/position", me.in_batch), t).await;
        assert_eq!((status, body["queued"].as_i64()), (200, Some(2)), "only its own tenant's queue: {body}");
        assert!(body["position"].as_i64().is_some_and(|p| p >= 1), "{body}");
        let (code, out, err) = agentctl_as(&svc, t, &["cancel", &me.single.to_string()]).await;
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = agentctl_as(&svc, t, &["--tenant", &me.tenant, "cancel", "--batch", "b"]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("1 cancelled"), "{out}");
        for id in [me.in_batch, me.single] {
            assert_eq!(phase_of(&pool, id).await, "Cancelled");
        }
    }

    // The admin token sees every tenant.
    for s in &sides {
        let (status, _) = api_call(&svc, Method::GET, &format!("/v1/tasks/{}", s.in_batch), ADMIN).await;
        assert_eq!(status, 200);
    }
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn tokens_are_stored_as_hashes_listed_and_revoked() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let tenant = env.tenant("a");
    let task = insert_task_row(&pool, &tenant, "k", None, "Succeeded", json!({}), chrono::Utc::now()).await;

    // Table output: the token alone on stdout, what to do with it on stderr.
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["tenant", "token", "create", &tenant]).await;
    assert_eq!(code, 0, "{err}");
    let token = out.trim().to_owned();
    assert!(token.starts_with("agt_") && !token.contains(char::is_whitespace), "{out}");
    assert!(err.contains("shown only now") && err.contains("AGENTCTL_TOKEN"), "{err}");
    let secret = token.rsplit_once('_').map(|(_, s)| s).unwrap().to_owned();

    // Nothing stored holds the token or its secret.
    let rows: Vec<String> =
        sqlx::query_scalar("select row_to_json(t)::text from agenttask.api_tokens t").fetch_all(&pool).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].contains(&secret) && !rows[0].contains(&token), "{}", rows[0]);

    let (status, _) = api_call(&svc, Method::GET, &format!("/v1/tasks/{task}"), &token).await;
    assert_eq!(status, 200);

    // Wrong, malformed and missing tokens: 401 with a JSON error.
    let mut wrong = token.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [wrong.as_str(), "agt_nothing", "not-the-admin-token", ""] {
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/tasks/{task}"), bad).await;
        assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")), "{bad:?}: {body}");
    }

    // Listed with its use, never its secret.
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["-o", "json", "tenant", "token", "list", &tenant]).await;
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let listed = &list.as_array().unwrap()[0];
    assert_eq!(listed["tenant"].as_str(), Some(tenant.as_str()));
    assert!(listed["last_used_at"].is_string() && listed["revoked_at"].is_null(), "{listed}");
    assert!(!out.contains(&secret));
    let id = listed["id"].as_str().unwrap().to_owned();
    let (code, out, _) = agentctl_as(&svc, ADMIN, &["tenant", "token", "list"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].trim_start().starts_with("ID") && lines[0].contains("LAST USED"), "{out}");
    assert!(lines[1].contains(&id) && lines[1].contains(&tenant), "{out}");

    // Revoked: it authenticates nothing, and stays listed as revoked.
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["tenant", "token", "revoke", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (status, _) = api_call(&svc, Method::GET, &format!("/v1/tasks/{task}"), &token).await;
    assert_eq!(status, 401);
    let (status, body) = api_call(&svc, Method::GET, &format!("/v1/tokens?tenant={tenant}"), ADMIN).await;
    assert_eq!(status, 200);
    assert!(body[0]["revoked_at"].is_string(), "{body}");

    // Bad input: an unknown tenant, an unknown or malformed token id.
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["tenant", "token", "create", "no-such-tenant"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("404") && err.contains("no tenant no-such-tenant"), "{err}");
    let (status, body) = api_call(&svc, Method::DELETE, &format!("/v1/tokens/{}", uuid::Uuid::new_v4()), ADMIN).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
    let (status, body) = api_call(&svc, Method::DELETE, "/v1/tokens/not-an-id", ADMIN).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{body}");
    let tokens: i64 = sqlx::query_scalar("select count(*) from agenttask.api_tokens").fetch_one(&pool).await.unwrap();
    assert_eq!(tokens, 1, "failed requests stored nothing");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn without_an_admin_token_the_admin_api_is_closed_but_tenant_tokens_work() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    // A token made while the service had an admin token...
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let tenant = env.tenant("a");
    let task = insert_task_row(&pool, &tenant, "k", None, "Queued", json!({}), chrono::Utc::now()).await;
    let (_, token) = new_token(&svc, &tenant).await;
    svc.stop().await;
    // ...still works after a restart without one; the admin endpoints are closed.
    let mut settings = env.settings(&[Component::Http]);
    settings.admin_token = None;
    let svc = env.start_with(settings).await;
    let (status, _) = api_call(&svc, Method::GET, &format!("/v1/tasks/{task}"), &token).await;
    assert_eq!(status, 200);
    for t in [ADMIN, ""] {
        let (status, body) = api_call(&svc, Method::GET, "/v1/tenants", t).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("api_closed")), "{body}");
    }
    svc.stop().await;
    env.cleanup().await;
}

/// Every page of `GET /v1/tasks?{query}` with `limit`, followed by cursor: the task ids in order.
async fn all_pages(svc: &Service, token: &str, query: &str, limit: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut path = format!("/v1/tasks?limit={limit}&{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = api_call(svc, Method::GET, &path, token).await;
        assert_eq!(status, 200, "{path}: {body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        for t in items {
            out.push((t["submitted_at"].as_str().unwrap().to_owned(), t["task_id"].as_str().unwrap().to_owned()));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
    }
    panic!("more than 100 pages");
}

#[tokio::test]
async fn listing_pages_through_every_matching_task_exactly_once() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&chrono::Utc);
    let mut ids_a = std::collections::BTreeSet::new();
    for i in 0..23i64 {
        // Three tasks per second: ties on submitted_at are broken by task id.
        let at = t0 + chrono::Duration::seconds(i / 3);
        let batch = if i % 2 == 0 { "b1" } else { "b2" };
        let phase = if i % 3 == 0 { "Succeeded" } else { "Queued" };
        let parity = if i % 2 == 0 { "even" } else { "odd" };
        let id = insert_task_row(&pool, &a, &format!("a{i}"), Some(batch), phase, json!({"parity": parity}), at).await;
        ids_a.insert(id.to_string());
    }
    for i in 0..5i64 {
        insert_task_row(&pool, &b, &format!("b{i}"), Some("b1"), "Queued", json!({}), t0).await;
    }

    // Pages of 4 cover tenant a exactly once, newest first.
    let listed = all_pages(&svc, ADMIN, &format!("tenant={a}"), 4).await;
    assert_eq!(listed.len(), 23);
    let set: std::collections::BTreeSet<String> = listed.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(set, ids_a, "every task once");
    let keys: Vec<(chrono::DateTime<chrono::Utc>, uuid::Uuid)> =
        listed.iter().map(|(t, id)| (t.parse().unwrap(), id.parse().unwrap())).collect();
    assert!(keys.windows(2).all(|w| w[0] > w[1]), "strictly newest first: {keys:?}");
    assert_eq!(all_pages(&svc, ADMIN, "", 5).await.len(), 28);
    // A page size that divides the total: the full last page says there is no next one.
    assert_eq!(all_pages(&svc, ADMIN, &format!("tenant={b}"), 5).await.len(), 5);

    // Each filter, and filters together.
    for (query, n) in [
        ("batch=b1".to_owned(), 12),
        ("phase=Succeeded".to_owned(), 8),
        ("phase=Succeeded,Queued".to_owned(), 23),
        ("label=parity%3Deven".to_owned(), 12),
        ("since=2026-01-01T00:00:05Z".to_owned(), 8),
        ("until=2026-01-01T00:00:02Z".to_owned(), 6),
        ("batch=b1&phase=Succeeded&label=parity%3Deven".to_owned(), 4),
        ("batch=nope".to_owned(), 0),
    ] {
        assert_eq!(all_pages(&svc, ADMIN, &format!("tenant={a}&{query}"), 3).await.len(), n, "{query}");
    }

    // A tenant's token lists its own tenant only.
    let (_, token_b) = new_token(&svc, &b).await;
    let mine = all_pages(&svc, &token_b, "", 2).await;
    assert_eq!(mine.len(), 5);
    assert!(all_pages(&svc, &token_b, &format!("tenant={a}"), 10).await.is_empty());
    assert!(all_pages(&svc, &token_b, "batch=b2", 10).await.is_empty());

    // Bad input: a 400 naming the parameter.
    for (query, param) in [
        ("phase=Bogus", "phase"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("since=yesterday", "since"),
        ("until=2026-01-01", "until"),
        ("cursor=garbage", "cursor"),
        ("label=nokey", "label"),
        ("tenatn=acme", "tenatn"),
        ("batch=x&batch=y", "batch"),
    ] {
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/tasks?{query}"), ADMIN).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{query}: {body}");
        assert!(body["message"].as_str().unwrap().contains(&format!("\"{param}\"")), "{query}: {body}");
    }
    // A malformed id is a 400, an unknown one a 404, on every endpoint taking one.
    for (method, path, status) in [
        (Method::GET, "/v1/tasks/not-a-uuid".to_owned(), 400),
        (Method::GET, "/v1/tasks/not-a-uuid/position".to_owned(), 400),
        (Method::POST, "/v1/tasks/not-a-uuid/cancel".to_owned(), 400),
        (Method::GET, format!("/v1/tasks/{}", uuid::Uuid::new_v4()), 404),
        (Method::GET, format!("/v1/tasks/{}/position", uuid::Uuid::new_v4()), 404),
        (Method::POST, format!("/v1/tasks/{}/cancel", uuid::Uuid::new_v4()), 404),
    ] {
        let (got, body) = api_call(&svc, method.clone(), &path, ADMIN).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        assert!(body["code"].is_string() && body["message"].is_string(), "{body}");
    }

    // agentctl list: a table for people, JSON for programs, following the cursor.
    let (code, out, err) =
        agentctl_as(&svc, ADMIN, &["list", "--tenant", &a, "--batch", "b1", "--phase", "Succeeded"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 4, "{out}");
    assert!(lines[0].trim_start().starts_with("TASK") && lines[0].contains("PHASE"), "{out}");
    assert!(lines[1..].iter().all(|l| l.contains("Succeeded") && l.contains("b1")), "{out}");
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["-o", "json", "list", "--tenant", &a]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len(), 23);
    let (code, out, _) = agentctl_as(&svc, ADMIN, &["-o", "json", "list", "--limit", "7"]).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len(), 7);
    let (code, out, _) = agentctl_as(&svc, &token_b, &["-o", "json", "list"]).await;
    assert_eq!((code, serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len()), (0, 5));
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["list", "--phase", "Bogus"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("400") && err.contains("phase") && err.contains("Bogus"), "{err}");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn batch_status_and_results_export_every_task_of_the_batch() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let t0 = chrono::Utc::now() - chrono::Duration::minutes(5);
    // Tenant a: four succeeded (100..400 ms), one failed (500 ms), one queued; tenant b: two.
    for (i, (phase, ms)) in
        [("Succeeded", 100), ("Succeeded", 200), ("Succeeded", 300), ("Succeeded", 400), ("Failed", 500), ("Queued", 0)]
            .into_iter()
            .enumerate()
    {
        let at = t0 + chrono::Duration::seconds(i as i64);
        let id = insert_task_row(&pool, &a, &format!("k{i}"), Some("eval"), phase, json!({}), at).await;
        if phase != "Queued" {
            sqlx::query(
                "update agenttask.tasks set started_at = submitted_at, admitted_at = submitted_at, \
                 finished_at = submitted_at + make_interval(secs => $2::float8 / 1000), exit_code = $3, \
                 result = $4, stdout = $5 where task_id = $1",
            )
            .bind(id)
            .bind(ms as f64)
            .bind(if phase == "Failed" { 1 } else { 0 })
            .bind(json!({"score": i}))
            .bind(format!("line \"{i}\", done\nsecond line\n"))
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    for i in 0..2 {
        insert_task_row(&pool, &b, &format!("k{i}"), Some("eval"), "Queued", json!({}), t0).await;
    }

    let (code, out, err) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "batch", "status", "eval"]).await;
    assert_eq!(code, 0, "{err}");
    for want in ["TOTAL       6", "SUCCEEDED   4", "FAILED      1", "QUEUED      1", "p50 300 ms, p95 480 ms"] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    let (code, out, _) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "-o", "json", "batch", "status", "eval"]).await;
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (s["total"].as_i64(), s["succeeded"].as_i64(), s["p50_duration_ms"].as_i64()),
        (Some(6), Some(4), Some(300))
    );
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "-o", "yaml", "batch", "status", "eval"]).await;
    assert_eq!(code, 0, "{err}");
    let y: Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(y, s, "YAML says what JSON says");
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "-o", "yaml", "batch", "results", "eval"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("jsonl") && err.contains("csv"), "{err}");

    // JSON lines: one result message per task, oldest first.
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "-o", "jsonl", "batch", "results", "eval"]).await;
    assert_eq!(code, 0, "{err}");
    let results: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 6);
    let keys: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4", "k5"]);
    assert!(results.iter().all(|r| r["tenant"].as_str() == Some(a.as_str())));
    assert_eq!((results[4]["phase"].as_str(), results[4]["exit_code"].as_i64()), (Some("Failed"), Some(1)));
    assert_eq!(results[2]["result"], json!({"score": 2}));

    // CSV: a header and one record per task; fields with quotes, commas and newlines quoted.
    let (code, out, err) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "-o", "csv", "batch", "results", "eval"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("task_id,id,tenant,batch_id,phase,reason,message,exit_code,result,stdout,"), "{out}");
    assert!(out.contains("\"line \"\"0\"\", done\nsecond line\n\""), "{out}");
    assert!(out.contains(",\"{\"\"score\"\":1}\","), "{out}");
    assert_eq!(out.matches(&format!(",{a},eval,")).count(), 6, "{out}");

    // The API's pages cover the batch exactly once.
    let mut seen = Vec::new();
    let mut path = format!("/v1/batches/{a}/eval/results?limit=4");
    loop {
        let (status, body) = api_call(&svc, Method::GET, &path, ADMIN).await;
        assert_eq!(status, 200, "{body}");
        seen.extend(body["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        match body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/batches/{a}/eval/results?limit=4&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["k0", "k1", "k2", "k3", "k4", "k5"]);

    // Tenants: b's token sees its batch, and a's as absent.
    let (_, token_b) = new_token(&svc, &b).await;
    for path in [format!("/v1/batches/{a}/eval"), format!("/v1/batches/{a}/eval/results")] {
        let (status, body) = api_call(&svc, Method::GET, &path, &token_b).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{path}: {body}");
    }
    let (code, out, err) =
        agentctl_as(&svc, &token_b, &["--tenant", &b, "-o", "json", "batch", "status", "eval"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["total"].as_i64(), Some(2));

    // Bad input.
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["--tenant", &a, "batch", "status", "nope"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("404") && err.contains("no batch nope"), "{err}");
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["batch", "status", "eval"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--tenant"), "{err}");
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["-o", "csv", "get", &uuid::Uuid::new_v4().to_string()]).await;
    assert_eq!(code, 2);
    assert!(err.contains("batch results"), "{err}");
    for q in ["cursor=garbage", "limit=0", "limit=x"] {
        let (status, body) = api_call(&svc, Method::GET, &format!("/v1/batches/{a}/eval/results?{q}"), ADMIN).await;
        assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{q}: {body}");
    }
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token_and_describes_what_the_server_does() {
    let env = Env::new("[tenants.{t}-a]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let resp = reqwest::get(format!("http://{}/openapi.json", svc.http_addr)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()[reqwest::header::CONTENT_TYPE], "application/json");
    let served = resp.text().await.unwrap();
    // The same text `agenttask openapi` prints and deploy/openapi.json holds (a unit test
    // compares those two).
    assert_eq!(served, agenttask::http::openapi::json());

    // Every documented operation exists, and needs a token exactly where the document says:
    // without one, each `/v1` operation answers the JSON 401 (an unrouted path or method would
    // get axum's bare 404 or 405), and the others answer without it.
    let doc: Value = serde_json::from_str(&served).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", &uuid::Uuid::new_v4().to_string())
            .replace("{name}", "nobody")
            .replace("{tenant}", "nobody")
            .replace("{batch}", "b");
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = api_call(&svc, method.clone(), &concrete, "").await;
            if item[method.as_str().to_lowercase()]["security"].is_array() {
                assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")), "{method} {path}: {body}");
            } else {
                assert_eq!(status, 200, "{method} {path} needs no token");
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} operations");
    svc.stop().await;
    env.cleanup().await;
}

/// The document is valid OpenAPI 3.1, as an independent validator reads it (not just what
/// utoipa meant to write).
#[test]
fn the_openapi_document_is_valid_openapi_3_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, agenttask::http::openapi::json()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&path)
        .output()
        .expect("python3 runs (deploy/local/common.sh installs openapi-spec-validator)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}", text.chars().take(2000).collect::<String>());
    assert!(text.contains("OK"), "{text}");
}
