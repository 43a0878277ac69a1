//! Tenant-safe SQL: `agentctl tenant sql-role T` makes a login role that reads the three views,
//! only T's rows, and nothing else.

use serde_json::json;

use agenttask::config::Component;

use crate::support::*;

const ADMIN: &str = "test-admin-token";

/// The SQLSTATE of a statement that must fail.
async fn refused(pool: &sqlx::PgPool, sql: &str) -> String {
    match sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(pool).await {
        Ok(r) => panic!("{sql}: allowed ({} rows)", r.rows_affected()),
        Err(sqlx::Error::Database(e)) => e.code().unwrap_or_default().into_owned(),
        Err(e) => panic!("{sql}: {e}"),
    }
}

async fn tenants_in(pool: &sqlx::PgPool, view: &str) -> Vec<(String, i64)> {
    let sql = format!("select tenant, count(*) from agenttask.{view} group by tenant order by tenant");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn each_tenants_sql_role_reads_only_its_rows_in_every_view_and_no_table() {
    let env = Env::new("[tenants.{t}-a]\n[tenants.{t}-b]\n").await;
    let svc = env.start_with(env.settings(&[Component::Http])).await;
    let pool = env.pg().await;
    let (a, b) = (env.tenant("a"), env.tenant("b"));
    let now = chrono::Utc::now();
    for (tenant, n) in [(&a, 2), (&b, 3)] {
        for i in 0..n {
            insert_task_row(&pool, tenant, &format!("k{i}"), Some("eval"), "Queued", json!({}), now).await;
        }
    }

    let mut roles = Vec::new();
    for tenant in [&a, &b] {
        let (code, out, err) = agentctl_as(&svc, ADMIN, &["tenant", "sql-role", tenant]).await;
        assert_eq!(code, 0, "{err}");
        let url = out.trim().to_owned();
        assert!(
            url.starts_with("postgres://agenttask_tenant_")
                && url.ends_with(&env.database_url[env.database_url.rfind('/').unwrap()..]),
            "{url}"
        );
        assert!(err.contains("shown only now"), "{err}");
        // Idempotent: again, the same role (with a new password).
        let (code, again, err) = agentctl_as(&svc, ADMIN, &["-o", "json", "tenant", "sql-role", tenant]).await;
        assert_eq!(code, 0, "{err}");
        let again: serde_json::Value = serde_json::from_str(&again).unwrap();
        assert!(url.contains(again["role"].as_str().unwrap()));
        roles.push(again["role"].as_str().unwrap().to_owned());
        let conn = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(again["connection_string"].as_str().unwrap())
            .await
            .unwrap();
        let user: String = sqlx::query_scalar("select current_user::text").fetch_one(&conn).await.unwrap();
        assert_eq!(&user, roles.last().unwrap());

        // Every view: its own tenant's rows only, even when asking for the other's.
        let own = if tenant == &a { 2 } else { 3 };
        assert_eq!(tenants_in(&conn, "task_results").await, vec![(tenant.clone(), own)]);
        assert_eq!(tenants_in(&conn, "batch_summary").await, vec![(tenant.clone(), 1)]);
        assert_eq!(tenants_in(&conn, "tenant_usage").await, vec![(tenant.clone(), 1)]);
        let other = if tenant == &a { &b } else { &a };
        for view in ["task_results", "batch_summary", "tenant_usage"] {
            let sql = format!("select count(*) from agenttask.{view} where tenant = $1");
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(other).fetch_one(&conn).await.unwrap();
            assert_eq!(n, 0, "{view}: another tenant's rows");
        }
        let total: i64 =
            sqlx::query_scalar("select total from agenttask.batch_summary").fetch_one(&conn).await.unwrap();
        assert_eq!(total, own, "the summary counts its own tasks only");

        // No table, no writes (42501: insufficient privilege).
        for sql in [
            "select * from agenttask.tasks",
            "select * from agenttask.tenants",
            "select * from agenttask.sql_roles",
            "select * from agenttask.api_tokens",
            "select * from agenttask.outbox",
            "select * from public._sqlx_migrations",
            "update agenttask.task_results set stdout = 'x'",
            "delete from agenttask.task_results",
            "insert into agenttask.task_results (task_id, tenant, phase) values (gen_random_uuid(), 'x', 'Queued')",
            "update agenttask.tasks set phase = 'Cancelled'",
            "create table agenttask.mine (x int)",
            "select agenttask.ensure_tenant_sql_role('x', 'y', 'z')",
        ] {
            assert_eq!(refused(&conn, sql).await, "42501", "{sql}");
        }
        conn.close().await;
    }
    assert_ne!(roles[0], roles[1]);
    let unchanged: i64 =
        sqlx::query_scalar("select count(*) from agenttask.tasks where stdout is null").fetch_one(&pool).await.unwrap();
    assert_eq!(unchanged, 5);

    // The service (and an operator) still read every tenant's rows through the views.
    let all: i64 = sqlx::query_scalar("select count(*) from agenttask.task_results").fetch_one(&pool).await.unwrap();
    assert_eq!(all, 5);

    // Bad input: an unknown tenant, a malformed name; nothing is created.
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["tenant", "sql-role", "no-such-tenant"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("404") && err.contains("no tenant"), "{err}");
    let (code, _, err) = agentctl_as(&svc, ADMIN, &["tenant", "sql-role", "Bad_Name"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("400") && err.contains("not a valid tenant name"), "{err}");
    // A tenant's token may not make roles.
    let (code, out, _) = agentctl_as(&svc, ADMIN, &["-o", "json", "tenant", "token", "create", &a]).await;
    assert_eq!(code, 0);
    let token = serde_json::from_str::<serde_json::Value>(&out).unwrap()["token"].as_str().unwrap().to_owned();
    let (code, _, err) = agentctl_as(&svc, &token, &["tenant", "sql-role", &a]).await;
    assert_eq!(code, 2);
    assert!(err.contains("403"), "{err}");
    let mapped: i64 = sqlx::query_scalar("select count(*) from agenttask.sql_roles").fetch_one(&pool).await.unwrap();
    assert_eq!(mapped, 2);

    svc.stop().await;
    pool.close().await;
    env.cleanup().await;
    // Roles belong to the cluster, not to the (dropped) database.
    let admin = sqlx::PgPool::connect(&format!("{PG}/postgres")).await.unwrap();
    for role in roles {
        sqlx::query(sqlx::AssertSqlSafe(format!("drop role if exists \"{role}\""))).execute(&admin).await.unwrap();
    }
}
