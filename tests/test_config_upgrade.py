"""``oasis config upgrade``: a target's oasis.toml moved to the installed version."""

from __future__ import annotations

import json
import tomllib

import pytest

from oasis_apps.cli import main
from oasis_core.engine.config import load_config
from oasis_core.engine.config_upgrade import upgrade_config
from oasis_core.engine.plugins import Registry
from oasis_core.engine.tree import Target

OLD = """\
[run]
jobs = 1

[subtract]
auto_ceiling = 0.9
q_floor = 0.4
bogus = 1

[subtract.ois]
deg_spatial = 1
no_such_option = 3

[subtract.frobnicate]
x = 2
name = "a \\"quoted\\" word"

[nosuch]
a = 1
"""


@pytest.fixture
def target(tmp_path):
    t = Target(tmp_path / "OASIS" / "targets" / "m31").create()
    t.config_file.write_text(OLD)
    return t


def test_upgrade_moves_drops_keeps_and_fills_in(target):
    registry = Registry()
    result = upgrade_config(target.config_file, registry)
    assert result.moved == ["[subtract] auto_ceiling -> [subtract.auto] ceiling"]
    assert set(result.dropped) == {"[subtract] bogus", "[subtract.ois] no_such_option", "[nosuch]"}
    assert result.kept == ["[subtract.frobnicate]"]
    assert result.added > 100  # every key of the installed version is written

    new = tomllib.loads(result.text)  # valid TOML, the user's values kept
    assert new["run"]["jobs"] == 1
    assert new["subtract"]["q_floor"] == 0.4
    assert new["subtract"]["auto"]["ceiling"] == 0.9
    assert new["subtract"]["ois"]["deg_spatial"] == 1
    assert "auto_ceiling" not in new["subtract"] and "bogus" not in new["subtract"]
    assert new["subtract"]["frobnicate"] == {"x": 2, "name": 'a "quoted" word'}
    assert "nosuch" not in new

    # the upgraded file configures a run exactly as the old one did, for every known key
    target.config_file.write_text(result.text)
    upgraded = load_config(target.config_file, registry)
    assert upgraded.settings["subtract"].q_floor == 0.4
    assert upgraded.options[("subtract", "ois")].deg_spatial == 1
    assert upgraded.options[("subtract", "auto")].ceiling == 0.9
    # and upgrading it again changes nothing
    again = upgrade_config(target.config_file, registry)
    assert again.text == result.text
    assert (again.moved, again.dropped, again.added) == ([], [], 0)


def test_command_writes_atomically_and_keeps_the_old_file(target, capsys):
    assert main(["config", "upgrade", str(target.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    backup = target.config_file.with_name("oasis.toml.bak")
    assert summary["written"] and summary["backup"] == str(backup)
    assert backup.read_text() == OLD
    assert "auto_ceiling" not in target.config_file.read_text()
    assert not list(target.configs.glob(".*.part"))  # no temporary file left


def test_dry_run_changes_nothing(target, capsys):
    assert main(["config", "upgrade", str(target.path), "--dry-run"]) == 0
    assert "[subtract.auto]" in capsys.readouterr().out
    assert target.config_file.read_text() == OLD
    assert not target.config_file.with_name("oasis.toml.bak").exists()


def test_a_bad_value_is_one_line_and_the_file_is_untouched(target, capsys):
    target.config_file.write_text("[subtract]\nq_floor = 7\n")
    assert main(["config", "upgrade", str(target.path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q_floor" in err[0] and str(target.config_file) in err[0]
    assert target.config_file.read_text() == "[subtract]\nq_floor = 7\n"


def test_config_without_a_sub_command_still_prints(target, capsys):
    target.config_file.write_text("[subtract]\nq_floor = 0.3\n")
    assert main(["config", str(target.path)]) == 0
    assert "q_floor = 0.3" in capsys.readouterr().out
    assert main(["config"]) == 0
    assert capsys.readouterr().out.startswith("# OASIS configuration.")
