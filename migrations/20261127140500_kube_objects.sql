-- AgentTasks applied directly with kubectl (not published on RabbitMQ): the object a task came
-- from, as "namespace/name". Such a task has no reply queue; its outcome goes to the object's
-- status and to SQL only, so no outbox row is written for it.
alter table agenttask.tasks add column kube_object text;
create unique index tasks_kube_object on agenttask.tasks (kube_object) where kube_object is not null;
