-- `GET /v1/tasks` pages newest first by (submitted_at, task_id), within a tenant or across all.
create index tasks_submitted on agenttask.tasks (submitted_at desc, task_id desc);
create index tasks_tenant_submitted on agenttask.tasks (tenant, submitted_at desc, task_id desc);
