//! The Kubernetes reconciler's half of the store: AgentTasks applied directly with kubectl are
//! recorded here (by `insert_task`, with their object named), and the reconciler checks an
//! AgentTask's `spec.admission` against the run the store handed out before it makes a pod, so a
//! user cannot start a pod by writing `admission` into an object themselves.

use uuid::Uuid;

use super::{Result, Store};
use crate::domain::phase::{Phase, Reason};

/// What the store knows of a task the reconciler asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTask {
    pub task_id: Uuid,
    pub tenant: String,
    pub attempt: i32,
    pub phase: Phase,
    pub reason: Option<Reason>,
    pub message: Option<String>,
    /// `namespace/name` of a directly applied AgentTask; `None` for tasks from RabbitMQ.
    pub kube_object: Option<String>,
}

impl Store {
    /// The task of `task_id`, if any.
    pub async fn kube_task(&self, task_id: Uuid) -> Result<Option<KubeTask>> {
        Ok(sqlx::query_as!(
            KubeTask,
            r#"select task_id, tenant, attempt, phase as "phase: Phase", reason as "reason: Reason",
                 message, kube_object
               from agenttask.tasks where task_id = $1"#,
            task_id
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The task recorded for the AgentTask `namespace/name`, if any.
    pub async fn kube_task_of_object(&self, kube_object: &str) -> Result<Option<KubeTask>> {
        Ok(sqlx::query_as!(
            KubeTask,
            r#"select task_id, tenant, attempt, phase as "phase: Phase", reason as "reason: Reason",
                 message, kube_object
               from agenttask.tasks where kube_object = $1"#,
            kube_object
        )
        .fetch_optional(&self.pool)
        .await?)
    }
}
