-- Least-privilege PostgreSQL roles for dcr-reaper with the built-in `authlib` profile.
--
--   psql -v ON_ERROR_STOP=1 -d auth -f deploy/sql/authlib-roles.sql
--
-- Run it as the owner of the auth tables (or a superuser), connected to the auth database. It is idempotent: run it
-- again after an upgrade and the grants converge on what this file says. Optional psql variables (-v name=value):
--
--   dbname          database the roles may connect to          (default: the current database)
--   schema          schema of the Authlib tables               (default: public)
--   client_table    the OAuth2ClientMixin table                (default: oauth2_client)
--   token_table     the OAuth2TokenMixin table                 (default: oauth2_token)
--   code_table      the OAuth2AuthorizationCodeMixin table     (default: oauth2_code)
--   ledger_schema   schema for dcr-reaper's ledger tables      (default: dcr_reaper)
--   ledger_prefix   the ledger tables' prefix (ledger.prefix)   (default: dcr_reaper_)
--   report_role     read-only role: report, check, serve       (default: dcr_reaper_report)
--   reap_role       report + reap --apply, restore             (default: dcr_reaper_reap)
--
-- The roles can log in but get no password here: set one with `\password dcr_reaper_report` (or use your usual
-- authentication), then put it in DCR_REAPER_DATABASE_URL. docs/deployment.md explains each grant.

\set ON_ERROR_STOP on

\if :{?schema}
\else
  \set schema public
\endif
\if :{?client_table}
\else
  \set client_table oauth2_client
\endif
\if :{?token_table}
\else
  \set token_table oauth2_token
\endif
\if :{?code_table}
\else
  \set code_table oauth2_code
\endif
\if :{?ledger_schema}
\else
  \set ledger_schema dcr_reaper
\endif
\if :{?ledger_prefix}
\else
  \set ledger_prefix dcr_reaper_
\endif
\if :{?report_role}
\else
  \set report_role dcr_reaper_report
\endif
\if :{?reap_role}
\else
  \set reap_role dcr_reaper_reap
\endif
\if :{?dbname}
\else
  SELECT current_database() AS dbname \gset
\endif

BEGIN;

-- The roles (created once; an existing role keeps its password and attributes).
SELECT format('CREATE ROLE %I LOGIN', :'report_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'report_role') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'reap_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'reap_role') \gexec
GRANT :"report_role" TO :"reap_role";

-- Start from nothing on the auth tables, so a re-run drops grants this file no longer gives.
REVOKE ALL ON :"schema".:"client_table", :"schema".:"token_table", :"schema".:"code_table"
  FROM :"report_role", :"reap_role";

-- ---- dcr_reaper_report: report, check and serve (without reaping) --------------------------------------------
-- Exactly the columns the authlib profile reads (a test compares them with the profile). Not client_secret, not
-- access_token. refresh_token is read only to tell an empty refresh token from a usable one.
GRANT CONNECT ON DATABASE :"dbname" TO :"report_role";
GRANT USAGE ON SCHEMA :"schema" TO :"report_role";
GRANT SELECT (client_id, client_id_issued_at, client_metadata)
  ON :"schema".:"client_table" TO :"report_role";
GRANT SELECT (client_id, issued_at, expires_in, access_token_revoked_at, refresh_token_revoked_at, refresh_token)
  ON :"schema".:"token_table" TO :"report_role";
GRANT SELECT (client_id, auth_time)
  ON :"schema".:"code_table" TO :"report_role";

-- ---- dcr_reaper_reap: everything above, plus reap --apply and restore ----------------------------------------
-- SELECT on whole rows: every reaped row goes into a tombstone, secrets included, so that restore is exact.
-- DELETE: the reap itself (tokens and codes first: Authlib has no foreign keys).
-- INSERT: restore, and the late-token sweep that puts back a client which got a token just after its delete.
GRANT SELECT, INSERT, DELETE ON :"schema".:"client_table", :"schema".:"token_table", :"schema".:"code_table"
  TO :"reap_role";
-- PostgreSQL demands UPDATE on at least one column for SELECT ... FOR UPDATE, which locks each batch of clients
-- before the delete. dcr-reaper never updates an Authlib client; this column is granted only for the lock.
GRANT UPDATE (client_id_issued_at) ON :"schema".:"client_table" TO :"reap_role";

-- The ledger (<prefix>runs, tombstones, restores, aliases and evidence, created by the first `reap --apply`)
-- lives in a schema of its own that the reap role owns: it can create tables there and nowhere else. The schema comes
-- first on the reap role's search_path, so the ledger lands there with the default settings (no ledger.schema);
-- the Authlib tables are still found in :schema. Run `restore` with this role too, so it finds the ledger.
CREATE SCHEMA IF NOT EXISTS :"ledger_schema" AUTHORIZATION :"reap_role";
ALTER SCHEMA :"ledger_schema" OWNER TO :"reap_role";
ALTER ROLE :"reap_role" IN DATABASE :"dbname" SET search_path = :"ledger_schema", :"schema";

-- A ledger that a first run as the owner or a superuser made in :schema (PostgreSQL's default) moves into the
-- ledger schema, runs, tombstones, restores and evidence included, unless that schema has one already; then every
-- ledger table there (with its id sequence) is handed to the reap role. Without this the reap role finds the old
-- tables first and fails with "permission denied for table dcr_reaper_runs".
SELECT format('ALTER TABLE %I.%I SET SCHEMA %I', n.nspname, c.relname, :'ledger_schema')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname = :'schema' AND :'schema' <> :'ledger_schema'
   AND c.relname IN (:'ledger_prefix' || 'runs', :'ledger_prefix' || 'tombstones', :'ledger_prefix' || 'aliases',
                     :'ledger_prefix' || 'evidence', :'ledger_prefix' || 'restores')
   AND NOT EXISTS (SELECT FROM pg_class c2 JOIN pg_namespace n2 ON n2.oid = c2.relnamespace
                    WHERE n2.nspname = :'ledger_schema' AND c2.relname = :'ledger_prefix' || 'tombstones')
\gexec
SELECT format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, :'reap_role')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname = :'ledger_schema'
   AND c.relname IN (:'ledger_prefix' || 'runs', :'ledger_prefix' || 'tombstones', :'ledger_prefix' || 'aliases',
                     :'ledger_prefix' || 'evidence', :'ledger_prefix' || 'restores')
\gexec

COMMIT;
