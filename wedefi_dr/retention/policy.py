"""Data retention by classification: the policy, checked against the live schema.

Why it is built this way:

- The policy (``deployments/retention.yaml``) is data, parsed into pydantic models, and
  every name in it is checked against ``pg_catalog`` before any row is touched: a typo
  or a renamed column is a clear error, not a silently skipped rule (and a name that is
  not a plain identifier never reaches SQL; SQL is only built with :mod:`psycopg2.sql`).
- A DELETE follows the foreign keys that point at the table. :func:`plan` walks them
  (``ON DELETE CASCADE`` recursively) so that the dry run can count what would go by
  cascade, a rule has to name every table it cascades into (``cascade``), and no rule can
  reach a table kept forever (``indefinite``), whether by cascade or by ``SET NULL``,
  unless it keeps the rows still referenced from there (``skip_if_referenced_by``).

The SQL, the dry run and the batches are in :mod:`wedefi_dr.retention.batches`. No
Prefect import here: the flow's tasks, the CLI and the benchmark call these functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.conninfo import dbname_of
from wedefi_dr.postgres.timestamps import naive_utc
from wedefi_dr.postgres.tools import connect

APPLICATION_NAME = "wedefi-dr-retention"
"""Every retention connection says so in ``pg_stat_activity`` (operators, the kill drill)."""

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_AGE = re.compile(r"^(\d+) (day|week|month|year)s?$")
_ON_DELETE = {
    "a": "no action",
    "r": "restrict",
    "c": "cascade",
    "n": "set null",
    "d": "set default",
}


# ---- the policy --------------------------------------------------------------------------
def _plain_name(value: str) -> str:
    """Names are names: anything with quotes, spaces or semicolons is refused outright."""
    if not _PLAIN_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a plain table or column name (letters, digits and _ only, "
            "at most 63 characters)"
        )
    return value


def _age(value: str) -> str:
    normal = " ".join(str(value).lower().split())
    match = _AGE.match(normal)
    if not match or int(match.group(1)) < 1:
        raise ValueError(
            f"max_age {value!r} is not an age like '30 days', '6 months', '2 years' (a "
            "positive number of days, weeks, months or years)"
        )
    return f"{int(match.group(1))} {match.group(2)}s"


Name = Annotated[str, AfterValidator(_plain_name)]
Age = Annotated[str, AfterValidator(_age)]
AggregateFn = Literal["sum", "min", "max", "count"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Strict):
    batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    lock_timeout_ms: int = Field(default=2000, ge=1)
    statement_timeout_ms: int = Field(default=60_000, ge=1)
    lock_retries: int = Field(default=3, ge=0, le=100)
    # The largest share of a table one run may remove (directly or by cascade) unless the
    # request allows a mass deletion: a wrong moment or a broken clock then stops the run
    # before its first batch instead of emptying the table.
    max_share: float = Field(default=0.25, gt=0, le=1)


class Condition(_Strict):
    """An extra filter on the table's own columns (e.g. only resolved risk events)."""

    column: Name
    op: Literal["eq", "ne", "is_null", "is_not_null"]
    value: bool | int | float | str | None = None

    @model_validator(mode="after")
    def _value_matches_op(self) -> Condition:
        if self.op in ("eq", "ne") and self.value is None:
            raise ValueError(f"where {self.column}: op {self.op} needs a value")
        if self.op in ("is_null", "is_not_null") and self.value is not None:
            raise ValueError(f"where {self.column}: op {self.op} takes no value")
        return self


class Aggregate(_Strict):
    column: Name
    functions: list[AggregateFn] = Field(min_length=1)


