"""The audit trail's schema in the ops database, and who may do what with it.

Three tables keep one row per run (``backup_audit_log``, ``recovery_audit_log``,
``retention_audit_log``: what the metrics and the operators read), and ``audit_chain``
keeps every event that ever changed one of them (start, finish, abandon), each storing
``sha256(prev_hash || payload)`` where the payload is the whole row after the event. The
chain is insert-only; a run's row changes once or twice, and only to what its last chain
event says, so ``wedefi-dr audit verify`` can prove both.

Everything belongs to ``dr_audit_owner``, a role the application never logs in as (the
flows' settings and pgpass do not hold its password; by default it cannot log in at
all). The application role may only SELECT, and EXECUTE three ``SECURITY DEFINER``
functions with a pinned ``search_path``:

- ``audit_start(log, id, token, fields, started_by)``: a new ``running`` row whose times
  and status the server sets; it stores only ``sha256(token)``.
- ``audit_finish(log, id, token, status, fields)``: only with the token the starter
  holds, so a run cannot close (or forge the outcome of) a row it did not start.
- ``audit_abandon(log, id, evidence)``: a ``running`` row whose starter is gone, with the
  evidence; refused while the starter's lock session is still connected.

Each takes the chain's table lock first, so concurrent writers keep a single chain.
"""

from __future__ import annotations

from psycopg2.extensions import encrypt_password

from wedefi_dr.postgres.tools import connect

APP_ROLE = "wedefi_dr_app"
OWNER_ROLE = "dr_audit_owner"
LOGS = {
    "backup": "backup_audit_log",
    "recovery": "recovery_audit_log",
    "retention": "retention_audit_log",
}
GENESIS = "0" * 64

_TABLES = f"""
CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE IF NOT EXISTS backup_audit_log (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  backup_type VARCHAR(50) NOT NULL,
  backup_id VARCHAR(100),
  start_time TIMESTAMP NOT NULL,
  end_time TIMESTAMP,
  status VARCHAR(20) NOT NULL,
  size_bytes BIGINT,
  checksum VARCHAR(128),
  operator_id VARCHAR(100),
  error_message TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS recovery_audit_log (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  recovery_type VARCHAR(50) NOT NULL,
  backup_id VARCHAR(100),
  target VARCHAR(300),
  target_time TIMESTAMP,
  start_time TIMESTAMP NOT NULL,
  end_time TIMESTAMP,
  status VARCHAR(20) NOT NULL,
  operator_id VARCHAR(100) NOT NULL CHECK (btrim(operator_id) <> ''),
  justification TEXT NOT NULL CHECK (btrim(justification) <> ''),
  error_message TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS retention_audit_log (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  run_id VARCHAR(100) NOT NULL,
  database_name VARCHAR(100) NOT NULL,
  table_name VARCHAR(100) NOT NULL,
  action VARCHAR(20) NOT NULL CHECK (action IN ('delete', 'archive', 'summarize')),
  cutoff TIMESTAMP NOT NULL,
  start_time TIMESTAMP NOT NULL,
  end_time TIMESTAMP,
  status VARCHAR(20) NOT NULL,
  rows_removed BIGINT,
  rows_archived BIGINT,
  rows_summarized BIGINT,
  rows_cascaded JSONB,
  batches INTEGER,
  operator_id VARCHAR(100) NOT NULL CHECK (btrim(operator_id) <> ''),
  error_message TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['backup_audit_log', 'recovery_audit_log', 'retention_audit_log'] LOOP
    EXECUTE format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS token_hash CHAR(64)', t);
    EXECUTE format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS started_by JSONB', t);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT IF EXISTS %I', t, t || '_status_check');
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (status IN '
                   '(''running'', ''success'', ''failed'', ''refused'', ''abandoned''))',
                   t, t || '_status_check');
  END LOOP;
END $$;

CREATE TABLE IF NOT EXISTS audit_chain (
  seq BIGINT PRIMARY KEY,
  log VARCHAR(20) NOT NULL,
  row_id UUID NOT NULL,
  event VARCHAR(20) NOT NULL,
  recorded_at TIMESTAMP NOT NULL,
  payload TEXT NOT NULL,
  prev_hash CHAR(64) NOT NULL,
  hash CHAR(64) NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_chain_row_id ON audit_chain (row_id, seq);

DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{OWNER_ROLE}') THEN
    CREATE ROLE {OWNER_ROLE} NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
    CREATE ROLE {APP_ROLE} LOGIN;
  END IF;
END $$;
"""

