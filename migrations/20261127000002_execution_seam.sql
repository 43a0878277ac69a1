-- The execution seam: a claimed task stays Pending until its backend reports it placed, so
-- "Pending and unclaimed" is what executors look for; cancellation of a task that is already
-- with an executor is a request the executor acts on.
alter table agenttask.tasks add column cancel_requested_at timestamptz;

drop index agenttask.tasks_pending;
create index tasks_pending on agenttask.tasks (admitted_at) where phase = 'Pending' and lease_owner is null;
create index tasks_cancel_requested on agenttask.tasks (lease_owner) where cancel_requested_at is not null;
