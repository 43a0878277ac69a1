//! The database's vocabulary is the service's: the phase check constraint lists exactly
//! `Phase::ALL`, the SQL phase sets are `Phase::ACTIVE` and `Phase::UNFINISHED`, and a stored
//! value the service does not know is an error when read back, never a guess.

use agenttask::domain::phase::Phase;
use agenttask::store::{Store, StoreError};

use crate::support::*;

fn names(phases: &[Phase]) -> Vec<String> {
    phases.iter().map(|p| p.as_str().to_owned()).collect()
}

#[tokio::test]
async fn the_sql_phase_sets_and_the_check_constraint_match_the_rust_phases() {
    let env = Env::new(ONE_TENANT).await;
    let store = Store::connect(&env.database_url, 2).await.unwrap();
    let pool = store.pool();
    let active: Vec<String> =
        sqlx::query_scalar("select unnest(agenttask.active_phases())").fetch_all(pool).await.unwrap();
    assert_eq!(active, names(&Phase::ACTIVE));
    let unfinished: Vec<String> =
        sqlx::query_scalar("select unnest(agenttask.unfinished_phases())").fetch_all(pool).await.unwrap();
    assert_eq!(unfinished, names(&Phase::UNFINISHED));
    let def: String =
        sqlx::query_scalar("select pg_get_constraintdef(oid) from pg_constraint where conname = 'tasks_phase_check'")
            .fetch_one(pool)
            .await
            .unwrap();
    let listed: Vec<String> = def.split('\'').skip(1).step_by(2).map(str::to_owned).collect();
    assert_eq!(listed, names(&Phase::ALL), "{def}");
    store.pool().close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_unknown_stored_phase_or_tenant_name_is_an_error_not_a_guess() {
    let env = Env::new(ONE_TENANT).await;
    let store = Store::connect(&env.database_url, 2).await.unwrap();
    let pool = store.pool();
    // Only a hand edit (or a newer service) can store these; simulate one.
    sqlx::query("alter table agenttask.tasks drop constraint tasks_phase_check").execute(pool).await.unwrap();
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "insert into agenttask.tasks (task_id, tenant, phase, reply_exchange, reply_routing_key) \
         values ($1, 'x', 'Paused', '', 'x')",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
    match store.get_task(id).await {
        Err(StoreError::Sql(e @ sqlx::Error::ColumnDecode { .. })) => {
            assert!(e.to_string().contains("stored phase \"Paused\""), "{e}")
        }
        other => panic!("an unknown phase must not be read as anything: {other:?}"),
    }
    let policy = sqlx::types::Json(agenttask::domain::tenant::TenantPolicy::default());
    sqlx::query(
        "insert into agenttask.tenants (name, weight, max_concurrency, policy) values ('Not_A_Name', 1, 1, $1)",
    )
    .bind(policy)
    .execute(pool)
    .await
    .unwrap();
    let err = store.load_tenants().await.expect_err("an invalid stored tenant name is not dropped silently");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert_eq!(err.metric_label(), "corrupt_row");
    store.pool().close().await;
    env.cleanup().await;
}