# Functions: every one pins its search_path (pg_temp last), so a definer function can
# never be steered to another role's objects.
_PIN = "SET search_path = pg_catalog, public, pg_temp"

_FUNCTIONS = f"""
CREATE OR REPLACE FUNCTION audit_guard() RETURNS trigger LANGUAGE plpgsql {_PIN} AS $$
BEGIN
  IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
  END IF;
  IF TG_TABLE_NAME = 'audit_chain' THEN
    RAISE EXCEPTION 'audit_chain is insert-only: UPDATE refused';
  END IF;
  IF OLD.status NOT IN ('running', 'abandoned') THEN
    RAISE EXCEPTION '% row % is final (%): history is not rewritten',
      TG_TABLE_NAME, OLD.id, OLD.status;
  END IF;
  IF NEW.id <> OLD.id OR NEW.start_time <> OLD.start_time
     OR NEW.operator_id IS DISTINCT FROM OLD.operator_id
     OR NEW.token_hash IS DISTINCT FROM OLD.token_hash
     OR NEW.started_by IS DISTINCT FROM OLD.started_by THEN
    RAISE EXCEPTION '% row %: id, start_time, operator and starter are immutable',
      TG_TABLE_NAME, OLD.id;
  END IF;
  RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION audit_table(p_log text) RETURNS text
LANGUAGE plpgsql IMMUTABLE {_PIN} AS $$
BEGIN
  CASE p_log
    WHEN 'backup' THEN RETURN 'backup_audit_log';
    WHEN 'recovery' THEN RETURN 'recovery_audit_log';
    WHEN 'retention' THEN RETURN 'retention_audit_log';
    ELSE RAISE EXCEPTION 'unknown audit log %', p_log USING ERRCODE = '22023';
  END CASE;
END $$;

-- What a caller may set: at the start, the facts of the request; at the end, the outcome.
-- Ids, times, status, the token hash and the starter are the server's.
CREATE OR REPLACE FUNCTION audit_columns(p_log text, p_when text) RETURNS text[]
LANGUAGE sql IMMUTABLE {_PIN} AS $$
  SELECT CASE p_log || ':' || p_when
    WHEN 'backup:start' THEN ARRAY['backup_type', 'backup_id', 'operator_id']
    WHEN 'backup:finish' THEN ARRAY['size_bytes', 'checksum', 'error_message']
    WHEN 'recovery:start' THEN ARRAY['recovery_type', 'backup_id', 'target', 'target_time',
                                     'operator_id', 'justification']
    WHEN 'recovery:finish' THEN ARRAY['error_message']
    WHEN 'retention:start' THEN ARRAY['run_id', 'database_name', 'table_name', 'action',
                                      'cutoff', 'operator_id']
    WHEN 'retention:finish' THEN ARRAY['rows_removed', 'rows_archived', 'rows_summarized',
                                       'rows_cascaded', 'batches', 'error_message']
  END
$$;

CREATE OR REPLACE FUNCTION audit_check_fields(p_log text, p_when text, p_fields jsonb)
RETURNS void LANGUAGE plpgsql {_PIN} AS $$
DECLARE bad text;
BEGIN
  SELECT string_agg(k, ', ' ORDER BY k) INTO bad
    FROM jsonb_object_keys(coalesce(p_fields, '{{}}'::jsonb)) AS k
   WHERE k <> ALL (audit_columns(p_log, p_when));
  IF bad IS NOT NULL THEN
    RAISE EXCEPTION 'audit_%(%): the caller may not set %', p_when, p_log, bad
      USING ERRCODE = '42501';
  END IF;
END $$;

-- One writer at a time, readers never blocked: the chain has exactly one order.
CREATE OR REPLACE FUNCTION audit_lock() RETURNS void LANGUAGE plpgsql {_PIN} AS $$
BEGIN
  LOCK TABLE public.audit_chain IN SHARE ROW EXCLUSIVE MODE;
END $$;

CREATE OR REPLACE FUNCTION audit_append(
  p_log text, p_id uuid, p_event text, p_row jsonb, p_evidence jsonb DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql {_PIN} AS $$
DECLARE
  last_seq bigint;
  last_hash text;
  doc text;
  at timestamp := clock_timestamp() AT TIME ZONE 'UTC';
BEGIN
  PERFORM audit_lock();
  SELECT c.seq, c.hash INTO last_seq, last_hash
    FROM public.audit_chain c ORDER BY c.seq DESC LIMIT 1;
  last_seq := coalesce(last_seq, 0);
  last_hash := coalesce(last_hash, repeat('0', 64));
  doc := jsonb_build_object('seq', last_seq + 1, 'log', p_log, 'row_id', p_id,
                            'event', p_event, 'recorded_at', at, 'row', p_row,
                            'evidence', p_evidence)::text;
  INSERT INTO public.audit_chain (seq, log, row_id, event, recorded_at, payload, prev_hash, hash)
  VALUES (last_seq + 1, p_log, p_id, p_event, at, doc, last_hash,
          encode(sha256(convert_to(last_hash || doc, 'UTF8')), 'hex'));
  RETURN last_seq + 1;
END $$;

CREATE OR REPLACE FUNCTION audit_start(
  p_log text, p_id uuid, p_token text, p_fields jsonb, p_started_by jsonb
) RETURNS TABLE (audit_id uuid, token text)
LANGUAGE plpgsql SECURITY DEFINER {_PIN} AS $$
#variable_conflict use_variable
DECLARE
  tbl text := audit_table(p_log);
  tok text := coalesce(p_token, gen_random_uuid()::text || gen_random_uuid()::text);
  digest text;
  existing text;
  n bigint;
  now_utc timestamp := clock_timestamp() AT TIME ZONE 'UTC';
  stored jsonb;
BEGIN
  IF session_user::text = '{OWNER_ROLE}'
     OR (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user) THEN
    RAISE EXCEPTION 'the ops DSN logs in as %, who can rewrite the audit trail: point '
      'WEDEFI_DR_OPS_DSN at the application role {APP_ROLE}', session_user
      USING ERRCODE = '42501';
  END IF;
  IF length(tok) < 32 THEN
    RAISE EXCEPTION 'audit_start: the token must be at least 32 characters'
      USING ERRCODE = '22023';
  END IF;
  PERFORM audit_check_fields(p_log, 'start', p_fields);
  digest := encode(sha256(convert_to(tok, 'UTF8')), 'hex');
  PERFORM audit_lock();
  EXECUTE format('SELECT token_hash FROM public.%I WHERE id = $1', tbl) INTO existing USING p_id;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n > 0 THEN
    IF existing IS DISTINCT FROM digest THEN
      RAISE EXCEPTION 'audit row % in % was started by another run', p_id, tbl
        USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT p_id, tok;  -- a retried start: the row is already there
    RETURN;
  END IF;
  EXECUTE format(
    'INSERT INTO public.%1$I AS t SELECT * FROM jsonb_populate_record(NULL::public.%1$I, $1) '
    'RETURNING to_jsonb(t)', tbl)
  INTO stored
  USING coalesce(p_fields, '{{}}'::jsonb) || jsonb_build_object(
    'id', p_id, 'start_time', now_utc, 'status', 'running', 'token_hash', digest,
    'started_by', p_started_by, 'created_at', now_utc);
  PERFORM audit_append(p_log, p_id, 'start', stored);
  RETURN QUERY SELECT p_id, tok;
END $$;

CREATE OR REPLACE FUNCTION audit_finish(
  p_log text, p_id uuid, p_token text, p_status text, p_fields jsonb
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER {_PIN} AS $$
DECLARE
  tbl text := audit_table(p_log);
  cols text;
  old jsonb;
  stored jsonb;
BEGIN
  IF p_status IS NULL OR p_status NOT IN ('success', 'failed', 'refused') THEN
    RAISE EXCEPTION 'audit_finish: % is not a final status', p_status USING ERRCODE = '22023';
  END IF;
  PERFORM audit_check_fields(p_log, 'finish', p_fields);
  PERFORM audit_lock();
  EXECUTE format('SELECT to_jsonb(t) FROM public.%I t WHERE id = $1 FOR UPDATE', tbl)
    INTO old USING p_id;
  IF old IS NULL THEN
    RAISE EXCEPTION 'audit row % does not exist in %', p_id, tbl USING ERRCODE = '22023';
  END IF;
  IF old->>'token_hash' IS NULL
     OR old->>'token_hash' <> encode(sha256(convert_to(coalesce(p_token, ''), 'UTF8')), 'hex')
  THEN
    RAISE EXCEPTION 'audit row % in % was not started by this run (wrong token): '
      'a run finishes only the row it started', p_id, tbl USING ERRCODE = '42501';
  END IF;
  IF old->>'status' NOT IN ('running', 'abandoned') THEN
    RETURN old->>'status';  -- a retried finish: final rows are never rewritten
  END IF;
  SELECT string_agg(quote_ident(c), ', ') INTO cols
    FROM unnest(audit_columns(p_log, 'finish') || ARRAY['status', 'end_time']) AS c;
  EXECUTE format(
    'UPDATE public.%1$I AS t SET (%2$s) = '
    '(SELECT %2$s FROM jsonb_populate_record(NULL::public.%1$I, $1)) '
    'WHERE t.id = $2 RETURNING to_jsonb(t)', tbl, cols)
  INTO stored
  USING old || coalesce(p_fields, '{{}}'::jsonb) || jsonb_build_object(
    'status', p_status, 'end_time', clock_timestamp() AT TIME ZONE 'UTC'), p_id;
  PERFORM audit_append(p_log, p_id, 'finish', stored);
  RETURN p_status;
END $$;

CREATE OR REPLACE FUNCTION audit_abandon(p_log text, p_id uuid, p_evidence jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER {_PIN} AS $$
DECLARE
  tbl text := audit_table(p_log);
  old jsonb;
  suffix text;
  stored jsonb;
  evidence jsonb;
BEGIN
  PERFORM audit_lock();
  EXECUTE format('SELECT to_jsonb(t) FROM public.%I t WHERE id = $1 FOR UPDATE', tbl)
    INTO old USING p_id;
  IF old IS NULL OR old->>'status' <> 'running' THEN
    RETURN false;
  END IF;
  suffix := ' ' || (old->'started_by'->>'host') || ' pid ' || (old->'started_by'->>'pid');
  IF EXISTS (SELECT 1 FROM pg_stat_activity a
              WHERE a.application_name LIKE 'wedefi-dr lock %'
                AND right(a.application_name, length(suffix)) = suffix) THEN
    RAISE EXCEPTION 'audit row % in %: its starter (%) still holds a lock session, '
      'so it is not abandoned', p_id, tbl, btrim(suffix) USING ERRCODE = '55006';
  END IF;
  evidence := coalesce(p_evidence, '{{}}'::jsonb) || jsonb_build_object(
    'started_at', old->'start_time', 'started_by', old->'started_by',
    'lock_session', 'none connected');
  EXECUTE format(
    'UPDATE public.%1$I AS t SET (status, end_time, error_message) = '
    '(''abandoned'', clock_timestamp() AT TIME ZONE ''UTC'', $1) '
    'WHERE t.id = $2 RETURNING to_jsonb(t)', tbl)
  INTO stored
  USING left('abandoned: ' || coalesce(p_evidence->>'summary', 'its starter is gone'), 2000),
        p_id;
  PERFORM audit_append(p_log, p_id, 'abandon', stored, evidence);
  RETURN true;
END $$;

-- Rows written before the chain existed enter it once, as they are, in their order.
CREATE OR REPLACE FUNCTION audit_adopt() RETURNS integer LANGUAGE plpgsql {_PIN} AS $$
DECLARE
  ev record;
  n integer := 0;
BEGIN
  PERFORM audit_lock();
  FOR ev IN
    SELECT l.log, l.id, l.doc FROM (
      SELECT 'backup' AS log, b.id, to_jsonb(b) AS doc, b.created_at, b.start_time
        FROM public.backup_audit_log b
      UNION ALL
      SELECT 'recovery', v.id, to_jsonb(v), v.created_at, v.start_time
        FROM public.recovery_audit_log v
      UNION ALL
      SELECT 'retention', t.id, to_jsonb(t), t.created_at, t.start_time
        FROM public.retention_audit_log t
    ) l
    WHERE NOT EXISTS (SELECT 1 FROM public.audit_chain c WHERE c.row_id = l.id)
    ORDER BY l.created_at, l.start_time, l.id
  LOOP
    PERFORM audit_append(ev.log, ev.id, 'adopt', ev.doc);
    n := n + 1;
  END LOOP;
  RETURN n;
END $$;
"""

