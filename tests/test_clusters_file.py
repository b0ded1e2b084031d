"""The clusters file after a failover and a rejoin: an operator's YAML keeps its comments
and fields, the stack's JSON stays JSON, a second name for the old primary's files loses
the production flag too, and a file we may not write is left whole with the keys to change.

No server is needed: these are files, read back with the same reader recovery uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from wedefi_dr.postgres import clusters_file
from wedefi_dr.postgres.cluster import ClustersFileInvalid, os_user_kwargs, read_clusters
from wedefi_dr.postgres.tools import running_as_root

OPERATOR_YAML = """\
# Written by hand on db-1; keep this comment.
primary:
  data_dir: /var/lib/postgresql/15/main
  port: 5432
  start_command: [systemctl, start, postgresql@15-main]
  production: true   # break-glass
old-name:
  data_dir: /var/lib/postgresql/15/main
  port: 5432
  production: true
standby:
  data_dir: /var/lib/postgresql/15/standby
  port: 5433
  log_file: /var/log/postgresql/standby.log
dr-scratch:
  data_dir: /srv/scratch
  port: 5499
"""


def test_operator_yaml_after_failover_and_rejoin_keeps_their_fields(tmp_path):
    path = tmp_path / "clusters.yaml"
    path.write_text(OPERATOR_YAML)
    path.chmod(0o640)
    assert read_clusters(path)["old-name"].production is True  # shares the primary's files

    done = clusters_file.after_failover(path, "primary", "standby")
    assert done["written"] is True and done["operator_action"] is None
    after = read_clusters(path)
    assert after["standby"].production is True and after["standby"].fenced is False
    assert after["primary"].production is False and after["primary"].fenced is True
    assert after["old-name"].production is False
    assert after["dr-scratch"].production is False
    text = path.read_text()
    assert "# Written by hand on db-1; keep this comment." in text
    assert "# break-glass" in text and "log_file: /var/log/postgresql/standby.log" in text
    assert after["primary"].start_command == ["systemctl", "start", "postgresql@15-main"]
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.yaml"]  # no temp file left

    assert clusters_file.after_failover(path, "primary", "standby")["written"] is False
    rejoined = clusters_file.after_rejoin(path, "primary")
    assert rejoined["changes"] == ["primary.fenced: false"]
    assert read_clusters(path)["primary"].fenced is False
    assert read_clusters(path)["primary"].replaced_by == "standby"  # still not the primary
    assert read_clusters(path)["standby"].production is True


def test_stack_json_stays_json(tmp_path):
    path = tmp_path / "clusters.json"
    path.write_text(
        json.dumps(
            {
                "primary": {"data_dir": "/a/data", "port": 1, "production": True},
                "standby": {"data_dir": "/b/data", "port": 2},
            }
        )
    )
    clusters_file.after_failover(path, "primary", "standby")
    body = json.loads(path.read_text())
    assert body["standby"]["production"] is True
    assert body["primary"] == {
        "data_dir": "/a/data",
        "port": 1,
        "production": False,
        "fenced": True,
        "replaced_by": "standby",
    }


def test_unknown_cluster_is_refused_before_any_change(tmp_path):
    path = tmp_path / "clusters.yaml"
    path.write_text(OPERATOR_YAML)
    with pytest.raises(ClustersFileInvalid, match="does not describe nope"):
        clusters_file.after_failover(path, "primary", "nope")
    assert path.read_text() == OPERATOR_YAML


def test_a_file_we_may_not_write_is_left_whole_and_the_keys_are_named():
    """Run as the ``postgres`` user on a root-owned file (as root, every file is writable)."""
    folder = Path(tempfile.mkdtemp(prefix="wedefi-dr-clusters-"))
    folder.chmod(0o755)
    path = folder / "clusters.yaml"
    path.write_text(OPERATOR_YAML)
    path.chmod(0o644)
    if not running_as_root():
        path.chmod(0o444)
        folder.chmod(0o555)
    code = (
        "import json, sys\n"
        "from wedefi_dr.postgres import clusters_file\n"
        "print(json.dumps(clusters_file.after_failover(sys.argv[1], 'primary', 'standby')))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
            env={"PATH": os.environ["PATH"]},
            timeout=60,
            **os_user_kwargs(),
        )
    finally:
        folder.chmod(0o755)
    done = json.loads(out.stdout)
    assert done["written"] is False
    assert done["operator_action"] == (
        f"the clusters file {path} could not be written (not writable by this user): set "
        "standby.production: true, primary.production: false, primary.fenced: true, "
        "primary.replaced_by: standby, old-name.production: false in it by hand"
    )
    assert path.read_text() == OPERATOR_YAML
    assert sorted(p.name for p in folder.iterdir()) == ["clusters.yaml"]
    path.unlink()
    folder.rmdir()
