"""Deterministic WeDefiDaily sample data, shaped like production, with a scale knob.

The demo, the tests and the benchmarks need a database that looks like the real one
(text UUID keys, 0x addresses, 64-hex transaction hashes, ``numeric(36,18)`` money, JSONB
metadata, 33 tables tied by cascading foreign keys) and that is the same on every run, so
that a restore can be checked against a fingerprint and a bench run compared with the
last one. This module makes it, without Prefect or Great Expectations.

Shape (``scale=1``): 5 chains (1, 10, 137, 8453, 42161), 10 protocols, 50 tokens, 200
wallets with a few balances each, and rows in every other table. ``PriceSnapshot`` carries
most of the volume: every token has a price every ``PRICE_INTERVAL_MINUTES`` over the
last ``PRICE_DENSE_DAYS`` days (so every one of the last 7 days is complete) and a sparse
tail back to about 2.5 years, so that some rows are older than the 2-year retention.
Every retention rule of the recovery plan has rows on both sides of its line: alert
deliveries around 30 days, digest runs (with their four kinds of snapshot children)
around 6 months, governance locks that ended more than a year ago, transactions older
than 7 years, risk and performance rows older than 1 year.

Scale: tokens, wallets and everything hanging off them grow linearly with ``scale``;
the row count of the fixed reference tables (chains, protocols, vote epochs, digest runs)
does not (and below scale 0.25 the floor of 12 tokens and 10 wallets keeps the data at
about 16 MB). Measured on 2 cores, PostgreSQL 15, default settings (``pg_database_size``,
which includes the ~9 MB of an empty database with the schema; time includes ANALYZE):

    scale 1:   78 k rows,   38 MB,   3 s
    scale 4:  310 k rows,  115 MB,  10 s
    scale 40: 3.1 M rows, 1029 MB, 109 s (67 MB of client memory)

so **scale 40 gives about 1 GB**, and each unit of scale adds about 25 MB. The price
cadence is one every 40 minutes (36 a day per token) rather than a denser one so that
scale 1 stays under 40 MB with 50 tokens.

Determinism: the content depends only on ``(scale, now, rng_seed)``. Each table draws
from its own ``random.Random`` seeded with ``"<rng_seed>:<table>"``, UUIDs are built from
those generators (never ``uuid4()``), and every timestamp is placed relative to ``now``,
which defaults to the current UTC hour. The data is loaded with ``COPY`` from generators,
a chunk at a time, so memory stays flat at any scale.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
from psycopg2 import sql

from wedefi_dr.errors import InvalidInput

SCHEMA_SQL_PATH: Path = Path(__file__).parent / "sql" / "wedefidaily.sql"
"""The WeDefiDaily DDL (quoted camelCase identifiers, written from the Prisma schema)."""

SAMPLE_WALLET_ADDRESS: str = "0x5eed0dd1a7a5e7b4c0ffee0b5e55ed5a11e7d00d"
"""The address of the first wallet, whatever the seed: tests search backups for it."""

TABLES: tuple[str, ...] = (
    "Chain",
    "Protocol",
    "Token",
    "Wallet",
    "TokenBalance",
    "PriceSnapshot",
    "GovernanceLock",
    "VoteEpoch",
    "Gauge",
    "Bribe",
    "VotePowerSnapshot",
    "RewardOpportunity",
    "RewardClaim",
    "GammaswapPool",
    "GammaswapPosition",
    "RiskEvent",
    "Alert",
    "AlertDelivery",
    "PriceThreshold",
    "Transaction",
    "PortfolioSnapshot",
    "PositionSnapshot",
    "PerformanceMetric",
    "AssetCorrelation",
    "ProtocolExposure",
    "VolatilityMetric",
    "ValueAtRisk",
    "RiskAdjustedMetric",
    "DigestRun",
    "WalletBalanceSnapshot",
    "GovernanceLockSnapshot",
    "RewardOpportunitySnapshot",
    "GammaswapPositionSnapshot",
)
"""The 33 tables, parents before children (the order they are loaded in)."""

# Alert values the schema leaves open (VARCHAR(16), default 'pending'): DigestRun counts
# criticalAlerts and warningAlerts, hence these severities.
ALERT_STATUSES: tuple[str, ...] = ("pending", "dispatched", "acknowledged", "resolved")
ALERT_SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")

PRICE_INTERVAL_MINUTES = 40
PRICE_DENSE_DAYS = 30
PRICE_TAIL_DAYS = 912  # about 2.5 years
PRICE_TAIL_EVERY_DAYS = 7
COPY_CHUNK_CHARS = 1 << 18

_NULL = "\\N"
_UUID_CLEAR = ((1 << 128) - 1) ^ ((0xF000 << 64) | (0xC000 << 48))
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)
_DAY = 86_400

# chain id, name, short name, native symbol, explorer, seconds per block, block at ts0
_CHAINS = (
    (1, "Ethereum Mainnet", "eth", "ETH", "https://etherscan.io", 12.0, 1_438_269_973),
    (10, "OP Mainnet", "oeth", "ETH", "https://optimistic.etherscan.io", 2.0, 1_636_665_399),
    (137, "Polygon PoS", "matic", "POL", "https://polygonscan.com", 2.1, 1_590_824_836),
    (8453, "Base", "base", "ETH", "https://basescan.org", 2.0, 1_686_789_347),
    (42161, "Arbitrum One", "arb1", "ETH", "https://arbiscan.io", 0.25, 1_622_240_000),
)
_CHAIN_IDS = tuple(c[0] for c in _CHAINS)
_BLOCK_CLOCK = {c[0]: (c[5], c[6]) for c in _CHAINS}

# slug, name, chain, website, vote-escrow (has locks, epochs, gauges, bribes)
_PROTOCOLS = (
    ("aerodrome", "Aerodrome Finance", 8453, "https://aerodrome.finance", True),
    ("velodrome", "Velodrome Finance", 10, "https://velodrome.finance", True),
    ("curve", "Curve Finance", 1, "https://curve.fi", True),
    ("convex", "Convex Finance", 1, "https://www.convexfinance.com", True),
    ("balancer", "Balancer", 1, "https://balancer.fi", True),
    ("pendle", "Pendle", 42161, "https://www.pendle.finance", True),
    ("gammaswap", "GammaSwap", 42161, "https://gammaswap.com", False),
    ("aave", "Aave", 1, "https://aave.com", False),
    ("uniswap", "Uniswap", 1, "https://uniswap.org", False),
    ("quickswap", "QuickSwap", 137, "https://quickswap.exchange", False),
)

# chain, symbol, name, decimals, native, price in USD, protocol slug whose token it is
_KNOWN_TOKENS = (
    (1, "ETH", "Ether", 18, True, 3150.0, None),
    (1, "USDC", "USD Coin", 6, False, 1.0, None),
    (8453, "AERO", "Aerodrome", 18, False, 1.12, "aerodrome"),
    (10, "VELO", "Velodrome", 18, False, 0.11, "velodrome"),
    (1, "CRV", "Curve DAO Token", 18, False, 0.52, "curve"),
    (1, "CVX", "Convex Token", 18, False, 2.9, "convex"),
    (1, "BAL", "Balancer", 18, False, 2.4, "balancer"),
    (42161, "PENDLE", "Pendle", 18, False, 4.8, "pendle"),
    (42161, "GS", "GammaSwap", 18, False, 0.09, "gammaswap"),
    (1, "AAVE", "Aave Token", 18, False, 155.0, "aave"),
    (1, "UNI", "Uniswap", 18, False, 8.3, "uniswap"),
    (137, "QUICK", "QuickSwap", 18, False, 0.048, "quickswap"),
    (8453, "ETH", "Ether", 18, True, 3150.0, None),
    (10, "ETH", "Ether", 18, True, 3150.0, None),
    (42161, "ETH", "Ether", 18, True, 3150.0, None),
    (137, "POL", "Polygon Ecosystem Token", 18, True, 0.42, None),
    (1, "WETH", "Wrapped Ether", 18, False, 3150.0, None),
    (1, "USDT", "Tether USD", 6, False, 1.0, None),
    (1, "DAI", "Dai Stablecoin", 18, False, 1.0, None),
    (1, "WBTC", "Wrapped BTC", 8, False, 61000.0, None),
    (8453, "USDC", "USD Coin", 6, False, 1.0, None),
    (8453, "cbETH", "Coinbase Wrapped Staked ETH", 18, False, 3380.0, None),
    (10, "OP", "Optimism", 18, False, 1.7, None),
    (10, "USDC", "USD Coin", 6, False, 1.0, None),
    (42161, "ARB", "Arbitrum", 18, False, 0.78, None),
    (42161, "USDC", "USD Coin", 6, False, 1.0, None),
    (42161, "GMX", "GMX", 18, False, 27.0, None),
    (137, "USDC", "USD Coin", 6, False, 1.0, None),
    (137, "WETH", "Wrapped Ether", 18, False, 3150.0, None),
)
_NATIVE_ADDRESS = "0x" + "e" * 40
_PRICE_SOURCES = ("chainlink", "coingecko", "dex_twap", "pyth")
_ALERT_CHANNELS = ("console", "slack", "discord", "email", "webhook", "pagerduty")
_TX_TYPES = ("buy", "sell", "claim", "transfer", "stake", "unstake")
_RISK_LEVELS = ("low", "medium", "high", "critical")
_RISK_EVENT_TYPES = ("correlation_spike", "exposure_breach", "volatility_spike", "var_breach")
_PERF_TIMEFRAMES = ("24h", "7d", "30d", "90d", "1y", "all")
_VOL_TIMEFRAMES = ("7d", "30d", "90d", "1y")
_RAM_TIMEFRAMES = ("30d", "90d", "1y", "all")
_VAR_TIMEFRAMES = ("1d", "7d", "30d")
_VAR_LEVELS = ("0.9500", "0.9900")
_VAR_METHODS = ("historical", "parametric", "monte_carlo")
_POSITION_TYPES = ("liquid", "locked", "staked", "lp")
_GS_POSITION_TYPES = ("long", "short", "lp")
_LABELS = ("treasury", "hot wallet", "cold storage", "farming", "ve-voter", "multisig", "")


# The comment the seed puts on a database it fills: ``--reset`` drops tables only there.
SAMPLE_DATABASE_MARKER = "wedefi-dr sample database (made by wedefi-dr seed)"


def _guard_sample_database(cur: psycopg2.extensions.cursor, reset: bool) -> None:
    """Mark an empty database as a sample one (the seed is about to fill it); refuse a
    reset of any database that is neither empty nor marked, before anything is dropped.

    A reset drops the WeDefiDaily tables: pointed at production by mistake (the primary
    DSN is the protected database), it must stop here.
    """
    cur.execute(
        "SELECT current_database(), shobj_description(d.oid, 'pg_database'), "
        "(SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' "
        " AND n.nspname <> 'information_schema') "
        "FROM pg_database d WHERE d.datname = current_database()"
    )
    name, comment, tables = cur.fetchone()
    if tables == 0:
        cur.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(name), sql.Literal(SAMPLE_DATABASE_MARKER)
            )
        )
    elif reset and comment != SAMPLE_DATABASE_MARKER:
        raise InvalidInput(
            f"refusing to reset database {name!r}: it holds {tables} table(s) and is not a "
            "sample database the seed made (no sample marker comment); nothing was dropped"
        )


# ---- public API ------------------------------------------------------------------------
def check_scale(scale: float) -> float:
    """The seed's size factor, refused unless positive (before anything is dropped)."""
    if not scale > 0:
        raise InvalidInput(f"scale must be positive, got {scale!r}")
    return scale