class Summary(_Strict):
    """Where detail goes before it is deleted: one row per group and period.

    Only mergeable aggregates (sum, min, max, count) are offered: batches fold into the
    same summary row one after another, and an average of averages would be wrong (store
    ``sum`` and ``count`` and divide when reading).
    """

    table: Name
    group_by: list[Name] = Field(min_length=1)
    period: Literal["day", "week", "month", "year"] = "month"
    aggregates: list[Aggregate] = Field(default_factory=list)

    def output_columns(self) -> list[tuple[str, str | None, str]]:
        """``(summary column, source column, function)``, ``samples`` first."""
        cols: list[tuple[str, str | None, str]] = [("samples", None, "rows")]
        for agg in self.aggregates:
            for fn in agg.functions:
                cols.append((f"{agg.column}{fn.capitalize()}", agg.column, fn))
        return cols


class TableRule(_Strict):
    """One table's retention: which rows are old, and what happens to them."""

    table: Name
    # The data classification: a Tier 1 row (financial history) is never removed unless
    # the request allows a mass deletion, however few rows a run would take.
    tier: Literal[1, 2, 3]
    timestamp: Name
    max_age: Age
    action: Literal["delete", "archive", "summarize"]
    archive_table: Name | None = None
    summary: Summary | None = None
    where: list[Condition] = Field(default_factory=list)
    cascade: list[Name] = Field(default_factory=list)
    skip_if_referenced_by: list[Name] = Field(default_factory=list)
    batch_size: int | None = Field(default=None, ge=1, le=1_000_000)
    lock_timeout_ms: int | None = Field(default=None, ge=1)
    statement_timeout_ms: int | None = Field(default=None, ge=1)
    lock_retries: int | None = Field(default=None, ge=0, le=100)
    max_share: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _target_matches_action(self) -> TableRule:
        if self.action == "archive" and not self.archive_table:
            raise ValueError(f"{self.table}: action archive needs archive_table")
        if self.action == "summarize" and not self.summary:
            raise ValueError(f"{self.table}: action summarize needs a summary block")
        if self.action != "archive" and self.archive_table:
            raise ValueError(f"{self.table}: archive_table only goes with action archive")
        if self.action != "summarize" and self.summary:
            raise ValueError(f"{self.table}: summary only goes with action summarize")
        return self

    def target(self) -> str | None:
        if self.archive_table:
            return self.archive_table
        return self.summary.table if self.summary else None


