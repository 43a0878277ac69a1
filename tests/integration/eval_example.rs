//! The evaluation pipeline in examples/eval, run as a user would: its script submits the JSONL
//! of model-written solutions with `agentctl batch submit`, waits with `agentctl wait --batch`,
//! and scores with its one SQL query (psql) over `agenttask.task_results`, against a running
//! service that really runs every solution and its unit tests in the sandbox.

use crate::support::*;

const ADMIN: &str = "test-admin-token";

async fn run_script(env: &Env, svc: &Service, tenant: &str, batch: &str) -> (i32, String, String) {
    let out = tokio::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/eval/run.sh"))
        .args([tenant, batch])
        .env("AGENTCTL", env!("CARGO_BIN_EXE_agentctl"))
        .env("AGENTCTL_SERVER", format!("http://{}", svc.http_addr))
        .env("AGENTCTL_TOKEN", ADMIN)
        .env("AGENTCTL_AMQP_URL", &env.amqp_url)
        .env("XDG_CONFIG_HOME", env.dir.path().join("config"))
        .env("EVAL_DATABASE_URL", &env.database_url)
        .env("EVAL_OUTPUT", "csv")
        .env("NO_COLOR", "1")
        .env_remove("AGENTCTL_TENANT")
        .output()
        .await
        .expect("bash runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The scores' CSV: from its header line to the end of the script's output.
fn scores(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().collect();
    let start = lines.iter().position(|l| l.starts_with("problem,")).unwrap_or_else(|| panic!("no scores in\n{out}"));
    lines[start..].iter().map(|l| l.to_string()).collect()
}

#[tokio::test]
async fn the_evaluation_example_scores_each_problem_from_real_runs() {
    let env = Env::new("[tenants.{t}-evals]\n").await;
    let svc = env.start().await;
    let pool = env.pg().await;
    let tenant = env.tenant("evals");

    let (code, out, err) = run_script(&env, &svc, &tenant, "eval-1").await;
    assert_eq!(code, 0, "{out}\n{err}");
    // Two wrong Python and R solutions score partly; one R solution does not parse and one
    // Python solution loops forever on an even-length list (its timeout is 3s): both score 0.
    let want = [
        "problem,solutions,did_not_finish,fully_correct,mean_score",
        "fizzbuzz,2,0,1,0.88",
        "is_palindrome,3,0,2,0.92",
        "median,3,2,1,0.33",
        "to_roman,2,0,1,0.63",
    ];
    assert_eq!(scores(&out), want, "{out}\n{err}");
    let outcomes: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "select client_id, phase, reason from agenttask.task_results \
         where tenant = $1 and phase <> 'Succeeded' order by client_id",
    )
    .bind(&tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        [
            ("median-model-b-r".into(), "Failed".into(), Some("NonZeroExit".into())),
            ("median-model-c-python".into(), "Failed".into(), Some("TimedOut".into())),
        ]
    );

    // Again with the same batch: nothing is run twice, the scores are the same.
    let (code, out, err) = run_script(&env, &svc, &tenant, "eval-1").await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("submitted 0, skipped 10 already accepted"), "{out}");
    assert_eq!(scores(&out), want);
    assert_eq!(count(&pool, "select count(*) from agenttask.tasks").await, 10);

    svc.stop().await;
    env.cleanup().await;
}
