"""The OasisPy-compatible API and the ``oasis-<method>`` commands, called as OasisPy's
documentation shows (positional path, OasisPy's keyword names)."""

from __future__ import annotations

import inspect
import io
import logging
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
from astropy.io import fits

from oasis_apps import oasispy_cli
from oasis_apps.oasispy import (
    ALIGN,
    COMBINE,
    EXTRACT,
    GET,
    INITIALIZE,
    MASK,
    MOSAIC,
    MR,
    PIPELINE,
    PSF,
    RUN,
    SIM,
    SUBTRACT,
    TEST,
    sim_fakes,
    sim_sameField,
)
from oasis_core.contracts.errors import ConfigError, InputError

EMPTY = inspect.Parameter.empty

# OasisPy's API page (docs/API.rst), name -> documented parameters and defaults.
DOCUMENTED = {
    "INITIALIZE": [],
    "GET": [],
    "MASK": [("path", EMPTY)],
    "ALIGN": [("path", EMPTY), ("align_method", "standard")],
    "PSF": [("path", EMPTY)],
    "COMBINE": [("path", EMPTY)],
    "SUBTRACT": [("path", EMPTY), ("method", "ois"), ("use_config_file", True)],
    "MR": [
        ("path", EMPTY),
        ("method", "swarp"),
        ("sig_thresh", 4),
        ("gauss_sig", 3),
        ("gauss_filt", False),
        ("use_config_file", True),
    ],
    "EXTRACT": [("path", EMPTY), ("method", "both")],
    "PIPELINE": [("path", EMPTY)],
    "RUN": [],
    "sim_fakes": [
        ("location", EMPTY),
        ("n_fakes", 20),
        ("iterations", 50),
        ("input_mode", "flux"),
        ("PSF", "moffat"),
        ("subtract_method", "ois"),
        ("f_min", 0),
        ("f_max", 40000),
    ],
    "sim_sameField": [
        ("location", EMPTY),
        ("numIms", 100),
        ("bkg_mag", 22.5),
        ("fwhm_min", 3),
        ("fwhm_max", 6),
        ("rot_min", -2.5),
        ("rot_max", 2.5),
        ("shift_min", -2),
        ("shift_max", 2),
        ("scale_mult", (0, 1.5)),
        ("scale_add", (-20, 50)),
        ("zero_point", 25),
        ("mode", "moffat"),
    ],
    "SIM": [],
    "TEST": [],
    "MOSAIC": [],
}


# ---------------------------------------------------------------------------- helpers


def copy_target(src, base: Path, name: str = "sim") -> Path:
    """A private copy of a finished target (outputs included), run in-process (jobs 1)."""
    dest = base / "OASIS" / "targets" / name
    shutil.copytree(src.path, dest)
    set_key(dest, "run", "jobs", "1")
    return dest


def set_key(target: Path, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (TOML) in ``[section]`` of the target's configs/oasis.toml."""
    path = target / "configs" / "oasis.toml"
    out, current, done = [], None, False
    for line in path.read_text().splitlines():
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"^{key}\s*=", line):
            line, done = f"{key} = {value}", True
        out.append(line)
    assert done, f"no {key} in [{section}]"
    path.write_text("\n".join(out) + "\n")


def header(path: Path) -> fits.Header:
    return fits.getheader(path)


def history(path: Path) -> str:
    return "\n".join(str(h) for h in header(path).get("HISTORY", []))


