"""Configuration: rendering, precedence, validation with key and file in every error."""

from __future__ import annotations

import tomllib

import pytest

from oasis_core.contracts.errors import ConfigError
from oasis_core.engine.config import load_config, parse_assignment, render_config
from oasis_core.engine.plugins import Registry


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
            r"oasis.toml: \[subtract\] q_floor = 'high': must be a finite number in \[0, 1\]$",
        ),
        ("[run]\njobs = 1.5\n", r"oasis.toml: \[run\] jobs = 1.5: must be an integer >= 0$"),
        (
            "[substract]\nbackend = 'ois'\n",
            r"oasis.toml: unknown key 'substract' \(did you mean "
            r"'subtract'\?\)",
        ),
        ("[align]\nreference = 'best'\n", r"reference = 'best': must be one of snr, seeing$"),
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
    from oasis_core.contracts.backends import MrBackend
    from oasis_core.contracts.errors import BackendUnavailable
    from oasis_core.contracts.hookspecs import hookimpl

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


def test_default_master_residual_is_native_and_a_list_prefers_swarp_where_it_runs(registry):
    import shutil

    # native: the same master residual as SWarp's, without writing every residual twice
    assert load_config(None, registry).backend("mr") == "native"
    chosen = load_config(None, registry, arguments={"mr.backend": "swarp, native"}).backend("mr")
    has_swarp = "swarp" in registry.names("mr") and (shutil.which("SWarp") or shutil.which("swarp"))
    assert chosen == ("swarp" if has_swarp else "native")


# ------------------------------------------------------------ every value has its range


def _option_classes(registry):
    """(table, class) of every settings class and every installed backend's Options."""
    from oasis_core.engine.config import SETTINGS

    out = [(section, cls) for section, cls in SETTINGS.items()]
    for stage, records in registry.records.items():
        for name, record in records.items():
            out.append((f"{stage}.{name}", record.backend.Options))
    return out


def _numeric_fields(registry):
    import attrs

    for table, cls in _option_classes(registry):
        for field in attrs.fields(cls):
            default = field.default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                yield table, cls, field


def test_every_numeric_option_declares_its_range(registry):
    """A new numeric option without ``range=`` (or ``choices=``) fails here."""
    from oasis_core.contracts.backends import option_check

    fields = list(_numeric_fields(registry))
    assert len(fields) > 100, "the enumeration lost the backends' options"
    tables = {t for t, _, _ in fields}
    assert {"run", "subtract", "subtract.ois", "subtract.zogy", "mask.native"} <= tables
    missing = [
        f"[{t}] {f.name}"
        for t, _, f in fields
        if not (f.metadata.get("declared") and option_check(f) is not None)
    ]
    assert not missing, f"numeric options without a declared range: {', '.join(missing)}"


def test_every_float_option_refuses_nan_and_every_option_its_out_of_range_values(registry):
    """Built directly from Python, as from the file: NaN, +-inf and a value beyond each
    declared bound are refused, naming the option; the default is accepted."""
    import math

    from oasis_core.contracts.backends import option_check
    from oasis_core.contracts.validators import OptionValueError

    checked = 0
    for table, cls, field in _numeric_fields(registry):
        check = option_check(field)
        cls()  # the defaults pass their own checks
        bad = []
        if isinstance(field.default, float):
            bad += [v for v in (math.nan, math.inf, -math.inf) if not check.test(v)]
            assert math.nan in bad or check.nan, f"[{table}] {field.name} accepts NaN"
        lo, hi = getattr(check, "lo", None), getattr(check, "hi", None)
        step = 1 if isinstance(field.default, int) else 1e-9
        if lo is not None and math.isfinite(lo):
            bad.append(type(field.default)(lo - step) if check.lo_open is False else lo)
        if hi is not None and math.isfinite(hi):
            bad.append(type(field.default)(hi + step) if check.hi_open is False else hi)
        for value in bad:
            with pytest.raises(OptionValueError, match=rf"{field.name} = .*: must be"):
                cls(**{field.name: value})
            checked += 1
    assert checked > 100