class RetentionPolicy(_Strict):
    version: Literal[1]
    defaults: Defaults = Field(default_factory=Defaults)
    indefinite: list[Name] = Field(default_factory=list)
    tables: list[TableRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> RetentionPolicy:
        seen: set[str] = set()
        for rule in self.tables:
            if rule.table in seen:
                raise ValueError(f"table {rule.table} has two rules: keep one")
            seen.add(rule.table)
            if rule.table in self.indefinite:
                raise ValueError(f"table {rule.table} is kept indefinitely: it cannot have a rule")
        for rule in self.tables:
            target = rule.target()
            if target and (target in seen or target in self.indefinite):
                raise ValueError(
                    f"{rule.table}: {target} cannot be the target, it is a table with its own "
                    "retention rule or kept indefinitely"
                )
        return self

    def rule(self, table: str) -> TableRule:
        for rule in self.tables:
            if rule.table == table:
                return rule
        raise InvalidInput(f"the retention policy has no rule for table {table!r}")


def load_policy(path: str | Path) -> RetentionPolicy:
    """Read and type-check the policy file (no database needed yet)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"retention policy not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidInput(f"retention policy {path} is not valid YAML: {exc}") from exc
    try:
        return RetentionPolicy.model_validate(raw)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}" for e in exc.errors()
        ]
        raise InvalidInput(
            f"retention policy {path} refused (nothing was changed):\n  - "
            + "\n  - ".join(problems)
        ) from None


# ---- the live schema ---------------------------------------------------------------------
@dataclass(frozen=True)
class ForeignKey:
    """``child(child_cols)`` references ``parent(parent_cols)``; what a parent delete does."""

    name: str
    child: str
    child_cols: tuple[str, ...]
    parent: str
    parent_cols: tuple[str, ...]
    on_delete: str
    child_schema: str

    def describe(self) -> str:
        cols = ", ".join(self.child_cols)
        rule = self.on_delete.upper()
        return f'{self.child}({cols}) -> {self.parent} ON DELETE {rule} ("{self.name}")'


@dataclass
class Schema:
    """What ``pg_catalog`` says about the tables of the current schema."""

    name: str
    server_version: int
    columns: dict[str, dict[str, str]]  # table -> column -> type (format_type)
    categories: dict[str, dict[str, str]]  # table -> column -> pg_type.typcategory
    primary_keys: dict[str, tuple[str, ...]]
    foreign_keys: list[ForeignKey]

    def referencing(self, parent: str) -> list[ForeignKey]:
        return [fk for fk in self.foreign_keys if fk.parent == parent]


def read_schema(conn) -> Schema:
    """Tables, column types, primary keys and every foreign key into the current schema."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_schema(), current_setting('server_version_num')::int")
        schema_name, version = cur.fetchone()
        cur.execute(
            """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), t.typcategory
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_type t ON t.oid = a.atttypid
               WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
                 AND a.attnum > 0 AND NOT a.attisdropped
               ORDER BY c.relname, a.attnum"""
        )
        columns: dict[str, dict[str, str]] = {}
        categories: dict[str, dict[str, str]] = {}
        for table, column, type_, category in cur.fetchall():
            columns.setdefault(table, {})[column] = type_
            categories.setdefault(table, {})[column] = category
        cur.execute(
            """SELECT c.relname,
                      array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                            ORDER BY k.i)
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE con.contype = 'p' AND n.nspname = current_schema()"""
        )
        primary_keys = {table: tuple(cols) for table, cols in cur.fetchall()}
        cur.execute(
            """SELECT con.conname, cn.nspname, cl.relname, pl.relname, con.confdeltype,
                      array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                            ORDER BY k.i),
                      array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
                            JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
                            ORDER BY k.i)
               FROM pg_constraint con
               JOIN pg_class cl ON cl.oid = con.conrelid
               JOIN pg_namespace cn ON cn.oid = cl.relnamespace
               JOIN pg_class pl ON pl.oid = con.confrelid
               JOIN pg_namespace pn ON pn.oid = pl.relnamespace
               WHERE con.contype = 'f' AND pn.nspname = current_schema()
               ORDER BY cl.relname, con.conname"""
        )
        fks = [
            ForeignKey(
                name=name,
                child=child,
                child_cols=tuple(ccols),
                parent=parent,
                parent_cols=tuple(pcols),
                on_delete=_ON_DELETE.get(rule, rule),
                child_schema=child_schema,
            )
            for name, child_schema, child, parent, rule, ccols, pcols in cur.fetchall()
        ]
    return Schema(schema_name, version, columns, categories, primary_keys, fks)


# ---- plans: a rule bound to the schema and to a cutoff -----------------------------------
@dataclass
class TablePlan:
    """A validated rule: its cutoff, key, batch settings and the foreign keys it follows."""

    rule: TableRule
    position: int
    cutoff: datetime
    key: str
    columns: list[str]
    batch_size: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    lock_retries: int
    max_share: float
    cascade_fks: list[ForeignKey] = field(default_factory=list)
    skip_fks: list[ForeignKey] = field(default_factory=list)
    cascaded_tables: list[str] = field(default_factory=list)

    @property
    def table(self) -> str:
        return self.rule.table


def _cutoffs(conn, ages: Iterable[str], as_of: datetime) -> dict[str, datetime]:
    """``as_of - age`` computed by PostgreSQL (calendar months and years, as an interval)."""
    out: dict[str, datetime] = {}
    with conn.cursor() as cur:
        for age in set(ages):
            cur.execute("SELECT %s::timestamp - %s::interval", (as_of, age))
            out[age] = cur.fetchone()[0]
    return out