_GRANTS = f"""
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['backup_audit_log', 'recovery_audit_log', 'retention_audit_log',
                           'audit_chain'] LOOP
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_guard', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I '
                   'FOR EACH ROW EXECUTE FUNCTION audit_guard()', t || '_guard', t);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_no_truncate', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION audit_guard()', t || '_no_truncate', t);
    EXECUTE format('ALTER TABLE %I OWNER TO {OWNER_ROLE}', t);
    EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, {APP_ROLE}', t);
    EXECUTE format('GRANT SELECT ON %I TO {APP_ROLE}', t);
  END LOOP;
END $$;

ALTER FUNCTION audit_guard() OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_table(text) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_columns(text, text) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_check_fields(text, text, jsonb) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_lock() OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_append(text, uuid, text, jsonb, jsonb) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_start(text, uuid, text, jsonb, jsonb) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_finish(text, uuid, text, text, jsonb) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_abandon(text, uuid, jsonb) OWNER TO {OWNER_ROLE};
ALTER FUNCTION audit_adopt() OWNER TO {OWNER_ROLE};
REVOKE ALL ON FUNCTION audit_guard(), audit_table(text), audit_columns(text, text),
  audit_check_fields(text, text, jsonb), audit_lock(),
  audit_append(text, uuid, text, jsonb, jsonb), audit_start(text, uuid, text, jsonb, jsonb),
  audit_finish(text, uuid, text, text, jsonb), audit_abandon(text, uuid, jsonb), audit_adopt()
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_start(text, uuid, text, jsonb, jsonb),
  audit_finish(text, uuid, text, text, jsonb), audit_abandon(text, uuid, jsonb)
  TO {APP_ROLE};
-- Before PostgreSQL 15 every role may create in public: a definer function's search path
-- must not lead to objects the application made.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
"""