@pytest.mark.parametrize(
    ("layer", "key", "value", "message"),
    [
        (
            "file",
            "subtract.q_floor",
            "nan",
            r"^\S*oasis.toml: \[subtract\] q_floor = nan: must be a finite number in \[0, 1\]$",
        ),
        (
            "file",
            "mask.native.sigclip",
            "-4.5",
            r"oasis.toml: \[mask.native\] sigclip = -4.5: must be a finite number > 0$",
        ),
        (
            "cli",
            "run.jobs",
            -5,
            r"^command line: \[run\] jobs = -5: must be an integer >= 0$",
        ),
        (
            "arguments",
            "combine.fraction",
            0.0,
            r"^argument: \[combine\] fraction = 0.0: must be a finite number in \(0, 1\]$",
        ),
        (
            "cli",
            "subtract.ois.pix_min",
            float("inf"),
            r"\[subtract.ois\] pix_min = inf: must be a finite number or -inf$",
        ),
        (
            "cli",
            "subtract.hotpants.max_masked",
            1.5,
            r"\[subtract.hotpants\] max_masked = 1.5: must be a finite number in \(0, 1\]$",
        ),
        (
            "cli",
            "run.executor",
            "slurm",
            r"^command line: \[run\] executor = 'slurm': must be one of local, dask$",
        ),
        (
            "cli",
            "extract.method",
            "mr",
            r"\[extract\] method = 'mr': must be one of both, indiv, MR$",
        ),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_where_key_value_and_range(
    tmp_path, registry, layer, key, value, message
):
    path = tmp_path / "oasis.toml"
    kwargs = {}
    if layer == "file":
        *tables, name = key.split(".")
        path.write_text(f"[{'.'.join(tables)}]\n{name} = {value}\n")
    else:
        kwargs[layer] = {key: value}
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, registry, **kwargs)
    assert "\n" not in str(info.value)


def test_the_file_is_checked_even_when_the_command_line_overrides_the_key(tmp_path, registry):
    """Every layer is checked on its own: a bad value in the file is reported, naming the
    file, although the command line would replace it."""
    path = tmp_path / "oasis.toml"
    path.write_text("[subtract]\nq_floor = 1.5\n")
    with pytest.raises(ConfigError, match=r"oasis.toml: \[subtract\] q_floor = 1.5"):
        load_config(path, registry, cli={"subtract.q_floor": 0.3})
    assert load_config(None, registry, cli={"subtract.q_floor": 0.3}).settings[
        "subtract"
    ].q_floor == pytest.approx(0.3)


def test_settings_built_from_python_check_their_values_too():
    import math

    from oasis_core.contracts.validators import OptionValueError
    from oasis_core.engine.config import RunSettings, SubtractSettings

    with pytest.raises(OptionValueError, match=r"q_floor = nan: must be a finite number"):
        SubtractSettings(q_floor=math.nan)
    with pytest.raises(OptionValueError, match=r"jobs = -5: must be an integer >= 0"):
        RunSettings(jobs=-5)
    assert SubtractSettings(q_floor=0.0).q_floor == 0.0


def test_choices_are_declared_with_the_options():
    import oasis_core.engine.config as config

    assert not hasattr(config, "CHOICES"), "choices live in the option declarations"


def test_the_rendered_file_shows_each_range(registry):
    text = render_config(registry)
    lines = {ln.split("=")[0].strip(): ln for ln in text.splitlines() if "=" in ln}
    assert lines["q_floor"].endswith("(0 = keep all) [0, 1]")
    assert lines["jobs"].endswith("(0 = one per core) [0, inf)")
    assert lines["executor"].endswith("{local, dask}")
    assert "[-inf, inf)" in lines["pix_min"]
    assert lines["fraction"].endswith("(0, 1]")


def test_the_ranges_and_checks_docstrings_run():
    import doctest

    import oasis_core.contracts.backends
    import oasis_core.contracts.validators
    import oasis_core.engine.provenance

    for module in (
        oasis_core.contracts.validators,
        oasis_core.contracts.backends,
        oasis_core.engine.provenance,
    ):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_a_moved_key_is_read_at_its_new_place_with_a_warning(tmp_path, registry, caplog):
    """``[subtract] auto_ceiling`` (before the auto backend had its own options) is read as
    ``[subtract.auto] ceiling``: an old oasis.toml keeps working and says what to move."""
    path = tmp_path / "oasis.toml"
    path.write_text("[subtract]\nauto_ceiling = 0.9\n")
    with caplog.at_level("WARNING", logger="oasis"):
        cfg = load_config(path, registry)
    assert cfg.backend_options("subtract", "auto").ceiling == 0.9
    assert "[subtract] auto_ceiling is now [subtract.auto] ceiling" in caplog.text
    # the new place wins when both are given; the old name from the command line too
    path.write_text("[subtract]\nauto_ceiling = 0.9\n[subtract.auto]\nceiling = 0.8\n")
    assert load_config(path, registry).backend_options("subtract", "auto").ceiling == 0.8
    cfg = load_config(None, registry, cli={"subtract.auto_ceiling": 0.7})
    assert cfg.backend_options("subtract", "auto").ceiling == 0.7
