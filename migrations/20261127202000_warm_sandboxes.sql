-- Whether a task ran in a pre-started (warm) sandbox of the local backend: false when its
-- language had a warm pool but it started cold, null where there is no pool (other backends,
-- pools turned off, tasks that never ran).
alter table agenttask.tasks add column warm boolean;