def plan(conn, policy: RetentionPolicy, as_of: datetime | None = None) -> list[TablePlan]:
    """Check the policy against the live schema and bind cutoffs; raise listing every problem.

    Read-only: it runs catalog queries and one ``timestamp - interval`` per age.
    """
    as_of = naive_utc(as_of)
    schema = read_schema(conn)
    problems: list[str] = []
    db = conn.get_dsn_parameters().get("dbname", "?")

    def table_exists(name: str, what: str) -> bool:
        if name not in schema.columns:
            problems.append(f"{what}: table {name!r} does not exist in database {db!r}")
            return False
        return True

    for name in policy.indefinite:
        table_exists(name, "indefinite")
    cutoffs = _cutoffs(conn, (r.max_age for r in policy.tables), as_of)
    plans: list[TablePlan] = []
    for position, rule in enumerate(policy.tables):
        where = f"rule {rule.table}"
        if not table_exists(rule.table, where):
            continue
        cols = schema.columns[rule.table]
        key = schema.primary_keys.get(rule.table, ())
        if len(key) != 1:
            problems.append(
                f"{where}: batches walk a one-column primary key; {rule.table} has "
                f"{'none' if not key else 'a composite one ' + str(key)}"
            )
            continue
        if rule.timestamp not in cols:
            problems.append(f"{where}: column {rule.timestamp!r} does not exist")
        elif schema.categories[rule.table][rule.timestamp] != "D":
            problems.append(
                f"{where}: column {rule.timestamp!r} is {cols[rule.timestamp]}, not a "
                "date or timestamp"
            )
        for cond in rule.where:
            if cond.column not in cols:
                problems.append(f"{where}: where column {cond.column!r} does not exist")
        for name in rule.cascade:
            table_exists(name, f"{where} cascade")
        defaults = policy.defaults
        p = TablePlan(
            rule=rule,
            position=position,
            cutoff=cutoffs[rule.max_age],
            key=key[0],
            columns=list(cols),
            batch_size=rule.batch_size or defaults.batch_size,
            lock_timeout_ms=rule.lock_timeout_ms or defaults.lock_timeout_ms,
            statement_timeout_ms=rule.statement_timeout_ms or defaults.statement_timeout_ms,
            lock_retries=(
                rule.lock_retries if rule.lock_retries is not None else defaults.lock_retries
            ),
            max_share=rule.max_share or defaults.max_share,
        )
        problems += _follow_foreign_keys(p, schema, set(policy.indefinite))
        problems += _check_target(p, schema)
        plans.append(p)
    if problems:
        raise InvalidInput(
            "retention policy refused (nothing was changed):\n  - " + "\n  - ".join(problems)
        )
    return plans