def product_tables() -> tuple[str, ...]:
    """The tables the product creates beside the WeDefiDaily schema: the retention
    policy's archive and summary targets. A reset that kept them would keep archived
    copies of rows that the new sample data brings back into the hot tables."""
    from wedefi_dr.config import get_settings
    from wedefi_dr.retention.policy import load_policy

    policy = load_policy(get_settings().retention_policy)
    return tuple(target for rule in policy.tables if (target := rule.target()))


def prepare(dsn: str, *, reset: bool = False, scale: float | None = None) -> None:
    """Make the database ready for :func:`seed`: the schema present and every table empty.

    The CLI, the bench and the tests call this before :func:`seed`. With ``reset`` the 33
    WeDefiDaily tables and the tables the product made beside them
    (:func:`product_tables`) are dropped first (sample databases only: this deletes their
    data). Without it, the schema is created when absent and an existing, empty schema
    is accepted; any data, or a partial schema, is refused rather than overwritten.
    Dropping and creating happen in one transaction. ``scale``, when given, is the one
    :func:`seed` will get: it is checked first, so a bad one drops nothing.

    Raises:
        InvalidInput: ``scale`` is not positive, or some tables exist and hold rows (or
            only some exist) and ``reset`` is false.
    """
    if scale is not None:
        check_scale(scale)
    dropped = (*TABLES, *product_tables()) if reset else ()
    conn = psycopg2.connect(dsn, application_name="wedefi-dr-seed")
    try:
        with conn, conn.cursor() as cur:
            _guard_sample_database(cur, reset)
            if dropped:
                cur.execute(
                    sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(
                        sql.SQL(", ").join(sql.Identifier(t) for t in dropped)
                    )
                )
            cur.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename = ANY(%s)",
                (list(TABLES),),
            )
            present = [row[0] for row in cur.fetchall()]
            if not present:
                cur.execute(SCHEMA_SQL_PATH.read_text(encoding="utf-8"))
                return
            if len(present) < len(TABLES):
                raise InvalidInput(
                    f"only {len(present)} of the {len(TABLES)} WeDefiDaily tables exist in this"
                    " database: reset it (sample databases only) or use a fresh one"
                )
            for table in TABLES:
                cur.execute(
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))
                )
                if cur.fetchone()[0]:
                    raise InvalidInput(
                        f"table {table!r} already holds rows: reset the database (sample"
                        " databases only) or use a fresh one"
                    )
    finally:
        conn.close()


def seed(
    dsn: str,
    scale: float = 1.0,
    *,
    now: datetime | None = None,
    rng_seed: int = 20261124,
) -> dict[str, int]:
    """Fill an empty database that has the schema; return the rows per table.

    The whole load is one transaction (a failure leaves the tables empty), followed by
    ``ANALYZE`` of the 33 tables so that the first queries on the sample data (and the
    row estimates a backup reports) are sane.

    Args:
        dsn: libpq connection string of the target database.
        scale: 1 loads in seconds; the size grows about linearly with it.
        now: the moment the data is placed around (naive means UTC); defaults to the
            current UTC time truncated to the hour, so runs within an hour are identical.
        rng_seed: the seed of every random choice.

    Returns:
        ``{"TableName": rows}`` for the 33 tables, in load order.
    """
    check_scale(scale)
    if now is None:
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if now.tzinfo is not None:
        now = now.astimezone(UTC).replace(tzinfo=None)
    gen = _Generator(scale=scale, now=now, rng_seed=rng_seed)
    conn = psycopg2.connect(dsn, application_name="wedefi-dr-seed", options="-c TimeZone=UTC")
    counts: dict[str, int] = {}
    try:
        with conn, conn.cursor() as cur:
            for table, columns, rows in gen.tables():
                counts[table] = _copy(cur, table, columns, rows)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("ANALYZE {}").format(sql.SQL(", ").join(sql.Identifier(t) for t in TABLES))
            )
    finally:
        conn.close()
    return counts


