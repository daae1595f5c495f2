"""Configuration: rendering, precedence, validation with key and file in every error."""

from __future__ import annotations

import tomllib

import pytest

from oasis_core.config import load_config, parse_assignment, render_config
from oasis_core.errors import ConfigError
from oasis_core.plugins import Registry


@pytest.fixture(scope="module")
def registry():
    return Registry()


def test_rendered_file_has_every_key_with_default_and_comment(registry):
    text = render_config(registry)
    data = tomllib.loads(text)
    assert data["subtract"]["backend"] == "ois"
    assert data["mask"]["backend"] == "native"
    assert "deg_spatial" in data["subtract"]["ois"]
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            assert "  # " in line, f"no comment on {line!r}"
    # rendering is the effective config of an empty file
    cfg = load_config(None, registry)
    assert render_config(registry, cfg) == text


def test_precedence_cli_over_argument_over_file_over_default(tmp_path, registry):
    path = tmp_path / "oasis.toml"
    path.write_text("[subtract]\nq_floor = 0.3\nq_ceiling = 0.8\n[run]\njobs = 3\n")
    cfg = load_config(path, registry)
    assert cfg.settings["subtract"].q_floor == 0.3
    assert cfg.settings["psf"].snr_min == 5.0  # default
    cfg = load_config(path, registry, arguments={"subtract.q_floor": 0.4})
    assert cfg.settings["subtract"].q_floor == 0.4
    assert cfg.settings["subtract"].q_ceiling == 0.8
    cfg = load_config(
        path, registry, arguments={"subtract.q_floor": 0.4}, cli={"subtract.q_floor": 0.45}
    )
    assert cfg.settings["subtract"].q_floor == 0.45
    cfg = load_config(path, registry, use_config_file=False)
    assert cfg.settings["subtract"].q_floor == 0.5
    assert cfg.run.jobs == 0


def test_backend_options_from_file(tmp_path, registry):
    path = tmp_path / "oasis.toml"
    path.write_text("[subtract.ois]\ndeg_spatial = 1\n")
    cfg = load_config(path, registry)
    assert cfg.backend_options("subtract").deg_spatial == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[subtract]\nq_flor = 0.3\n",
            r"oasis.toml: \[subtract\] unknown key 'q_flor' "
            r"\(did you mean 'q_floor'\?\)",
        ),
        (
            "[subtract.ois]\ndeg_spatal = 1\n",
            r"oasis.toml: \[subtract.ois\] unknown key "
            r"'deg_spatal' \(did you mean 'deg_spatial'\?\)",
        ),
        (
            "[subtract]\nq_floor = 'high'\n",
            r"oasis.toml: \[subtract\] q_floor must be a number, "
            r"got 'high'",
        ),
        ("[run]\njobs = 1.5\n", r"oasis.toml: \[run\] jobs must be an integer"),
        (
            "[substract]\nbackend = 'ois'\n",
            r"oasis.toml: unknown key 'substract' \(did you mean "
            r"'subtract'\?\)",
        ),
        ("[align]\nreference = 'best'\n", r"reference must be one of snr, seeing"),
        ("[subtract\n", r"oasis.toml: invalid TOML"),
    ],
)
def test_errors_name_key_and_file(tmp_path, registry, text, message):
    path = tmp_path / "oasis.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, registry)
    assert "\n" not in str(info.value)


def test_cli_assignment_parsing():
    assert parse_assignment("subtract.ois.deg_spatial=1") == ("subtract.ois.deg_spatial", 1)
    assert parse_assignment("align.reference=seeing") == ("align.reference", "seeing")
    assert parse_assignment("extract.keep_negative=true") == ("extract.keep_negative", True)
    with pytest.raises(ConfigError):
        parse_assignment("novalue")


def test_cli_override_of_unknown_key_is_reported(registry):
    with pytest.raises(ConfigError, match=r"command line: \[subtract.ois\] unknown key 'nope'"):
        load_config(None, registry, cli={"subtract.ois.nope": 1})


def test_backend_preference_list_takes_the_first_that_can_run(registry, plugin_manager):
    from oasis_core.backends import MrBackend
    from oasis_core.errors import BackendUnavailable
    from oasis_core.hookspecs import hookimpl

    class Missing(MrBackend):
        name = "needs-a-program"

        def check(self, options):
            raise BackendUnavailable("the program is not installed")

    class Plugin:
        @hookimpl
        def oasis_mr_backends(self):
            yield Missing()

    plugin_manager.register(Plugin(), name="missing")
    reg = Registry(plugin_manager)
    pick = load_config(None, reg, arguments={"mr.backend": "needs-a-program, sos"})
    assert pick.backend("mr") == "sos"
    # not installed at all: skipped the same way
    assert load_config(None, reg, arguments={"mr.backend": "nope,native"}).backend("mr") == "native"
    # none can run: the first, so that running the stage says why
    none = load_config(None, reg, arguments={"mr.backend": "needs-a-program, nope"})
    assert none.backend("mr") == "needs-a-program"
    # a single name is taken as written
    assert load_config(None, reg, arguments={"mr.backend": "sos_abs"}).backend("mr") == "sos_abs"


def test_default_master_residual_is_swarp_where_it_runs(registry):
    import shutil

    chosen = load_config(None, registry).backend("mr")
    has_swarp = "swarp" in registry.names("mr") and (shutil.which("SWarp") or shutil.which("swarp"))
    assert chosen == ("swarp" if has_swarp else "native")
