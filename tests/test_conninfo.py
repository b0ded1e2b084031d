"""ConnTarget: parsed once by libpq, refusing what must not pass, whole for every tool.

Pure unit tests: no server. What a tool receives is checked by handing its argument back
to libpq (``parse_dsn``), the same parser the tool uses.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from psycopg2.extensions import parse_dsn

from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.conninfo import ConnTarget

FULL = (
    "host=db.internal hostaddr=10.0.0.5 port=6432 user=restorer dbname=wedefi_copy "
    "sslmode=verify-full sslrootcert=/etc/ssl/ca.pem options='-c statement_timeout=0' "
    "connect_timeout=7 target_session_attrs=read-write"
)


def _tool_conninfo(target: ConnTarget) -> dict[str, str]:
    """What libpq makes of the single ``--dbname=`` argument a tool receives."""
    (arg,) = target.tool_args()
    assert arg.startswith("--dbname=")
    return parse_dsn(arg.removeprefix("--dbname="))


def test_every_key_reaches_the_tool():
    target = ConnTarget.parse(FULL, allow_password=False)
    assert _tool_conninfo(target) == parse_dsn(FULL)
    assert target.dbname == "wedefi_copy"
    assert parse_dsn(target.conninfo) == parse_dsn(FULL)


def test_uri_form_and_service_are_kept():
    target = ConnTarget.parse(
        "postgresql://u@h:5433/d?hostaddr=127.0.0.1&sslmode=require", allow_password=False
    )
    assert _tool_conninfo(target) == {
        "user": "u",
        "host": "h",
        "port": "5433",
        "dbname": "d",
        "hostaddr": "127.0.0.1",
        "sslmode": "require",
    }
    service = ConnTarget.parse("service=dr_target dbname=x", allow_password=False)
    assert _tool_conninfo(service) == {"service": "dr_target", "dbname": "x"}
    assert service.location == "service=dr_target/x"
    assert ConnTarget.parse("dbname=x", allow_password=False).location == "localhost:5432/x"


def test_password_refused_where_parameters_are_recorded():
    with pytest.raises(InvalidInput, match="contains a password.*PGPASSFILE") as info:
        ConnTarget.parse("host=h dbname=d password=s3cret", allow_password=False)
    assert "s3cret" not in str(info.value)
    # The URI form is caught too: libpq parses it, not a regex.
    with pytest.raises(InvalidInput, match="contains a password"):
        ConnTarget.parse("postgresql://u:s3cret@h/d", allow_password=False)


def test_unparseable_dsn_is_refused_without_echoing_it():
    with pytest.raises(InvalidInput, match="not a valid PostgreSQL DSN") as info:
        ConnTarget.parse("host=h password s3cret", allow_password=True)
    assert "s3cret" not in str(info.value)
    # No chained libpq error either: its message quotes the DSN, and tracebacks are logged.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(InvalidInput, match="must be a string"):
        ConnTarget.parse(None, allow_password=True)  # type: ignore[arg-type]


def test_sslpassword_is_refused_because_no_tool_could_receive_it_safely():
    with pytest.raises(InvalidInput, match="sslpassword"):
        ConnTarget.parse("host=h dbname=d sslpassword=k", allow_password=True)


def _passfile_line(target: ConnTarget) -> str:
    return Path(_tool_conninfo(target)["passfile"]).read_text()


def test_password_only_in_a_private_passfile_never_on_argv_or_in_the_env(monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    target = ConnTarget.parse("host=h dbname=d user=u password=s3cret:x\\\\y", allow_password=True)
    assert "s3cret" not in " ".join(target.tool_args())
    assert "password" not in _tool_conninfo(target)
    assert _passfile_line(target) == "*:*:*:*:s3cret\\:x\\\\y\n"  # libpq's escapes
    assert "s3cret" not in " ".join(target.tool_env().values())
    assert "PGPASSWORD" not in target.tool_env()
    assert "s3cret" in target.conninfo  # psycopg2, in this process, needs it
    assert "s3cret" not in target.redacted
    assert "password=***" in target.redacted
    assert "s3cret" not in repr(target) and "s3cret" not in str(target)
    # One file per password and process: a second tool reuses it.
    assert target.tool_args() == target.tool_args()
    assert "passfile" not in _tool_conninfo(
        ConnTarget.parse("host=h dbname=d", allow_password=False)
    )


def test_tool_env_is_what_libpq_reads_here_and_no_other_secret(monkeypatch):
    """Inherited PG* defaults apply to the tool exactly as to psycopg2 in this process
    (the conninfo's own keys win over them in both); the project's secrets stay out."""
    monkeypatch.setenv("PGHOST", "/stray/socket")
    monkeypatch.setenv("PGDATABASE", "stray_db")
    monkeypatch.setenv("PGSERVICEFILE", "/etc/wedefi/pg_service.conf")
    monkeypatch.setenv("PGPASSWORD", "from-the-caller")
    monkeypatch.setenv("HOME", "/home/operator")
    monkeypatch.setenv("WEDEFI_DR_GPG_PASSPHRASE", "gpg-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    target = ConnTarget.parse("host=h dbname=d", allow_password=False)
    env = target.tool_env()
    assert env["PGHOST"] == "/stray/socket"
    assert env["PGDATABASE"] == "stray_db"
    assert env["PGSERVICEFILE"] == "/etc/wedefi/pg_service.conf"
    assert env["HOME"] == "/home/operator"  # ~/.pgpass, ~/.pg_service.conf
    for name in ("PGPASSWORD", "WEDEFI_DR_GPG_PASSPHRASE", "AWS_SECRET_ACCESS_KEY"):
        assert name not in env
    assert not {"from-the-caller", "gpg-secret", "aws-secret"} & set(env.values())
    # No password in the DSN: the caller's PGPASSWORD applies (libpq's own rule), by file.
    assert _passfile_line(target) == "*:*:*:*:from-the-caller\n"
    # A password in the DSN outranks the inherited one, as it does for psycopg2.
    with_pw = ConnTarget.parse("host=h dbname=d password=mine", allow_password=True)
    assert _passfile_line(with_pw) == "*:*:*:*:mine\n"


def test_with_dbname_keeps_the_server_and_every_option():
    target = ConnTarget.parse(FULL, allow_password=False)
    other = target.with_dbname("postgres")
    expected = parse_dsn(FULL) | {"dbname": "postgres"}
    assert _tool_conninfo(other) == expected
    assert target.dbname == "wedefi_copy"  # immutable: the original is unchanged
    with pytest.raises(AttributeError):
        target.params = ()  # type: ignore[misc]


def test_hostile_dbname_stays_one_quoted_value():
    hostile = "-x' host=evil dbname=postgres\n--clean"
    target = ConnTarget.parse(f"host=h dbname={_quote(hostile)}", allow_password=False)
    assert target.dbname == hostile
    args = target.tool_args()
    assert len(args) == 1
    assert _tool_conninfo(target) == {"host": "h", "dbname": hostile}
    assert target.with_dbname(hostile).dbname == hostile


def test_a_task_input_prefect_can_hash_and_persist():
    """DESIGN pitfall: an unhashable task input makes Prefect skip its cache silently."""
    from prefect.utilities.hashing import hash_objects

    a = ConnTarget.parse(FULL, allow_password=False)
    b = ConnTarget.parse(FULL, allow_password=False)
    assert pickle.loads(pickle.dumps(a)) == a
    assert hash(a) == hash(b)
    key = hash_objects(a, raise_on_failure=True)
    assert key is not None and key == hash_objects(b, raise_on_failure=True)
    assert key != hash_objects(a.with_dbname("other"), raise_on_failure=True)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
