-- Warm local sandboxes: whether a run took a pre-started sandbox. Null where no pool applies
-- (pool off, other backends); false when the pool was empty and the task waited for a cold start.
alter table agenttask.tasks add column warm boolean;