def _follow_foreign_keys(p: TablePlan, schema: Schema, indefinite: set[str]) -> list[str]:
    """Walk what a delete of ``p.table`` rows would do to other tables; list what is refused."""
    problems: list[str] = []
    rule = p.rule
    referencing_root = {fk.child for fk in schema.referencing(rule.table)}
    for name in rule.skip_if_referenced_by:
        if name not in referencing_root:
            problems.append(
                f"rule {rule.table}: skip_if_referenced_by {name!r}, but {name!r} has no "
                f"foreign key to {rule.table}"
            )
    p.skip_fks = [
        fk for fk in schema.referencing(rule.table) if fk.child in rule.skip_if_referenced_by
    ]
    reached: list[str] = []

    def walk(table: str, path: tuple[str, ...]) -> None:
        for fk in schema.referencing(table):
            if table == rule.table and fk.child in rule.skip_if_referenced_by:
                continue
            route = " -> ".join((*path, fk.child))
            hint = (
                f"keep the rows it references with skip_if_referenced_by: [{fk.child}]"
                if table == rule.table
                else f"keep them with skip_if_referenced_by: [{path[1]}]"
            )
            if fk.child_schema != schema.name:
                problems.append(
                    f"rule {rule.table}: {fk.describe()} lives in schema {fk.child_schema!r}; "
                    f"retention only follows foreign keys inside {schema.name!r}"
                )
            elif fk.on_delete in ("no action", "restrict"):
                problems.append(
                    f"rule {rule.table}: deleting would fail where {fk.describe()} still "
                    f"references a row ({route}); {hint}"
                )
            elif fk.child in indefinite:
                verb = "delete rows of" if fk.on_delete == "cascade" else f"{fk.on_delete} in"
                problems.append(
                    f"rule {rule.table}: deleting would {verb} {fk.child}, which is kept "
                    f"indefinitely ({route}, {fk.describe()}); {hint}"
                )
            elif fk.on_delete != "cascade":
                problems.append(
                    f"rule {rule.table}: deleting would {fk.on_delete} in {fk.child} "
                    f"({fk.describe()}); {hint}"
                )
            elif fk.child in path:
                problems.append(f"rule {rule.table}: cascade cycle {route} is not supported")
            else:
                if fk.child not in rule.cascade:
                    problems.append(
                        f"rule {rule.table}: deleting would cascade to {fk.child} ({route}, "
                        f"{fk.describe()}); list {fk.child} under cascade to accept that, "
                        f"or {hint}"
                    )
                p.cascade_fks.append(fk)
                if fk.child not in reached:
                    reached.append(fk.child)
                walk(fk.child, (*path, fk.child))

    walk(rule.table, (rule.table,))
    p.cascaded_tables = reached
    for name in rule.cascade:
        if name in schema.columns and name not in reached:
            problems.append(
                f"rule {rule.table}: cascade lists {name}, but deleting {rule.table} rows "
                f"does not cascade to it"
            )
    return problems


def _check_target(p: TablePlan, schema: Schema) -> list[str]:
    """An archive table must match the source; a summary's columns must exist and fit."""
    rule, problems = p.rule, []
    source = schema.columns[rule.table]
    if rule.archive_table and rule.archive_table in schema.columns:
        have = schema.columns[rule.archive_table]
        if have != source:  # same names and types (order may differ: inserts name them)
            diff = sorted(set(have.items()) ^ set(source.items()))
            problems.append(
                f"rule {rule.table}: archive table {rule.archive_table} exists with other "
                f"columns or types than {rule.table}: {diff}"
            )
        if schema.primary_keys.get(rule.archive_table) != (p.key,):
            problems.append(
                f"rule {rule.table}: archive table {rule.archive_table} needs the primary "
                f"key ({p.key}), as {rule.table}: that is how a row already archived is found"
            )
    if rule.summary:
        s = rule.summary
        for col in [*s.group_by, *(a.column for a in s.aggregates)]:
            if col not in source:
                problems.append(f"rule {rule.table}: summary column {col!r} does not exist")
        for agg in s.aggregates:
            category = schema.categories[rule.table].get(agg.column)
            if "sum" in agg.functions and category not in (None, "N"):
                problems.append(
                    f"rule {rule.table}: sum of {agg.column} ({source[agg.column]}) is not a number"
                )
        outputs = [*s.group_by, "periodStart", *(c for c, _, _ in s.output_columns())]
        if len(set(outputs)) != len(outputs):
            problems.append(f"rule {rule.table}: summary column names collide: {outputs}")
        if s.table in schema.columns:
            missing = [c for c in outputs if c not in schema.columns[s.table]]
            if missing:
                problems.append(
                    f"rule {rule.table}: summary table {s.table} exists without {missing}"
                )
        if schema.server_version < 150000:
            problems.append(
                f"rule {rule.table}: summarize merges groups with UNIQUE NULLS NOT DISTINCT, "
                "which needs PostgreSQL 15 or later"
            )
    return problems


def plans_for(dsn: str, policy_path: str | Path, as_of: datetime | None) -> list[TablePlan]:
    """Load the policy and bind it to the database at ``dsn`` (read-only)."""
    policy = load_policy(policy_path)
    with connect(dsn, application_name=APPLICATION_NAME) as conn:
        return plan(conn, policy, as_of)


def database_of(dsn: str) -> str:
    return dbname_of(dsn) or "?"
