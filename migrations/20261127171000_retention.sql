-- Retention: finished tasks' stdout, stderr and artifact list are removed after the retention
-- period (and with `--retention-delete-rows`, the rows themselves). The views keep their columns
-- and types: a retained-away task reads stdout/stderr as null and lists no artifacts.
--
-- When its outputs were removed; set once, so a sweep never visits a row twice.
alter table agenttask.tasks add column outputs_removed_at timestamptz;

-- The sweep's scan: finished tasks that still hold outputs, oldest first. Rows leave the index as
-- they are swept, so it stays as small as the retention window, however many rows are kept.
create index tasks_outputs_kept on agenttask.tasks (finished_at)
    where finished_at is not null and outputs_removed_at is null;

-- Deleting rows (`--retention-delete-rows`) also reaches rows whose outputs an earlier sweep
-- removed, which the index above no longer has.
create index tasks_finished on agenttask.tasks (finished_at) where finished_at is not null;