# ---- COPY plumbing ---------------------------------------------------------------------
class _LineReader:
    """A read()-able view of an iterator of COPY text lines: copy_expert pulls from it."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self.count = 0

    def read(self, size: int = -1) -> str:
        size = size if size and size > 0 else COPY_CHUNK_CHARS
        parts: list[str] = []
        n = 0
        for line in self._lines:
            parts.append(line)
            n += len(line)
            if n >= size:
                break
        self.count += len(parts)
        return "".join(parts)


def _copy(cur, table: str, columns: Sequence[str], rows: Iterable[str]) -> int:
    """COPY ``rows`` (tab-separated text lines) into ``table``; the number of rows loaded."""
    reader = _LineReader(rows)
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    )
    cur.copy_expert(statement.as_string(cur), reader, size=COPY_CHUNK_CHARS)
    return reader.count


def _line(*values: str) -> str:
    return "\t".join(values) + "\n"


def _esc(text: str) -> str:
    """A free-text value escaped for COPY's text format."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _json(obj: object) -> str:
    return _esc(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def _opt(value: str | None) -> str:
    return _NULL if value is None else value


def _ts(moment: datetime) -> str:
    return moment.isoformat(sep=" ", timespec="milliseconds")


def _money(value: float) -> str:
    return f"{value:.18f}"


# ---- random helpers --------------------------------------------------------------------
def _uuid(rng: random.Random) -> str:
    h = f"{(rng.getrandbits(128) & _UUID_CLEAR) | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _address(rng: random.Random) -> str:
    return f"0x{rng.getrandbits(160):040x}"


def _hash(rng: random.Random) -> str:
    return f"0x{rng.getrandbits(256):064x}"


# ---- the generator ---------------------------------------------------------------------
@dataclass(slots=True)
class _Token:
    id: str
    chain: int
    symbol: str
    decimals: int
    price: float
    protocol: str | None


@dataclass(slots=True)
class _Wallet:
    id: str
    address: str
    chain: int
    created: datetime
    balances: list[tuple[_Token, float]] = field(default_factory=list)


@dataclass(slots=True)
class _Protocol:
    id: str
    slug: str
    chain: int
    ve: bool


@dataclass(slots=True)
class _Lock:
    id: str
    protocol: _Protocol
    wallet: _Wallet
    amount: float
    power: float
    ends_at: datetime | None


@dataclass(slots=True)
class _Opportunity:
    id: str
    protocol: _Protocol
    wallet: _Wallet
    token: _Token
    lock: _Lock | None
    usd: float
    gas: float
    deadline: datetime | None


@dataclass(slots=True)
class _Pool:
    id: str
    protocol: _Protocol
    base: _Token
    quote: _Token


@dataclass(slots=True)
class _Position:
    id: str
    pool: _Pool
    wallet: _Wallet
    notional: float
    debt: float
    health: float


Rows = Iterator[str]


class _Generator:
    """Builds the tables in load order; the small ones are kept for their children."""

    def __init__(self, *, scale: float, now: datetime, rng_seed: int) -> None:
        self.scale = scale
        self.now = now
        self.rng_seed = rng_seed
        self.n_tokens = max(12, round(50 * scale))
        self.n_wallets = max(10, round(200 * scale))
        self.chains: list[int] = list(_CHAIN_IDS)
        self.by_chain: dict[int, list[_Token]] = {}
        self.protocols: list[_Protocol] = []
        self.tokens: list[_Token] = []
        self.wallets: list[_Wallet] = []
        self.locks: list[_Lock] = []
        self.epochs: dict[str, list[tuple[str, datetime]]] = {}
        self.gauges: list[tuple[str, _Protocol]] = []
        self.opportunities: list[_Opportunity] = []
        self.pools: list[_Pool] = []
        self.positions: list[_Position] = []
        self.risk_events: list[tuple[str, _Wallet | None, datetime]] = []
        self.alerts: list[tuple[str, str, datetime]] = []
        self.portfolio_snapshots: list[tuple[str, _Wallet, datetime]] = []

    def rng(self, table: str) -> random.Random:
        return random.Random(f"{self.rng_seed}:{table}")

    def ago(self, rng: random.Random, lo_days: float, hi_days: float) -> datetime:
        """A moment between ``lo_days`` and ``hi_days`` before now, to the millisecond."""
        ms = rng.randrange(int(lo_days * _DAY * 1000), int(hi_days * _DAY * 1000) + 1)
        return self.now - timedelta(milliseconds=ms)

    def later(self, rng: random.Random, moment: datetime, hi_days: float) -> datetime:
        """A moment after ``moment`` (at most ``hi_days`` later) that is not in the future."""
        out = moment + timedelta(milliseconds=rng.randrange(1, int(hi_days * _DAY * 1000) + 2))
        return min(out, self.now)

    def metric_time(self, rng: random.Random) -> datetime:
        """When a metric was computed: mostly in the last days, some over a year ago."""
        if rng.random() < 0.15:
            return self.ago(rng, 370, 760)
        return self.ago(rng, 0, 3)

    def block(self, chain: int, moment: datetime) -> int:
        seconds_per_block, genesis = _BLOCK_CLOCK[chain]
        epoch = (moment - datetime(1970, 1, 1)).total_seconds()
        return max(1, int((epoch - genesis) / seconds_per_block))

    def tables(self) -> Iterator[tuple[str, tuple[str, ...], Rows]]:
        """``(table, columns, rows)`` in load order; rows is a lazy iterator of lines."""
        for table in TABLES:
            columns, rows = getattr(self, f"t_{table}")()
            yield table, columns, rows

    # -- reference data ------------------------------------------------------------------
    def t_Chain(self) -> tuple[tuple[str, ...], Rows]:
        cols = ("id", "name", "shortName", "nativeCurrencySymbol", "explorerUrl", "metadata")
        cols += ("createdAt", "updatedAt")
        created = _ts(self.now - timedelta(days=1100))
        rows = [
            _line(
                str(cid),
                name,
                short,
                native,
                url,
                _json({"blockTimeSeconds": spb, "rpc": f"https://rpc.example/{short}"}),
                created,
                created,
            )
            for cid, name, short, native, url, spb, _ in _CHAINS
        ]
        return cols, iter(rows)

    def t_Protocol(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Protocol")
        cols = ("id", "slug", "name", "chainId", "website", "metadata", "createdAt", "updatedAt")
        rows = []
        for slug, name, chain, site, ve in _PROTOCOLS:
            p = _Protocol(_uuid(rng), slug, chain, ve)
            self.protocols.append(p)
            created = self.ago(rng, 900, 1100)
            meta = {"category": "ve-dex" if ve else "defi", "voteEscrow": ve}
            meta["tvlRank"] = rng.randint(1, 200)
            rows.append(
                _line(p.id, slug, name, str(chain), site, _json(meta), _ts(created), _ts(created))
            )
        return cols, iter(rows)

    def t_Token(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Token")
        cols = ("id", "chainId", "address", "symbol", "name", "decimals", "isNative")
        cols += ("metadata", "createdAt", "updatedAt")
        rows = []
        seen: set[tuple[int, str]] = set()
        for i in range(self.n_tokens):
            if i < len(_KNOWN_TOKENS):
                chain, symbol, name, decimals, native, price, proto = _KNOWN_TOKENS[i]
            else:
                chain = rng.choice(self.chains)
                symbol = f"TKN{i:04d}"
                name = f"Sample Token {i}"
                decimals = rng.choice((18, 18, 18, 6, 8))
                native = False
                price = round(10 ** rng.uniform(-4, 3), 8)
                proto = None
            address = _NATIVE_ADDRESS if native else _address(rng)
            while (chain, address) in seen:
                address = _address(rng)
            seen.add((chain, address))
            tok = _Token(_uuid(rng), chain, symbol, decimals, price, proto)
            self.tokens.append(tok)
            created = self.ago(rng, 800, 1000)
            meta = {"coingeckoId": symbol.lower(), "logo": f"https://assets.example/{symbol}.png"}
            rows.append(
                _line(
                    tok.id,
                    str(chain),
                    address,
                    symbol,
                    name,
                    str(decimals),
                    "t" if native else "f",
                    _json(meta),
                    _ts(created),
                    _ts(self.later(rng, created, 300)),
                )
            )
        self.by_chain = {c: [t for t in self.tokens if t.chain == c] for c in self.chains}
        return cols, iter(rows)

    def t_Wallet(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Wallet")
        cols = ("id", "address", "chainId", "label", "metadata", "createdAt", "updatedAt")
        rows = []
        seen: set[str] = set()
        for i in range(self.n_wallets):
            address = SAMPLE_WALLET_ADDRESS if i == 0 else _address(rng)
            while i and address in seen:
                address = _address(rng)
            seen.add(address)
            chain = 8453 if i == 0 else rng.choice(self.chains)
            created = self.ago(rng, 30, 900)
            w = _Wallet(_uuid(rng), address, chain, created)
            self.wallets.append(w)
            label = rng.choice(_LABELS)
            meta = {"owner": f"user{rng.randrange(10_000):04d}", "watchOnly": rng.random() < 0.3}
            rows.append(
                _line(
                    w.id,
                    address,
                    str(chain),
                    _esc(label) if label else _NULL,
                    _json(meta),
                    _ts(created),
                    _ts(self.later(rng, created, 60)),
                )
            )
        return cols, iter(rows)

    def wallet_tokens(self, rng: random.Random, wallet: _Wallet, k: int) -> list[_Token]:
        """``k`` distinct tokens, from the wallet's own chain when it has enough."""
        pool = self.by_chain.get(wallet.chain) or self.tokens
        if len(pool) < k:
            pool = self.tokens
        return rng.sample(pool, min(k, len(pool)))

    def t_TokenBalance(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("TokenBalance")
        cols = ("id", "walletId", "tokenId", "rawBalance", "quantity", "usdValue")
        cols += ("blockNumber", "fetchedAt", "createdAt", "updatedAt")

        def rows() -> Rows:
            for w in self.wallets:
                for tok in self.wallet_tokens(rng, w, rng.randint(2, 8)):
                    raw = int(10 ** rng.uniform(-3, 5) * 10**tok.decimals) + rng.randrange(1000)
                    whole, frac = divmod(raw, 10**tok.decimals)
                    qty = f"{whole}.{frac:0{tok.decimals}d}" if tok.decimals else str(whole)
                    amount = raw / 10**tok.decimals
                    usd = amount * tok.price
                    w.balances.append((tok, usd))
                    fetched = self.ago(rng, 0, 0.5)
                    created = min(w.created + timedelta(hours=1), fetched)
                    yield _line(
                        _uuid(rng),
                        w.id,
                        tok.id,
                        str(raw),
                        qty,
                        _NULL if rng.random() < 0.08 else _money(usd),
                        str(self.block(tok.chain, fetched)),
                        _ts(fetched),
                        _ts(created),
                        _ts(fetched),
                    )

        return cols, rows()

    def t_PriceSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("PriceSnapshot")
        cols = ("id", "tokenId", "priceUsd", "source", "recordedAt", "createdAt")
        step = timedelta(minutes=PRICE_INTERVAL_MINUTES)
        slots = PRICE_DENSE_DAYS * 24 * 60 // PRICE_INTERVAL_MINUTES
        # Minute prefixes of the tail days and of the dense slots, oldest first (rows
        # arrive in (tokenId, recordedAt) order, as a collector writes them, which keeps
        # that index dense); the seconds come from a table, so the hot loop formats no
        # datetime. Every slot starts at least one interval before now: none is future.
        tail = [
            (self.now - timedelta(days=d, hours=12)).strftime("%Y-%m-%d %H:%M:")
            for d in range(PRICE_TAIL_DAYS, PRICE_DENSE_DAYS - 1, -PRICE_TAIL_EVERY_DAYS)
        ]
        dense = [(self.now - step * k).strftime("%Y-%m-%d %H:%M:") for k in range(slots, 0, -1)]
        seconds = [f"{s:02d}.{ms:03d}" for s in range(60) for ms in range(1000)]

        def rows() -> Rows:
            bits = rng.getrandbits
            prefixes = tail + dense
            # Tokens in id order too: every row lands on the right edge of that index.
            for tok in sorted(self.tokens, key=lambda t: t.id):
                tid = tok.id
                src = _PRICE_SOURCES[bits(2)]
                stable = abs(tok.price - 1.0) < 1e-9
                vol = 0.0004 if stable else 0.012
                price = tok.price
                for prefix in prefixes:
                    r = bits(32)
                    if stable:
                        price = 1.0 + ((r >> 16) / 65536.0 - 0.5) * vol
                    else:
                        price *= 1.0 + ((r >> 16) / 65536.0 - 0.5) * vol
                    h = f"{(bits(128) & _UUID_CLEAR) | _UUID_SET:032x}"
                    at = prefix + seconds[(r & 0xFFFF) % 60000]
                    yield (
                        f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}\t{tid}\t"
                        f"{price:.8f}\t{src}\t{at}\t{at}\n"
                    )

        return cols, rows()

    # -- governance ----------------------------------------------------------------------
    def t_GovernanceLock(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("GovernanceLock")
        cols = ("id", "protocolId", "walletId", "lockAmount", "votingPower", "boostMultiplier")
        cols += ("lockEndsAt", "lastRefreshedAt", "metadata", "createdAt", "updatedAt")
        ve = [p for p in self.protocols if p.ve]
        rows = []
        for i, w in enumerate(self.wallets):
            k = 2 if i == 0 else rng.choice((0, 0, 1, 1, 1, 2, 2, 3))
            for p in rng.sample(ve, k):
                r = rng.random()
                if r < 0.15:
                    ends = self.ago(rng, 370, 900)  # expired over a year ago
                elif r < 0.30:
                    ends = self.ago(rng, 1, 360)
                elif r < 0.35:
                    ends = None
                else:
                    ends = self.now + timedelta(days=rng.uniform(7, 1460))
                amount = 10 ** rng.uniform(1, 6)
                remaining = 0.0 if ends is None or ends < self.now else (ends - self.now).days
                power = amount * min(remaining, 1460) / 1460
                lock = _Lock(_uuid(rng), p, w, amount, power, ends)
                self.locks.append(lock)
                created = self.ago(rng, 400, 1000)
                refreshed = self.ago(rng, 0, 2)
                rows.append(
                    _line(
                        lock.id,
                        p.id,
                        w.id,
                        _money(amount),
                        _money(power),
                        _NULL if rng.random() < 0.3 else _money(rng.uniform(1.0, 2.5)),
                        _opt(ends and _ts(ends)),
                        _ts(refreshed),
                        _json({"tokenIdNft": rng.randrange(1, 90_000), "autoMax": r > 0.8}),
                        _ts(created),
                        _ts(refreshed),
                    )
                )
        return cols, iter(rows)

    def t_VoteEpoch(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("VoteEpoch")
        cols = ("id", "protocolId", "epochNumber", "startsAt", "endsAt", "snapshotAt")
        cols += ("metadata", "createdAt", "updatedAt")
        # Epochs flip on Thursday 00:00 UTC (as Aerodrome and Velodrome do).
        midnight = self.now.replace(hour=0, minute=0, second=0, microsecond=0)
        current = midnight - timedelta(days=(midnight.weekday() - 3) % 7)
        rows = []
        for p in self.protocols:
            if not p.ve:
                continue
            epochs = []
            for back in range(104, -1, -1):
                starts = current - timedelta(weeks=back)
                ends = starts + timedelta(weeks=1)
                eid = _uuid(rng)
                epochs.append((eid, starts))
                number = 200 - back if rng.random() > 0.05 else None
                snap = starts + timedelta(days=6, hours=23) if ends <= self.now else None
                rows.append(
                    _line(
                        eid,
                        p.id,
                        _opt(None if number is None else str(number)),
                        _ts(starts),
                        _ts(ends),
                        _opt(snap and _ts(snap)),
                        _json({"totalVotes": round(rng.uniform(1e6, 5e8), 2)}),
                        _ts(starts - timedelta(days=1)),
                        _ts(snap or self.now),
                    )
                )
            self.epochs[p.id] = epochs
        return cols, iter(rows)

    def t_Gauge(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Gauge")
        cols = ("id", "protocolId", "chainId", "address", "name", "metadata")
        cols += ("createdAt", "updatedAt")
        rows = []
        per = max(2, round(6 * self.scale))
        for p in self.protocols:
            if not p.ve:
                continue
            for _ in range(per):
                gid = _uuid(rng)
                self.gauges.append((gid, p))
                a, b = rng.sample(self.tokens, 2)
                created = self.ago(rng, 200, 700)
                rows.append(
                    _line(
                        gid,
                        p.id,
                        str(p.chain),
                        _address(rng),
                        f"{a.symbol}/{b.symbol} {rng.choice(('vAMM', 'sAMM', 'CL100'))}",
                        _json({"poolType": rng.choice(("volatile", "stable", "concentrated"))}),
                        _ts(created),
                        _ts(self.later(rng, created, 100)),
                    )
                )
        return cols, iter(rows)

    def t_Bribe(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Bribe")
        cols = ("id", "gaugeId", "epochId", "rewardTokenId", "rewardAmount", "rewardValueUsd")
        cols += ("totalVotes", "roiPercentage", "sponsorAddress", "source", "metadata")
        cols += ("createdAt", "updatedAt")

        def rows() -> Rows:
            for gid, p in self.gauges:
                for eid, starts in self.epochs[p.id][-8:]:
                    for tok in rng.sample(self.tokens, rng.randint(1, 2)):
                        amount = 10 ** rng.uniform(1, 5)
                        usd = amount * tok.price
                        votes = 10 ** rng.uniform(4, 7)
                        created = min(starts + timedelta(hours=rng.uniform(1, 100)), self.now)
                        yield _line(
                            _uuid(rng),
                            gid,
                            eid,
                            tok.id,
                            _money(amount),
                            _money(usd),
                            _money(votes),
                            _money(usd / votes * 100),
                            _address(rng) if rng.random() < 0.8 else _NULL,
                            f"{p.slug}-api",
                            _json({"claimable": starts + timedelta(weeks=1) <= self.now}),
                            _ts(created),
                            _ts(created),
                        )

        return cols, rows()

    def t_VotePowerSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("VotePowerSnapshot")
        cols = ("id", "governanceLockId", "epochId", "votingPower", "capturedAt", "metadata")
        cols += ("createdAt",)

        def rows() -> Rows:
            for lock in self.locks:
                for eid, starts in self.epochs[lock.protocol.id][-4:-1]:
                    with_epoch = rng.random() < 0.85
                    at = min(starts + timedelta(days=6, hours=rng.uniform(0, 23)), self.now)
                    yield _line(
                        _uuid(rng),
                        lock.id,
                        eid if with_epoch else _NULL,
                        _money(lock.power * rng.uniform(0.98, 1.05)),
                        _ts(at),
                        _json({"source": "onchain" if with_epoch else "manual"}),
                        _ts(at),
                    )

        return cols, rows()

    # -- rewards -------------------------------------------------------------------------
    def t_RewardOpportunity(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("RewardOpportunity")
        cols = ("id", "protocolId", "walletId", "governanceLockId", "tokenId", "contextLabel")
        cols += ("contextAddress", "amount", "usdValue", "apr", "gasEstimateUsd")
        cols += ("claimDeadline", "source", "metadata", "computedAt", "createdAt", "updatedAt")
        locks = {(lk.protocol.id, lk.wallet.id): lk for lk in self.locks}
        token_of = {t.protocol: t for t in self.tokens if t.protocol}
        rows = []
        for i, w in enumerate(self.wallets):
            seen: set[tuple[str, str, str]] = set()
            for _ in range(2 if i == 0 else rng.randint(0, 4)):
                p = rng.choice(self.protocols)
                tok = token_of.get(p.slug) if rng.random() < 0.7 else None
                tok = tok or rng.choice(self.tokens)
                source = rng.choice((f"{p.slug}-api", "onchain"))
                if (p.id, tok.id, source) in seen:
                    continue
                seen.add((p.id, tok.id, source))
                lock = locks.get((p.id, w.id))
                amount = 10 ** rng.uniform(-1, 4)
                usd = amount * tok.price
                gas = rng.uniform(0.05, 12)
                r = rng.random()
                deadline = (
                    None
                    if r < 0.4
                    else self.ago(rng, 1, 60)
                    if r < 0.55
                    else self.now + timedelta(days=rng.uniform(1, 60))
                )
                opp = _Opportunity(_uuid(rng), p, w, tok, lock, usd, gas, deadline)
                self.opportunities.append(opp)
                computed = self.ago(rng, 0, 1)
                created = self.ago(rng, 1, 300)
                rows.append(
                    _line(
                        opp.id,
                        p.id,
                        w.id,
                        lock.id if lock else _NULL,
                        tok.id,
                        _esc(f"{p.slug} {tok.symbol} rewards"),
                        _address(rng) if rng.random() < 0.7 else _NULL,
                        _money(amount),
                        _money(usd),
                        _money(rng.uniform(0.5, 80)) if rng.random() < 0.8 else _NULL,
                        _money(gas),
                        _opt(deadline and _ts(deadline)),
                        source,
                        _json({"actionable": usd > gas * 3}),
                        _ts(computed),
                        _ts(created),
                        _ts(computed),
                    )
                )
        return cols, iter(rows)

    def t_RewardClaim(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("RewardClaim")
        cols = ("id", "rewardOpportunityId", "protocolId", "walletId", "tokenId")
        cols += ("governanceLockId", "amount", "usdValue", "gasSpentUsd", "transactionHash")
        cols += ("claimedAt", "metadata")

        def rows() -> Rows:
            for opp in self.opportunities:
                for _ in range(rng.randint(0, 3)):
                    amount = 10 ** rng.uniform(-1, 3)
                    yield _line(
                        _uuid(rng),
                        opp.id,
                        opp.protocol.id,
                        opp.wallet.id,
                        opp.token.id,
                        opp.lock.id if opp.lock else _NULL,
                        _money(amount),
                        _money(amount * opp.token.price),
                        _money(rng.uniform(0.05, 15)),
                        _hash(rng) if rng.random() < 0.95 else _NULL,
                        _ts(self.ago(rng, 1, 365)),
                        _json({"method": rng.choice(("claim", "claimAll", "compound"))}),
                    )

        return cols, rows()

    # -- gammaswap -----------------------------------------------------------------------
    def t_GammaswapPool(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("GammaswapPool")
        cols = ("id", "protocolId", "poolAddress", "baseTokenId", "quoteTokenId", "baseSymbol")
        cols += ("quoteSymbol", "tvl", "tvlUsd", "utilization", "borrowRateApr")
        cols += ("supplyRateApr", "volume24h", "feesEarned24h", "metadata", "lastSyncAt")
        cols += ("updatedAt", "createdAt")
        gs = next(p for p in self.protocols if p.slug == "gammaswap")
        candidates = self.by_chain.get(gs.chain) or []
        if len(candidates) < 2:
            candidates = self.tokens
        rows = []
        for _ in range(max(3, round(12 * self.scale))):
            base, quote = rng.sample(candidates, 2)
            pool = _Pool(_uuid(rng), gs, base, quote)
            self.pools.append(pool)
            tvl = 10 ** rng.uniform(4, 8)
            volume = tvl * rng.uniform(0.01, 0.8)
            synced = self.ago(rng, 0, 0.2)
            created = self.ago(rng, 100, 500)
            rows.append(
                _line(
                    pool.id,
                    gs.id,
                    _address(rng),
                    base.id,
                    quote.id,
                    base.symbol,
                    quote.symbol,
                    _money(tvl),
                    _money(tvl),
                    _money(rng.uniform(0.05, 0.95)),
                    _money(rng.uniform(1, 40)),
                    _money(rng.uniform(0.5, 25)),
                    _money(volume),
                    _money(volume * 0.003),
                    _json({"feeTier": rng.choice((500, 3000, 10000))}),
                    _ts(synced),
                    _ts(synced),
                    _ts(created),
                )
            )
        return cols, iter(rows)

    def t_GammaswapPosition(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("GammaswapPosition")
        cols = ("id", "protocolId", "poolId", "walletId", "assetTokenId", "positionType")
        cols += ("notional", "debtValue", "healthRatio", "liquidationPrice", "pnlUsd")
        cols += ("lastSyncAt", "metadata")
        rows = []
        seen: set[tuple[str, str, str]] = set()
        # The first wallet (and every other tracked one) has a position; then random ones.
        tracked = self.wallets[: self.n_tracked()]
        owners = tracked[::2] + [rng.choice(self.wallets) for _ in range(self.n_wallets // 2)]
        for w in owners:
            pool = rng.choice(self.pools)
            kind = rng.choice(_GS_POSITION_TYPES)
            if (pool.id, w.id, kind) in seen:
                continue
            seen.add((pool.id, w.id, kind))
            asset = rng.choice((pool.base, pool.quote))
            notional = 10 ** rng.uniform(2, 6)
            health = rng.uniform(1.02, 3.5)
            debt = notional / health if kind != "lp" else 0.0
            pos = _Position(_uuid(rng), pool, w, notional, debt, health)
            self.positions.append(pos)
            rows.append(
                _line(
                    pos.id,
                    pool.protocol.id,
                    pool.id,
                    w.id,
                    asset.id,
                    kind,
                    _money(notional),
                    _money(debt) if kind != "lp" else _NULL,
                    _money(health) if kind != "lp" else _NULL,
                    _money(asset.price / health) if kind == "long" else _NULL,
                    _money(rng.uniform(-0.2, 0.3) * notional),
                    _ts(self.ago(rng, 0, 0.5)),
                    _json({"leverage": round(rng.uniform(1, 5), 2)}),
                )
            )
        return cols, iter(rows)

    # -- alerts --------------------------------------------------------------------------
    def t_RiskEvent(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("RiskEvent")
        cols = ("id", "walletId", "eventType", "severity", "threshold", "actualValue")
        cols += ("description", "recommendation", "isActive", "resolvedAt", "metadata")
        cols += ("createdAt", "updatedAt")
        rows = []
        for i in range(max(10, round(300 * self.scale))):
            if i == 0:
                w: _Wallet | None = self.wallets[0]
            else:
                w = rng.choice(self.wallets) if rng.random() < 0.95 else None
            kind = rng.choice(_RISK_EVENT_TYPES)
            created = self.ago(rng, 370, 800) if rng.random() < 0.2 else self.ago(rng, 0, 360)
            resolved = self.later(rng, created, 10) if rng.random() < 0.5 else None
            threshold = rng.uniform(0.1, 0.9)
            eid = _uuid(rng)
            self.risk_events.append((eid, w, created))
            rows.append(
                _line(
                    eid,
                    w.id if w else _NULL,
                    kind,
                    rng.choice(_RISK_LEVELS),
                    _money(threshold),
                    _money(threshold * rng.uniform(1.01, 2.0)),
                    f"{kind.replace('_', ' ')} above threshold",
                    "reduce exposure" if rng.random() < 0.7 else _NULL,
                    "f" if resolved else "t",
                    _opt(resolved and _ts(resolved)),
                    _json({"detector": "risk-engine", "window": rng.choice(_VOL_TIMEFRAMES)}),
                    _ts(created),
                    _ts(resolved or created),
                )
            )
        return cols, iter(rows)

    def t_Alert(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Alert")
        cols = ("id", "type", "severity", "title", "description", "status", "triggerAt")
        cols += ("expiresAt", "metadata", "contextHash", "walletId", "protocolId", "tokenId")
        cols += ("rewardOpportunityId", "gammaswapPositionId", "riskEventId")
        cols += ("createdAt", "updatedAt")
        kinds = ("reward_claimable", "governance_unlock", "price_threshold")
        kinds += ("gammaswap_health", "risk_event", "balance_change")
        rows = []
        for i in range(max(30, round(800 * self.scale))):
            kind = kinds[i % len(kinds)]
            w = rng.choice(self.wallets) if rng.random() < 0.9 else None
            protocol = token = opp = pos = risk = None
            if kind == "reward_claimable" and self.opportunities:
                o = rng.choice(self.opportunities)
                w, protocol, token, opp = o.wallet, o.protocol.id, o.token.id, o.id
            elif kind == "governance_unlock" and self.locks:
                lk = rng.choice(self.locks)
                w, protocol = lk.wallet, lk.protocol.id
            elif kind == "gammaswap_health" and self.positions:
                ps = rng.choice(self.positions)
                w, protocol, pos = ps.wallet, ps.pool.protocol.id, ps.id
            elif kind == "risk_event":
                risk, w, _ = rng.choice(self.risk_events)
            else:
                token = rng.choice(self.tokens).id
            r = rng.random()
            trigger = (
                self.ago(rng, 0, 1)
                if r < 0.45
                else self.ago(rng, 1, 30)
                if r < 0.7
                else self.ago(rng, 30, 400)
            )
            status = ALERT_STATUSES[(i // len(kinds)) % len(ALERT_STATUSES)]
            severity = rng.choice(ALERT_SEVERITIES)
            aid = _uuid(rng)
            self.alerts.append((aid, status, trigger))
            rows.append(
                _line(
                    aid,
                    kind,
                    severity,
                    f"{kind.replace('_', ' ').capitalize()} ({severity})",
                    "Generated by the WeDefiDaily alert engine" if r < 0.8 else _NULL,
                    status,
                    _ts(trigger),
                    _ts(trigger + timedelta(days=rng.uniform(1, 7))) if r < 0.7 else _NULL,
                    _json({"rule": kind, "version": 2}),
                    _hash(rng)[2:],
                    w.id if w else _NULL,
                    _opt(protocol),
                    _opt(token),
                    _opt(opp),
                    _opt(pos),
                    _opt(risk),
                    _ts(trigger),
                    _ts(self.later(rng, trigger, 2) if status != "pending" else trigger),
                )
            )
        return cols, iter(rows)

    def t_AlertDelivery(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("AlertDelivery")
        cols = ("id", "alertId", "channel", "success", "metadata", "createdAt")

        def rows() -> Rows:
            for aid, status, trigger in self.alerts:
                n = rng.randint(0, 1) if status == "pending" else rng.randint(1, 3)
                for channel in rng.sample(_ALERT_CHANNELS, n):
                    ok = status != "pending" and rng.random() < 0.92
                    yield _line(
                        _uuid(rng),
                        aid,
                        channel,
                        "t" if ok else "f",
                        _json({"attempt": 1, "httpStatus": 200 if ok else 503}),
                        _ts(self.later(rng, trigger, 0.01)),
                    )

        return cols, rows()

    def t_PriceThreshold(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("PriceThreshold")
        cols = ("id", "walletId", "tokenId", "thresholdType", "thresholdPrice", "isEnabled")
        cols += ("lastTriggeredAt", "metadata", "createdAt", "updatedAt")
        rows = []
        owners = [rng.choice(self.wallets) for _ in range(round(self.n_wallets * 1.2))]
        seen: set[tuple[str | None, str, str, str]] = set()
        for w in [None] * 10 + owners:
            tok = rng.choice(self.tokens)
            kind = rng.choice(("above", "below"))
            level = tok.price * (
                rng.uniform(1.05, 1.5) if kind == "above" else rng.uniform(0.5, 0.95)
            )
            key = (w.id if w else None, tok.id, kind, f"{level:.8f}")
            if key in seen:
                continue
            seen.add(key)
            created = self.ago(rng, 1, 500)
            triggered = self.later(rng, created, 100) if rng.random() < 0.3 else None
            rows.append(
                _line(
                    _uuid(rng),
                    w.id if w else _NULL,
                    tok.id,
                    kind,
                    f"{level:.8f}",
                    "t" if rng.random() < 0.8 else "f",
                    _opt(triggered and _ts(triggered)),
                    _json({"notify": rng.sample(_ALERT_CHANNELS, 2)}),
                    _ts(created),
                    _ts(triggered or created),
                )
            )
        return cols, iter(rows)

    # -- portfolio -----------------------------------------------------------------------
    def t_Transaction(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("Transaction")
        cols = ("id", "walletId", "tokenId", "transactionHash", "blockNumber")
        cols += ("transactionType", "amount", "priceUsd", "gasSpentUsd", "protocolId")
        cols += ("fromAddress", "toAddress", "metadata", "occurredAt", "createdAt", "updatedAt")
        on_chain = {c: [p for p in self.protocols if p.chain == c] for c in self.chains}

        def rows() -> Rows:
            for w in self.wallets:
                tokens = self.wallet_tokens(rng, w, 4)
                protocols = on_chain[w.chain]
                for _ in range(rng.randint(3, 10)):
                    tok = rng.choice(tokens)
                    r = rng.random()
                    if r < 0.05:
                        at = self.ago(rng, 7 * 365 + 10, 8.5 * 365)  # past the 7-year line
                    elif r < 0.2:
                        at = self.ago(rng, 730, 7 * 365)
                    else:
                        at = self.ago(rng, 0, 730)
                    kind = rng.choice(_TX_TYPES)
                    counterparty = _address(rng)
                    incoming = kind in ("buy", "claim", "unstake")
                    yield _line(
                        _uuid(rng),
                        w.id,
                        tok.id,
                        _hash(rng),
                        str(self.block(tok.chain, at)),
                        kind,
                        _money(10 ** rng.uniform(-2, 4)),
                        _money(tok.price * rng.uniform(0.3, 1.6)) if r < 0.9 else _NULL,
                        _money(rng.uniform(0.01, 30)),
                        rng.choice(protocols).id if protocols and r > 0.5 else _NULL,
                        counterparty if incoming else w.address,
                        w.address if incoming else counterparty,
                        _json({"nonce": rng.randrange(5000), "status": "success"}),
                        _ts(at),
                        _ts(self.later(rng, at, 0.01)),
                        _ts(self.later(rng, at, 0.02)),
                    )

        return cols, rows()

    def t_PortfolioSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("PortfolioSnapshot")
        cols = ("id", "walletId", "totalUsdValue", "totalUsdValueChange24h")
        cols += ("totalUsdValueChange7d", "totalUsdValueChange30d", "tokensTracked")
        cols += ("averageApr", "metadata", "capturedAt", "createdAt")

        def rows() -> Rows:
            total = sum(usd for w in self.wallets for _, usd in w.balances)
            for day in range(90):  # all wallets combined, daily
                at = self.now - timedelta(days=day, hours=6)
                value = total * rng.uniform(0.8, 1.2)
                yield self._portfolio_line(rng, None, value, len(self.tokens), at)
            for w in self.wallets:  # per wallet, weekly over 4 weeks
                value = sum(usd for _, usd in w.balances)
                for week in range(4):
                    at = self.now - timedelta(weeks=week, hours=rng.uniform(1, 12))
                    sid = _uuid(rng)
                    self.portfolio_snapshots.append((sid, w, at))
                    yield self._portfolio_line(
                        rng, w, value * rng.uniform(0.8, 1.2), len(w.balances), at, sid
                    )

        return cols, rows()

    def _portfolio_line(
        self,
        rng: random.Random,
        wallet: _Wallet | None,
        value: float,
        tracked: int,
        at: datetime,
        sid: str | None = None,
    ) -> str:
        top = sorted(wallet.balances, key=lambda b: -b[1])[:3] if wallet else []
        return _line(
            sid or _uuid(rng),
            wallet.id if wallet else _NULL,
            _money(value),
            _money(value * rng.uniform(-0.05, 0.05)),
            _money(value * rng.uniform(-0.15, 0.15)),
            _money(value * rng.uniform(-0.3, 0.3)) if rng.random() < 0.9 else _NULL,
            str(tracked),
            _money(rng.uniform(0, 40)) if rng.random() < 0.8 else _NULL,
            _json({"allocation": {t.symbol: round(u, 2) for t, u in top}}),
            _ts(at),
            _ts(at),
        )

    def t_PositionSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("PositionSnapshot")
        cols = ("id", "portfolioSnapshotId", "tokenId", "walletId", "quantity", "usdValue")
        cols += ("priceUsd", "costBasisUsd", "unrealizedPnlUsd", "unrealizedPnlPercent")
        cols += ("positionType", "protocolId", "metadata")

        def rows() -> Rows:
            for sid, w, _ in self.portfolio_snapshots:
                for tok, usd in w.balances[:2]:
                    price = tok.price * rng.uniform(0.9, 1.1)
                    cost = tok.price * rng.uniform(0.5, 1.5)
                    qty = usd / tok.price
                    pnl = (price - cost) * qty
                    kind = rng.choice(_POSITION_TYPES)
                    yield _line(
                        _uuid(rng),
                        sid,
                        tok.id,
                        w.id,
                        _money(qty),
                        _money(qty * price),
                        _money(price),
                        _money(cost) if rng.random() < 0.85 else _NULL,
                        _money(pnl),
                        _money((price - cost) / cost * 100),
                        kind,
                        rng.choice(self.protocols).id if kind != "liquid" else _NULL,
                        _json({"source": "digest"}),
                    )

        return cols, rows()

    # -- analytics -----------------------------------------------------------------------
    def t_PerformanceMetric(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("PerformanceMetric")
        cols = ("id", "walletId", "timeframe", "totalReturn", "totalReturnPercent")
        cols += ("realizedPnl", "unrealizedPnl", "sharpeRatio", "maxDrawdown", "volatility")
        cols += ("winRate", "tradesCount", "computedAt", "metadata")

        def rows() -> Rows:
            for w in [None, *self.wallets]:
                at = self.metric_time(rng)
                for tf in _PERF_TIMEFRAMES:
                    ret = rng.uniform(-5000, 20000)
                    yield _line(
                        _uuid(rng),
                        w.id if w else _NULL,
                        tf,
                        _money(ret),
                        _money(rng.uniform(-40, 120)),
                        _money(ret * rng.uniform(0, 0.6)),
                        _money(ret * rng.uniform(0, 0.6)),
                        _money(rng.uniform(-1, 3)) if rng.random() < 0.9 else _NULL,
                        _money(rng.uniform(0, 0.6)),
                        _money(rng.uniform(0.1, 1.5)),
                        _money(rng.uniform(0.2, 0.8)),
                        str(rng.randrange(0, 400)),
                        _ts(at),
                        _json({"benchmark": "ETH"}),
                    )

        return cols, rows()

    def t_AssetCorrelation(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("AssetCorrelation")
        cols = ("id", "token1Id", "token2Id", "timeframe", "correlation", "pValue")
        cols += ("sampleSize", "computedAt", "metadata")

        def rows() -> Rows:
            n = len(self.tokens)
            for i, a in enumerate(self.tokens):
                for j in range(i + 1, min(n, i + 5)):
                    b = self.tokens[j]
                    for tf in _VOL_TIMEFRAMES[:3]:
                        yield _line(
                            _uuid(rng),
                            a.id,
                            b.id,
                            tf,
                            f"{rng.uniform(-1, 1):.8f}",
                            f"{rng.uniform(0, 0.2):.8f}" if rng.random() < 0.9 else _NULL,
                            str({"7d": 168, "30d": 720, "90d": 2160}[tf]),
                            _ts(self.metric_time(rng)),
                            _json({"method": "pearson"}),
                        )

        return cols, rows()

    def t_ProtocolExposure(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("ProtocolExposure")
        cols = ("id", "walletId", "protocolId", "totalExposureUsd", "exposurePercentage")
        cols += ("concentrationRisk", "liquidityRisk", "smartContractRisk")
        cols += ("overallRiskScore", "recommendedAllocation", "computedAt", "metadata")

        def rows() -> Rows:
            for w in [None, *self.wallets]:
                chosen = self.protocols if w is None else rng.sample(self.protocols, 2)
                for p in chosen:
                    yield _line(
                        _uuid(rng),
                        w.id if w else _NULL,
                        p.id,
                        _money(10 ** rng.uniform(2, 6)),
                        f"{rng.uniform(0, 100):.4f}",
                        rng.choice(_RISK_LEVELS),
                        rng.choice(_RISK_LEVELS),
                        rng.choice(_RISK_LEVELS),
                        f"{rng.uniform(0, 100):.2f}",
                        f"{rng.uniform(0, 60):.4f}" if rng.random() < 0.7 else _NULL,
                        _ts(self.metric_time(rng)),
                        _json({"positions": rng.randint(1, 6)}),
                    )

        return cols, rows()

    def t_VolatilityMetric(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("VolatilityMetric")
        cols = ("id", "tokenId", "walletId", "timeframe", "volatility", "rollingVolatility")
        cols += ("upsideDeviation", "downsideDeviation", "skewness", "kurtosis", "beta")
        cols += ("computedAt", "metadata")

        def line(tok: _Token, w: _Wallet | None, tf: str) -> str:
            return _line(
                _uuid(rng),
                tok.id,
                w.id if w else _NULL,
                tf,
                f"{rng.uniform(0.05, 2.5):.6f}",
                f"{rng.uniform(0.05, 2.5):.6f}",
                f"{rng.uniform(0.01, 1.5):.6f}",
                f"{rng.uniform(0.01, 1.5):.6f}",
                f"{rng.uniform(-2, 2):.6f}" if rng.random() < 0.9 else _NULL,
                f"{rng.uniform(1, 12):.6f}" if rng.random() < 0.9 else _NULL,
                f"{rng.uniform(-0.5, 2.5):.6f}",
                _ts(self.metric_time(rng)),
                _json({"samples": rng.randint(50, 9000)}),
            )

        def rows() -> Rows:
            for tok in self.tokens:
                for tf in _VOL_TIMEFRAMES:
                    yield line(tok, None, tf)
            for w in self.wallets:
                if w.balances:
                    for tf in _VOL_TIMEFRAMES[1:2]:
                        yield line(w.balances[0][0], w, tf)

        return cols, rows()

    def t_ValueAtRisk(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("ValueAtRisk")
        cols = ("id", "walletId", "timeframe", "confidenceLevel", "varAmount", "varPercentage")
        cols += ("expectedShortfall", "method", "computedAt", "metadata")

        def rows() -> Rows:
            for w in [None, *self.wallets]:
                at = self.metric_time(rng)
                for tf in _VAR_TIMEFRAMES if w is None else _VAR_TIMEFRAMES[:2]:
                    for level in _VAR_LEVELS:
                        amount = 10 ** rng.uniform(1, 6)
                        yield _line(
                            _uuid(rng),
                            w.id if w else _NULL,
                            tf,
                            level,
                            _money(amount),
                            f"{rng.uniform(0.5, 35):.6f}",
                            _money(amount * rng.uniform(1.1, 1.6)) if rng.random() < 0.8 else _NULL,
                            rng.choice(_VAR_METHODS),
                            _ts(at),
                            _json({"horizonDays": int(tf[:-1])}),
                        )

        return cols, rows()

    def t_RiskAdjustedMetric(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("RiskAdjustedMetric")
        cols = ("id", "walletId", "timeframe", "sharpeRatio", "sortinoRatio", "calmarRatio")
        cols += ("informationRatio", "treynorRatio", "jensenAlpha", "trackingError")
        cols += ("benchmarkReturn", "computedAt", "metadata")

        def rows() -> Rows:
            for w in [None, *self.wallets]:
                at = self.metric_time(rng)
                for tf in _RAM_TIMEFRAMES:
                    values = [f"{rng.uniform(-2, 4):.6f}" for _ in range(8)]
                    if rng.random() < 0.2:
                        values[3] = _NULL
                    yield _line(
                        _uuid(rng),
                        w.id if w else _NULL,
                        tf,
                        *values,
                        _ts(at),
                        _json({"benchmark": "ETH", "riskFree": 0.04}),
                    )

        return cols, rows()

    # -- digests -------------------------------------------------------------------------
    def n_tracked(self) -> int:
        """How many wallets (the first ones) each digest run covers."""
        return max(3, self.n_wallets // 10)

    def t_DigestRun(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("DigestRun")
        cols = ("id", "generatedAt", "markdownPath", "htmlPath", "jsonPath", "portfolioTotal")
        cols += ("walletsTracked", "actionableRewards", "criticalAlerts", "warningAlerts")
        cols += ("summary", "metadata", "createdAt")
        self.digests: list[tuple[str, datetime]] = []
        rows = []
        tracked = self.n_tracked()
        # Every two weeks for a year: half of them are past the 6-month retention line.
        for run in range(26):
            at = self.now - timedelta(weeks=2 * run, hours=2)
            did = _uuid(rng)
            self.digests.append((did, at))
            stem = f"digests/{at:%Y-%m-%d}"
            critical, warning = rng.randint(0, 5), rng.randint(0, 20)
            rows.append(
                _line(
                    did,
                    _ts(at),
                    f"{stem}.md",
                    f"{stem}.html" if rng.random() < 0.8 else _NULL,
                    f"{stem}.json",
                    _money(10 ** rng.uniform(5, 7)),
                    str(tracked),
                    str(rng.randint(0, 40)),
                    str(critical),
                    str(warning),
                    f"{tracked} wallets, {critical} critical and {warning} warning alerts",
                    _json({"generator": "wedefidaily-digest", "version": "1.4.0"}),
                    _ts(at),
                )
            )
        return cols, iter(rows)

    def t_WalletBalanceSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("WalletBalanceSnapshot")
        cols = ("id", "digestRunId", "walletId", "totalUsd", "topHoldings", "capturedAt")
        wallets = self.wallets[: self.n_tracked()]

        def rows() -> Rows:
            for did, at in self.digests:
                for w in wallets:
                    top = sorted(w.balances, key=lambda b: -b[1])[:3]
                    holdings = [{"symbol": t.symbol, "usd": round(u, 2)} for t, u in top]
                    yield _line(
                        _uuid(rng),
                        did,
                        w.id,
                        _money(sum(u for _, u in w.balances) * rng.uniform(0.9, 1.1)),
                        _json(holdings),
                        _ts(at),
                    )

        return cols, rows()

    def t_GovernanceLockSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("GovernanceLockSnapshot")
        cols = ("id", "digestRunId", "governanceLockId", "walletId", "protocolId")
        cols += ("lockEndsAt", "lockAmount", "votingPower", "capturedAt", "metadata")
        tracked = {w.id for w in self.wallets[: self.n_tracked()]}
        locks = [lk for lk in self.locks if lk.wallet.id in tracked]

        def rows() -> Rows:
            for did, at in self.digests:
                for lk in locks:
                    yield _line(
                        _uuid(rng),
                        did,
                        lk.id,
                        lk.wallet.id,
                        lk.protocol.id,
                        _opt(lk.ends_at and _ts(lk.ends_at)),
                        _money(lk.amount),
                        _money(lk.power * rng.uniform(1.0, 1.3)),
                        _ts(at),
                        _json({"boosted": rng.random() < 0.5}),
                    )

        return cols, rows()

    def t_RewardOpportunitySnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("RewardOpportunitySnapshot")
        cols = ("id", "digestRunId", "rewardOpportunityId", "walletId", "protocolId")
        cols += ("tokenId", "netUsd", "usdValue", "gasEstimateUsd", "claimDeadline")
        cols += ("capturedAt", "metadata")
        tracked = {w.id for w in self.wallets[: self.n_tracked()]}
        opps = [o for o in self.opportunities if o.wallet.id in tracked]

        def rows() -> Rows:
            for did, at in self.digests:
                for o in opps:
                    usd = o.usd * rng.uniform(0.7, 1.3)
                    yield _line(
                        _uuid(rng),
                        did,
                        o.id,
                        o.wallet.id,
                        o.protocol.id,
                        o.token.id,
                        _money(usd - o.gas),
                        _money(usd),
                        _money(o.gas),
                        _opt(o.deadline and _ts(o.deadline)),
                        _ts(at),
                        _json({"actionable": usd > o.gas * 3}),
                    )

        return cols, rows()

    def t_GammaswapPositionSnapshot(self) -> tuple[tuple[str, ...], Rows]:
        rng = self.rng("GammaswapPositionSnapshot")
        cols = ("id", "digestRunId", "gammaswapPositionId", "walletId", "protocolId")
        cols += ("poolId", "healthRatio", "notional", "debtValue", "capturedAt", "metadata")
        tracked = {w.id for w in self.wallets[: self.n_tracked()]}
        positions = [p for p in self.positions if p.wallet.id in tracked]

        def rows() -> Rows:
            for did, at in self.digests:
                for p in positions:
                    yield _line(
                        _uuid(rng),
                        did,
                        p.id,
                        p.wallet.id,
                        p.pool.protocol.id,
                        p.pool.id,
                        _money(p.health * rng.uniform(0.9, 1.1)),
                        _money(p.notional * rng.uniform(0.9, 1.1)),
                        _money(p.debt),
                        _ts(at),
                        _json({"atRisk": p.health < 1.2}),
                    )

        return cols, rows()
