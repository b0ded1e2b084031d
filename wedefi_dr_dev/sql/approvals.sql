-- Approvals whose identity is checked by PostgreSQL, in the ops database.
--
-- A run that needs approval inserts an approval_request as the application role
-- (wedefi_dr_app). Each approver holds their own LOGIN role, a member of dr_approver, and
-- inserts an approval row connecting with their own credentials. The server, not the
-- client, says who approved: the trigger writes session_user into the row, and refuses
--   * a role that is not directly a member of dr_approver (superusers included),
--   * an unknown, decided or expired request,
--   * the requester approving their own request (the requesting role, or the operator
--     named on the request),
--   * a second approval by the same role.
-- Approvals are never updated or deleted. Row security keeps an approver from writing a
-- row in anyone else's name even if the trigger were disabled.
-- Idempotent: applied by `wedefi-dr stack up` on every start.

DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dr_approver') THEN
    CREATE ROLE dr_approver NOLOGIN;
  END IF;
END $$;

CREATE TABLE IF NOT EXISTS approval_request (
  request_id UUID PRIMARY KEY,
  run_id VARCHAR(100) NOT NULL,
  operation VARCHAR(50) NOT NULL,
  subject VARCHAR(300) NOT NULL,
  production BOOLEAN NOT NULL,
  requester_role NAME NOT NULL,
  operator_id VARCHAR(100) NOT NULL CHECK (btrim(operator_id) <> ''),
  justification TEXT NOT NULL CHECK (btrim(justification) <> ''),
  created_at TIMESTAMPTZ NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  status VARCHAR(20) NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'approved', 'refused', 'expired')),
  decided_at TIMESTAMPTZ
);
CREATE UNIQUE INDEX IF NOT EXISTS approval_request_one_pending
  ON approval_request (run_id) WHERE status = 'pending';

CREATE TABLE IF NOT EXISTS approval (
  id BIGSERIAL PRIMARY KEY,
  request_id UUID NOT NULL REFERENCES approval_request (request_id),
  approver NAME NOT NULL DEFAULT session_user,
  approve BOOLEAN NOT NULL,
  emergency_declared BOOLEAN NOT NULL DEFAULT false,
  justification TEXT NOT NULL CHECK (btrim(justification) <> ''),
  created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  UNIQUE (request_id, approver)
);

CREATE OR REPLACE FUNCTION approval_request_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    RAISE EXCEPTION 'approval requests are never deleted';
  ELSIF TG_OP = 'INSERT' THEN
    NEW.requester_role := session_user;
    NEW.created_at := now();
    NEW.status := 'pending';
    NEW.decided_at := NULL;
    RETURN NEW;
  END IF;
  IF OLD.status <> 'pending' THEN
    RAISE EXCEPTION 'approval request % is already %', OLD.request_id, OLD.status;
  END IF;
  IF (NEW.request_id, NEW.run_id, NEW.operation, NEW.subject, NEW.production,
      NEW.requester_role, NEW.operator_id, NEW.justification, NEW.created_at, NEW.expires_at)
     IS DISTINCT FROM
     (OLD.request_id, OLD.run_id, OLD.operation, OLD.subject, OLD.production,
      OLD.requester_role, OLD.operator_id, OLD.justification, OLD.created_at, OLD.expires_at)
  THEN
    RAISE EXCEPTION 'approval request %: only its status changes', OLD.request_id;
  END IF;
  NEW.decided_at := now();
  RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS approval_request_guard ON approval_request;
CREATE TRIGGER approval_request_guard BEFORE INSERT OR UPDATE OR DELETE ON approval_request
  FOR EACH ROW EXECUTE FUNCTION approval_request_guard();

CREATE OR REPLACE FUNCTION approval_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
  who NAME := session_user;
  req approval_request%ROWTYPE;
BEGIN
  IF TG_OP <> 'INSERT' THEN
    RAISE EXCEPTION 'approvals are never changed or deleted (% refused)', TG_OP;
  END IF;
  NEW.approver := who;
  NEW.created_at := now();
  IF NOT EXISTS (
    SELECT 1 FROM pg_auth_members m
      JOIN pg_roles g ON g.oid = m.roleid
      JOIN pg_roles u ON u.oid = m.member
     WHERE g.rolname = 'dr_approver' AND u.rolname = who AND NOT u.rolsuper
  ) THEN
    RAISE EXCEPTION 'approval refused: role % is not a dr_approver', who
      USING ERRCODE = '42501';
  END IF;
  -- Row lock: two approvals of one request are decided one after the other.
  SELECT * INTO req FROM approval_request WHERE request_id = NEW.request_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'approval refused: no approval request %', NEW.request_id;
  END IF;
  IF req.status <> 'pending' THEN
    RAISE EXCEPTION 'approval refused: request for run % is already %', req.run_id, req.status;
  END IF;
  IF req.expires_at <= now() THEN
    RAISE EXCEPTION 'approval refused: request for run % expired at %', req.run_id, req.expires_at;
  END IF;
  IF who = req.requester_role OR lower(who) = lower(btrim(req.operator_id)) THEN
    RAISE EXCEPTION 'approval refused: % requested run % and cannot approve it', who, req.run_id;
  END IF;
  IF EXISTS (SELECT 1 FROM approval a WHERE a.request_id = NEW.request_id AND a.approver = who)
  THEN
    RAISE EXCEPTION 'approval refused: % already answered the request for run %', who, req.run_id;
  END IF;
  RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS approval_guard ON approval;
CREATE TRIGGER approval_guard BEFORE INSERT OR UPDATE OR DELETE ON approval
  FOR EACH ROW EXECUTE FUNCTION approval_guard();
DROP TRIGGER IF EXISTS approval_no_truncate ON approval;
CREATE TRIGGER approval_no_truncate BEFORE TRUNCATE ON approval
  FOR EACH STATEMENT EXECUTE FUNCTION approval_guard();

ALTER TABLE approval ENABLE ROW LEVEL SECURITY;
ALTER TABLE approval FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS approval_insert_own ON approval;
CREATE POLICY approval_insert_own ON approval FOR INSERT TO dr_approver
  WITH CHECK (approver = session_user);
DROP POLICY IF EXISTS approval_read ON approval;
CREATE POLICY approval_read ON approval FOR SELECT USING (true);

REVOKE ALL ON approval_request, approval FROM PUBLIC;
REVOKE ALL ON approval_request, approval FROM wedefi_dr_app, dr_approver;
GRANT SELECT, INSERT ON approval_request TO wedefi_dr_app;
GRANT UPDATE (status) ON approval_request TO wedefi_dr_app;
GRANT SELECT ON approval TO wedefi_dr_app;
GRANT SELECT ON approval_request TO dr_approver;
GRANT SELECT, INSERT (request_id, approve, emergency_declared, justification)
  ON approval TO dr_approver;
GRANT USAGE ON SEQUENCE approval_id_seq TO dr_approver;
