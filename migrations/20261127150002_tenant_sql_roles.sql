-- Tenant-safe SQL: each tenant may get a read-only login role (`agentctl tenant sql-role T`) that
-- sees only its own tenant's rows in the three views, through row-level security, and can read
-- no table directly.
--
-- How: the views are owned by `agenttask_views`, a role without login that may read the tables
-- and is subject to row-level security (it owns no table and cannot bypass RLS). A view reads
-- its tables with its owner's privileges, so the owner's policies apply, while `current_user`
-- is still whoever queries the view. The policies map `current_user` to a tenant through
-- `agenttask.sql_roles`: a tenant's role sees that tenant's rows; any other role allowed to read
-- the views (the service, operators) sees every row. The service itself reads the tables as
-- their owner, which RLS does not restrict. Tenant roles get SELECT on the views only.
--
-- Roles are global to the Postgres cluster: `agenttask_views` is shared by every AgentTask
-- database on it (created once; concurrent migrations may race to create it).
do $$
begin
    create role agenttask_views nologin;
exception when others then
    if not exists (select 1 from pg_roles where rolname = 'agenttask_views') then
        raise;
    end if;
end $$;

create table agenttask.sql_roles (
    role       name primary key,
    tenant     text not null,
    created_at timestamptz not null default now()
);

grant usage on schema agenttask to agenttask_views;
grant select on agenttask.tasks, agenttask.tenants, agenttask.sql_roles to agenttask_views;
alter view agenttask.task_results owner to agenttask_views;
alter view agenttask.batch_summary owner to agenttask_views;
alter view agenttask.tenant_usage owner to agenttask_views;

alter table agenttask.tasks enable row level security;
alter table agenttask.tenants enable row level security;

-- Both subqueries are uncorrelated: evaluated once per query, not per row.
create policy tenant_rows on agenttask.tasks for select using (
    not exists (select 1 from agenttask.sql_roles r where r.role = current_user)
    or tenant = (select r.tenant from agenttask.sql_roles r where r.role = current_user)
);
create policy tenant_rows on agenttask.tenants for select using (
    not exists (select 1 from agenttask.sql_roles r where r.role = current_user)
    or name = (select r.tenant from agenttask.sql_roles r where r.role = current_user)
);

-- Creates `p_role` for `p_tenant` (or resets its password and privileges), able to log in and to
-- read the three views, nothing else. Needs CREATEROLE; called by the service for
-- `POST /v1/tenants/{tenant}/sql-role`.
create function agenttask.ensure_tenant_sql_role(p_tenant text, p_role text, p_password text)
returns void language plpgsql as $$
declare
    mapped text;
begin
    if not exists (select 1 from agenttask.tenants where name = p_tenant) then
        raise exception 'no tenant %', p_tenant using errcode = 'P0002';
    end if;
    select tenant into mapped from agenttask.sql_roles where role = p_role;
    if mapped is not null and mapped <> p_tenant then
        raise exception 'role % belongs to tenant %', p_role, mapped using errcode = '42710';
    end if;
    if exists (select 1 from pg_roles where rolname = p_role) then
        -- Never hand out a role that can do more than read (one made by hand with that name).
        if exists (select 1 from pg_roles where rolname = p_role
                   and (rolsuper or rolcreaterole or rolcreatedb or rolbypassrls or rolreplication)) then
            raise exception 'role % exists with privileges; refusing to make it a tenant role', p_role
                using errcode = '42710';
        end if;
        execute format('alter role %I with login noinherit connection limit 8 password %L', p_role, p_password);
    else
        execute format('create role %I with login noinherit nosuperuser nocreatedb nocreaterole '
                       'nobypassrls noreplication connection limit 8 password %L', p_role, p_password);
    end if;
    execute format('grant connect on database %I to %I', current_database(), p_role);
    execute format('grant usage on schema agenttask to %I', p_role);
    execute format('grant select on agenttask.task_results, agenttask.batch_summary, agenttask.tenant_usage to %I',
                   p_role);
    insert into agenttask.sql_roles (role, tenant) values (p_role, p_tenant) on conflict (role) do nothing;
end $$;
revoke all on function agenttask.ensure_tenant_sql_role(text, text, text) from public;