def answers(monkeypatch, *lines: str) -> None:
    """Feed ``lines`` to the prompts on stdin."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{x}\n" for x in lines)))


def frame_names(target: Path) -> list[str]:
    return sorted(p.name.removesuffix(".fits") for p in (target / "aligned").glob("*.fits"))


def non_reference(target: Path) -> str:
    ref = (target / "aligned" / "reference.txt").read_text().strip()
    return next(n for n in frame_names(target) if n != ref)


@pytest.fixture
def target(sim_target_done, tmp_path) -> Path:
    return copy_target(sim_target_done, tmp_path)


@pytest.fixture
def oasis_log(caplog):
    caplog.set_level(logging.INFO, logger="oasis")
    return caplog


def fake_module(monkeypatch, name: str, **functions) -> types.ModuleType:
    """Install a stand-in for ``oasis_apps.<name>`` (slow or not yet written)."""
    module = types.ModuleType(f"oasis_apps.{name}")
    for key, fn in functions.items():
        setattr(module, key, fn)
    monkeypatch.setitem(sys.modules, f"oasis_apps.{name}", module)
    return module


# ---------------------------------------------------------------------------- the API


def test_star_import_gives_oasispy_names_with_documented_signatures():
    namespace: dict = {}
    exec("from oasis_apps.oasispy import *", namespace)
    assert set(DOCUMENTED) <= set(namespace)
    for name, documented in DOCUMENTED.items():
        params = list(inspect.signature(namespace[name]).parameters.values())
        got = [(p.name, p.default) for p in params[: len(documented)]]
        assert got == documented, name
        # anything OASIS adds is optional, so every documented call still works
        assert all(p.default is not EMPTY for p in params[len(documented) :]), name
        assert "_given" not in inspect.signature(namespace[name]).parameters


def test_MASK_masks_the_frames_whose_weight_map_is_missing(target):
    first, *others = sorted((target / "masks").glob("*.weight.fits"))
    first.unlink()
    before = {p: p.stat().st_mtime_ns for p in others}
    result = MASK(str(target))
    assert first.exists()
    assert header(first)["OASSTAGE"] == "mask"
    assert first.name.removesuffix(".weight.fits") in result[str(target)]
    assert {p: p.stat().st_mtime_ns for p in others} == before  # finished work skipped


def test_PSF_measures_a_missing_psf(target):
    model = sorted((target / "psf").glob("*.psf.fits"))[0]
    model.unlink()
    result = PSF(str(target))
    assert model.exists()
    assert header(model)["OASSTAGE"] == "psf"
    assert model.name.removesuffix(".psf.fits") in result[str(target)]


def test_ALIGN_masks_first_like_oasispy_then_registers(target, oasis_log):
    name = non_reference(target)
    (target / "masks" / f"{name}.weight.fits").unlink()
    (target / "aligned" / f"{name}.fits").unlink()
    result = ALIGN(str(target), align_method="standard")
    assert (target / "masks" / f"{name}.weight.fits").exists()
    hdr = header(target / "aligned" / f"{name}.fits")
    assert (hdr["OASSTAGE"], hdr["OASBACK"]) == ("align", "native")
    assert name in result[str(target)]
    assert "fakes" not in oasis_log.text


def test_ALIGN_fakes_method_is_logged_and_skips_registration(target, oasis_log):
    ALIGN(str(target), align_method="fakes")
    assert "align_method 'fakes'" in oasis_log.text
    name = non_reference(target)
    hdr = header(target / "aligned" / f"{name}.fits")
    assert (hdr["OASBACK"], hdr["ALNMETH"]) == ("native", "none")


def test_COMBINE_builds_the_template(target):
    template = target / "templates" / "template.fits"
    template.unlink()
    result = COMBINE(str(target))
    assert Path(result[str(target)]) == template
    assert header(template)["OASSTAGE"] == "combine"


def test_SUBTRACT_method_argument_and_config_file_precedence(target):
    residuals = sorted((target / "residuals").glob("*_residual.fits"))
    assert {header(r)["OASBACK"] for r in residuals} == {"ois"}
    set_key(target, "subtract", "backend", '"zogy"')
    # a method passed explicitly wins over the file (nothing to redo: still ois)
    SUBTRACT(str(target), method="ois", use_config_file=True)
    assert {header(r)["OASBACK"] for r in residuals} == {"ois"}
    # use_config_file=False: the file's zogy is not read
    SUBTRACT(str(target), use_config_file=False)
    assert {header(r)["OASBACK"] for r in residuals} == {"ois"}
    # the method left at its default: the file decides, as in OasisPy
    result = SUBTRACT(str(target))
    assert {header(r)["OASBACK"] for r in residuals} == {"zogy"}
    assert sorted(result[str(target)]) == frame_names(target)
    log = (target / "residuals" / "log.txt").read_text()
    assert "zogy" in log


def test_MR_sigma_clip_options_on_comma_separated_targets(sim_target_done, tmp_path):
    a = copy_target(sim_target_done, tmp_path / "a")
    b = copy_target(sim_target_done, tmp_path / "b")
    result = MR(
        f"{a}, {b}",
        method="sigma_clip",
        sig_thresh=3,
        gauss_sig=2,
        gauss_filt=True,
        use_config_file=False,
    )
    assert list(result) == [str(a), str(b)]
    for t in (a, b):
        mr = t / "residuals" / "MR.fits"
        assert Path(result[str(t)]) == mr
        assert header(mr)["OASBACK"] == "sigma_clip"
        text = history(mr)
        assert "mr.sigma_clip.sig_thresh = 3.0" in text
        assert "mr.sigma_clip.gauss_sig = 2.0" in text
        assert "mr.sigma_clip.gauss_filt = True" in text


def test_MR_phose_runs_as_sos_and_logs_ignored_parameters(target, oasis_log):
    MR(str(target), method="phose", sig_thresh=5)
    assert header(target / "residuals" / "MR.fits")["OASBACK"] == "sos"
    assert "'phose' is not available" in oasis_log.text
    assert "sig_thresh apply to method 'sigma_clip' only" in oasis_log.text
    assert "gauss_sig" not in oasis_log.text  # not given: not reported


def test_MR_default_method_lets_the_config_file_decide(target):
    set_key(target, "mr", "backend", '"sos_abs"')
    MR(str(target))
    assert header(target / "residuals" / "MR.fits")["OASBACK"] == "sos_abs"


def test_EXTRACT_method_argument_wins_and_default_defers_to_file(target):
    sources = target / "sources"
    (sources / "MR_sources.txt").unlink()
    result = EXTRACT(str(target), method="indiv")
    totals = (sources / "total_sources.txt").read_text()
    assert totals.startswith("extraction method: indiv")
    assert not (sources / "MR_sources.txt").exists()
    assert result[str(target)]["frames"] == len(frame_names(target))
    set_key(target, "extract", "method", '"MR"')
    EXTRACT(str(target))
    assert (sources / "total_sources.txt").read_text().startswith("extraction method: MR")
    assert (sources / "MR_sources.txt").exists()


def test_EXTRACT_unknown_method_names_the_key(target):
    with pytest.raises(ConfigError, match=r"method = 'everything': must be one of both, indiv, MR"):
        EXTRACT(str(target), method="everything")


def test_PIPELINE_redoes_what_is_missing(target):
    (target / "residuals" / "MR.fits").unlink()
    (target / "sources" / "total_sources.txt").unlink()
    result = PIPELINE(str(target))
    assert (target / "residuals" / "MR.fits").exists()
    assert (target / "sources" / "total_sources.txt").exists()
    assert set(result[str(target)]) == {
        "mask",
        "psf",
        "align",
        "combine",
        "subtract",
        "mr",
        "extract",
        "photometry",
    }


def test_unknown_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        MASK(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="no target directory"):
        PSF(" , ")


def test_sim_fakes_runs_the_fakes_simulation(target):
    result = sim_fakes(
        str(target),
        4,
        1,
        input_mode="flux",
        PSF="moffat",
        subtract_method="ois",
        f_min=0,
        f_max=40000,
    )
    fakes = result[str(target)]
    assert 1 <= len(fakes.table) <= 4
    assert set(fakes.table["iteration"]) == {0}
    assert float(max(fakes.table["flux"])) <= 40000
    sim = target.parent.parent / "simulations" / "sim_fakes"
    assert fakes.directory == sim / "fakes"
    assert (fakes.directory / "fakes.ecsv").exists()
    assert not (target / "fakes").exists()  # the target itself is left alone


def test_sim_sameField_adapts_names_and_maps_locations(monkeypatch, oasis_log, tmp_path):
    calls = []

    def sim_same_field(
        location,
        *,
        n_images=10,
        bkg_mag=21.0,
        fwhm_min=2.0,
        fwhm_max=5.0,
        rot_min=0.0,
        rot_max=0.0,
        shift_min=0.0,
        shift_max=0.0,
        zero_point=25.0,
        psf="moffat",
    ):
        calls.append((location, dict(locals())))
        return f"done {location}"

    fake_module(monkeypatch, "samefield", sim_same_field=sim_same_field)
    result = sim_sameField("t1, t2", numIms=50, mode="moffat", scale_mult=(0.5, 1.0))
    assert result == {"t1": "done t1", "t2": "done t2"}
    assert [c[0] for c in calls] == ["t1", "t2"]
    kwargs = calls[0][1]
    assert kwargs["n_images"] == 50
    assert kwargs["psf"] == "moffat"
    assert kwargs["bkg_mag"] == 22.5  # OasisPy's documented default
    assert (kwargs["rot_min"], kwargs["shift_max"]) == (-2.5, 2)
    assert "scale_mult" in oasis_log.text
    assert "scale_add" not in oasis_log.text  # left at its default: not reported


def test_TEST_reports_like_oasispy(monkeypatch, capsys):
    calls = []

    def run_selftest(directory=None):
        calls.append(directory)
        return len(calls) == 1

    fake_module(monkeypatch, "selftest", run_selftest=run_selftest)
    assert TEST() is True
    assert "TEST SUCCESSFUL!" in capsys.readouterr().out
    assert TEST() is False
    assert "Test failure" in capsys.readouterr().out
    assert calls == [None, None]


def test_MOSAIC_prompts_without_arguments(monkeypatch, tmp_path):
    calls = []
    fake_module(monkeypatch, "mosaic", mosaic=lambda inputs, output: calls.append((inputs, output)))
    answers(monkeypatch, str(tmp_path), "m31.fits")
    MOSAIC()
    assert calls == [([tmp_path], Path("m31.fits"))]
    MOSAIC("a.fits, b.fits", "out.fits")
    assert calls[-1] == ([Path("a.fits"), Path("b.fits")], Path("out.fits"))


def test_GET_unpack_copies_frames_into_a_new_target(monkeypatch, sim_target_done, tmp_path):
    src = sim_target_done.path / "data"
    answers(monkeypatch, "unpack", str(src), "M31", str(tmp_path))
    report = GET()
    target = tmp_path / "OASIS" / "targets" / "M31"
    assert sorted(p.name for p in (target / "data").iterdir()) == sorted(
        p.name for p in src.iterdir()
    )
    assert len(report.copied) == len(list(src.iterdir()))
    assert (target / "configs" / "oasis.toml").exists()


def test_GET_dl_downloads_with_the_answers(monkeypatch, tmp_path):
    from oasis_apps import lco

    calls = []

    def download(target, **kwargs):
        calls.append((target, kwargs))
        return types.SimpleNamespace(downloaded=[], present=[], failed=[])

    monkeypatch.setattr(lco, "download", download)
    answers(monkeypatch, "dl", "M31", str(tmp_path), "5", "M 31", "rp", "", "2024-01-01", "", "")
    GET()
    (target, kwargs), *_ = calls
    assert target.path == (tmp_path / "OASIS" / "targets" / "M31").resolve()
    assert kwargs == {
        "object_name": "M 31",
        "filter_name": "rp",
        "proposal": None,
        "start": "2024-01-01",
        "end": None,
        "limit": 5,
        "token": None,
    }


def test_GET_unknown_mode(monkeypatch):
    answers(monkeypatch, "ftp")
    with pytest.raises(InputError, match="answer 'dl' or 'unpack'"):
        GET()


def test_INITIALIZE_creates_the_tree(monkeypatch, tmp_path):
    base = INITIALIZE(tmp_path / "here")
    assert sorted(p.name for p in base.iterdir()) == [
        "archive",
        "simulations",
        "targets",
        "temp",
    ]
    answers(monkeypatch, str(tmp_path / "asked"))
    assert INITIALIZE() == tmp_path / "asked" / "OASIS"
    assert (tmp_path / "asked" / "OASIS" / "targets").is_dir()


def test_RUN_is_the_menu(monkeypatch, tmp_path, capsys):
    answers(monkeypatch, "initialize", str(tmp_path))
    RUN()
    assert (tmp_path / "OASIS" / "targets").is_dir()
    assert "OASIS methods:" in capsys.readouterr().out


def test_SIM_menu_runs_fakes_with_the_answers(monkeypatch, tmp_path):
    from oasis_apps import fakes

    calls = []

    def record(location, **kwargs):
        calls.append((location, kwargs))
        return types.SimpleNamespace(directory=tmp_path, plot=None, line=lambda: "ok")

    monkeypatch.setattr(fakes, "sim_fakes", record)
    answers(monkeypatch, "fakes", "OASIS/targets/x", "7", "3", "flux", "gauss", "zogy", "10", "500")
    SIM()
    (location, kwargs), *_ = calls
    assert location == "OASIS/targets/x"
    assert (kwargs["n_fakes"], kwargs["iterations"], kwargs["PSF"]) == (7, 3, "gauss")
    assert (kwargs["subtract_method"], kwargs["f_min"], kwargs["f_max"]) == ("zogy", 10, 500)


# ---------------------------------------------------------------------------- commands


def run_command(entry) -> int:
    with pytest.raises(SystemExit) as exc:
        entry()
    return exc.value.code


def test_commands_cover_oasispy_setup_names():
    oasispy_setup = {
        "oasis-initialize",
        "oasis-get",
        "oasis-mask",
        "oasis-align",
        "oasis-psf",
        "oasis-combine",
        "oasis-subtract",
        "oasis-mr",
        "oasis-extract",
        "oasis-pipeline",
        "oasis-simulate",
        "oasis-test",
        "oasis-run",
    }
    assert oasispy_setup | {"oasis-sim", "oasis-mosaic"} == set(oasispy_cli.COMMANDS)
    for name, entry in oasispy_cli.COMMANDS.items():
        assert entry.__name__ in oasispy_cli.__all__, name


def test_oasis_mr_prompts_for_sigma_clip_settings(monkeypatch, target):
    answers(monkeypatch, str(target), "sigma_clip", "2.5", "y", "1.5")
    assert run_command(oasispy_cli.mr) == 0
    mr = target / "residuals" / "MR.fits"
    assert header(mr)["OASBACK"] == "sigma_clip"
    text = history(mr)
    assert "sig_thresh = 2.5" in text
    assert "gauss_filt = True" in text
    assert "gauss_sig = 1.5" in text


def test_oasis_mr_blank_method_uses_the_configured_one(monkeypatch, target):
    set_key(target, "mr", "backend", '"sos_abs"')
    answers(monkeypatch, str(target), "")
    assert run_command(oasispy_cli.mr) == 0
    assert header(target / "residuals" / "MR.fits")["OASBACK"] == "sos_abs"


def test_oasis_extract_prompts_method_then_path(monkeypatch, target):
    answers(monkeypatch, "MR", str(target))
    assert run_command(oasispy_cli.extract) == 0
    totals = (target / "sources" / "total_sources.txt").read_text()
    assert totals.startswith("extraction method: MR")


def test_oasis_subtract_error_is_one_line_and_status_1(monkeypatch, tmp_path, capsys):
    answers(monkeypatch, str(tmp_path / "missing"), "ois")
    assert run_command(oasispy_cli.subtract) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: target ")
    assert "no such directory" in err
    assert "Traceback" not in err


def test_oasis_initialize_and_end_of_input(monkeypatch, tmp_path, capsys):
    answers(monkeypatch, str(tmp_path))
    assert run_command(oasispy_cli.initialize) == 0
    assert (tmp_path / "OASIS" / "temp").is_dir()
    answers(monkeypatch)  # nothing to read: the prompt is aborted
    assert run_command(oasispy_cli.mask) == 1
    assert "aborted" in capsys.readouterr().err


def test_oasis_test_exit_status_follows_the_result(monkeypatch):
    results = iter([False, True])
    fake_module(monkeypatch, "selftest", run_selftest=lambda directory=None: next(results))
    assert run_command(oasispy_cli.test) == 1
    assert run_command(oasispy_cli.test) == 0
