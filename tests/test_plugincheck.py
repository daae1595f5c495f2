"""`oasis plugins`: each backend's description; `oasis plugins --check NAME`: Q and the
normalised noise per backend on a simulated pair, non-zero exit on a contract breach."""

from __future__ import annotations

import json
import textwrap

from oasis_apps.cli import main
from oasis_core.engine.plugins import Registry

BAD_PLUGIN = textwrap.dedent('''
    """An installed plugin whose subtract backend returns no usable Q."""
    import numpy as np
    from oasis_core.contracts.backends import SubtractBackend
    from oasis_core.contracts.hookspecs import hookimpl
    from oasis_core.contracts.model import Residual

    class NoQ(SubtractBackend):
        name = "no-q"
        description = "forgets to compute Q"

        def subtract(self, science, template, *, options, workdir):
            data = np.asarray(science.data) - np.asarray(template.data)
            return Residual(data=data, noise=np.full(data.shape, 20.0),
                            weight=np.ones(data.shape))

    @hookimpl
    def oasis_subtract_backends():
        yield NoQ()
''')


def test_oasis_plugins_shows_each_backends_description(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    registry = Registry()
    for rec in registry.all_records():
        [row] = [r for r in rows if (r["stage"], r["name"]) == (rec.stage, rec.name)]
        assert row["description"] == rec.backend.description
    ois = next(r for r in rows if r["name"] == "ois")
    assert ois["description"].startswith("Alard's Optimal Image Subtraction")
    assert main(["plugins"]) == 0
    assert "Alard's Optimal Image Subtraction" in capsys.readouterr().out


def test_check_prints_q_and_normalised_noise_per_backend(capsys):
    assert main(["plugins", "--check", "ois"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    line = out[0]
    assert line.startswith("subtract ois (oasis-ois==") and ": ok: Q 0.9" in line
    noise = float(line.split("normalised noise ")[1].split(",")[0])
    assert 0.85 < noise < 1.15


def test_check_fails_with_one_line_naming_the_breach(tmp_path, monkeypatch, capsys):
    (tmp_path / "oasis_noq.py").write_text(BAD_PLUGIN)
    dist = tmp_path / "oasis_noq-0.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: oasis-noq\nVersion: 0.2\n")
    (dist / "entry_points.txt").write_text("[oasis.plugins]\nnoq = oasis_noq\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plugins", "--check", "oasis-noq"]) == 1  # by distribution name
    captured = capsys.readouterr()
    [line] = captured.out.splitlines()
    assert line.startswith("subtract no-q (oasis-noq==0.2): failed: ")
    assert "Q = nan: must be finite in [0, 1]" in line
    [error] = captured.err.splitlines()
    assert error.startswith("error: oasis plugins --check oasis-noq: 1 backend(s) break")
    # the listing shows it with its description
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["backends"]
    [row] = [r for r in rows if r["name"] == "no-q"]
    assert (row["distribution"], row["description"]) == ("oasis-noq", "forgets to compute Q")


def test_check_of_an_unknown_name_lists_the_plugins(capsys):
    assert main(["plugins", "--check", "nope"]) == 1
    err = capsys.readouterr().err
    assert "no plugin, distribution or backend named 'nope'; plugins: " in err
    assert "ois" in err and err.count("\n") == 1