DDL = _TABLES + _FUNCTIONS + _GRANTS


def install(
    admin_dsn: str, app_password: str | None = None, owner_password: str | None = None
) -> int:
    """Create or upgrade the audit schema, its owner and the application role (idempotent;
    needs a superuser). Rows written before the chain existed are adopted into it; returns
    how many. ``owner_password`` lets the owner log in (for set-up by hand); without it the
    owner is a role no one can log in as."""
    with connect(admin_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('wedefi_dr_audit_install'))")
        cur.execute(DDL)
        # Only SCRAM verifiers travel: a password never reaches the server's statement
        # text, its log (an erroring statement is logged) or pg_stat_statements.
        if app_password is not None:
            verifier = encrypt_password(app_password, APP_ROLE, conn, "scram-sha-256")
            cur.execute(f"ALTER ROLE {APP_ROLE} PASSWORD %s", (verifier,))
        if owner_password is not None:
            verifier = encrypt_password(owner_password, OWNER_ROLE, conn, "scram-sha-256")
            cur.execute(f"ALTER ROLE {OWNER_ROLE} LOGIN PASSWORD %s", (verifier,))
        cur.execute(f"SET LOCAL ROLE {OWNER_ROLE}")
        cur.execute("SELECT audit_adopt()")
        (adopted,) = cur.fetchone()
    return adopted
