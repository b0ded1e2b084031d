#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine, safe to re-run: system packages (when
# missing, as root), a virtualenv in .venv built on the system Python, the project.
#
# Why the system Python: PostgreSQL's archive_command/restore_command run as the
# 'postgres' OS user, which cannot execute a Python under root's home (pyenv).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || need_pkgs+=(postgresql)
command -v gpg >/dev/null 2>&1 || need_pkgs+=(gnupg)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
  || need_pkgs+=(python3-venv)
# The peer of the benchmark, compressors, the monitoring pipeline and the browser the UI
# tests drive, the aws CLI of the by-hand runbook: Debian packages, so nothing downloads at
# run time.
for tool in pgbackrest:pgbackrest zstd:zstd lz4:lz4 promtool:prometheus \
    prometheus-pushgateway:prometheus-pushgateway \
    prometheus-alertmanager:prometheus-alertmanager \
    chromium:chromium chromedriver:chromium-driver aws:awscli; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The Debian package starts its own cluster on 5432; the project runs its own.
    if command -v pg_lsclusters >/dev/null 2>&1; then
      pg_lsclusters -h | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop || true; done
    fi
    # Likewise the monitoring packages' own services: the stack starts its own on free ports.
    for svc in prometheus prometheus-pushgateway prometheus-alertmanager; do
      pkill -x "$svc" 2>/dev/null || true
    done
  else
    echo "setup: missing Debian packages: ${need_pkgs[*]}" >&2
    echo "       install them as root: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
fi

PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The postgres OS user runs the stack's servers in .stack/ and, as archive_command,
# .venv/bin/wedefi-dr: it must be able to reach this folder. A clone under /root or in a
# mktemp -d folder (mode 700) is out of its reach, so grant traverse (o+x: enter, not list)
# on each ancestor that lacks it, and say so.
chmod o+rx . .venv 2>/dev/null || true
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
  d=$PWD
  while [ "$d" != / ]; do
    if ! runuser -u postgres -- test -x "$d"; then
      chmod o+x "$d"
      echo "setup: granted traverse (o+x) on $d so the postgres user can reach the project" >&2
    fi
    d=$(dirname "$d")
  done
fi
