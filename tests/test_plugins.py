"""Plugin discovery, selection and errors; the third-party path, twice."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import attrs
import pytest

from oasis_core.contracts.backends import ExtractBackend, MrBackend, SubtractBackend, option
from oasis_core.contracts.errors import BackendUnavailable, OasisError, StageError, UnknownBackend
from oasis_core.contracts.hookspecs import hookimpl
from oasis_core.engine.config import load_config
from oasis_core.engine.plugins import Registry, make_plugin_manager

#: Each built-in plugin is its own distribution (plugins/<dir>/pyproject.toml).
BUILTIN_DISTS = {"native": "oasis-native", "ois": "oasis-ois"}

BUILTIN_STAGES = {
    "mask": "native",
    "psf": "native",
    "align": "native",
    "combine": "native",
    "subtract": "ois",
    "mr": "native",
    "extract": "native",
}


def test_every_builtin_backend_is_found_through_entry_points(plugin_manager):
    registry = Registry(plugin_manager)
    assert registry.errors == []
    assert plugin_manager.oasis_broken == []
    for stage, name in BUILTIN_STAGES.items():
        record = registry.get(stage, name)
        assert record.dist == BUILTIN_DISTS[name]
        assert registry.status(record) == "available"


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("OASIS_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = Registry(make_plugin_manager())
    # only the core's own backend (the subtract selector 'auto') is left
    left = {stage: registry.names(stage) for stage in BUILTIN_STAGES}
    assert left == {stage: ["auto"] if stage == "subtract" else [] for stage in BUILTIN_STAGES}


def test_unknown_backend_lists_installed(plugin_manager):
    registry = Registry(plugin_manager)
    with pytest.raises(
        UnknownBackend,
        match=r"subtract backend 'hotpant' is not installed; "
        r"installed: .*ois",
    ):
        registry.get("subtract", "hotpant")


class Unavailable(MrBackend):
    name = "needs-program"

    def check(self, options):
        raise BackendUnavailable(
            "mr backend 'needs-program': program 'xyz' not on PATH; "
            "install it with apt-get install xyz"
        )


class Dup(MrBackend):
    name = "native"


class DupPlugin:
    @hookimpl
    def oasis_mr_backends(self):
        yield Dup()


class UnavailablePlugin:
    @hookimpl
    def oasis_mr_backends(self):
        yield Unavailable()


def test_unavailable_backend_says_what_is_missing(plugin_manager):
    plugin_manager.register(UnavailablePlugin(), name="unavail")
    registry = Registry(plugin_manager)
    assert "program 'xyz' not on PATH" in registry.status(registry.get("mr", "needs-program"))
    with pytest.raises(BackendUnavailable, match="apt-get install xyz"):
        registry.select("mr", "needs-program", None)


def test_duplicate_name_names_both_providers(plugin_manager):
    plugin_manager.register(DupPlugin(), name="dupper")
    registry = Registry(plugin_manager)
    with pytest.raises(OasisError, match=r"provided twice: by native \(oasis-native\) and dupper"):
        registry.get("mr", "native")


def test_wrong_object_from_hook_is_reported(plugin_manager):
    class Bad:
        @hookimpl
        def oasis_mr_backends(self):
            yield object()

    plugin_manager.register(Bad(), name="bad")
    registry = Registry(plugin_manager)
    assert any("not a MrBackend" in e for e in registry.errors)


def test_broken_entry_point_is_recorded_not_raised(tmp_path, monkeypatch):
    dist = tmp_path / "oasis_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: oasis-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[oasis.plugins]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = make_plugin_manager()
    assert [b.name for b in pm.oasis_broken] == ["broken"]
    assert "No module named" in pm.oasis_broken[0].error


def test_oasis_plugins_lists_all_builtin_backends():
    out = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for stage, name in BUILTIN_STAGES.items():
        assert any(
            line.split("│")[1:3]
            == [
                f" {stage} ".ljust(len(line.split("│")[1])),
                f" {name} ".ljust(len(line.split("│")[2])),
            ]
            for line in out.splitlines()
            if line.count("│") > 3
        ), (stage, name)
    # each built-in row names its distribution, version and status (not just somewhere)
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if "│" in ln]
    from importlib.metadata import version

    for stage, name in BUILTIN_STAGES.items():
        [row] = [r for r in rows if r[:2] == [stage, name]]
        dist = BUILTIN_DISTS[name]
        assert row[3:6] == [dist, version(dist), "available"], row


# ----------------------------------------------------------- the third-party path


@attrs.frozen(kw_only=True)
class ScaledMeanOptions:
    scale: float = option(1.0, "multiply the master residual by this")


class ScaledMean(MrBackend):
    """A stranger's master-residual backend: plain mean of normalised residuals."""

    name = "scaled-mean"
    Options = ScaledMeanOptions
    calls = 0

    def master(self, residuals, *, options, workdir):
        import numpy as np

        ScaledMean.calls += 1
        stack = np.stack([r.normalized for r in residuals])
        return attrs.evolve(
            residuals[0],
            data=options.scale * stack.mean(axis=0),
            noise=np.full(stack.shape[1:], 1 / np.sqrt(len(residuals))),
            weight=np.ones(stack.shape[1:]),
            meta={"made_by": "thirdparty"},
        )


class ThirdParty:
    @hookimpl
    def oasis_mr_backends(self):
        yield ScaledMean()


@pytest.mark.slow
def test_registered_third_party_plugin_runs_in_the_pipeline(sim_target_done):
    from astropy.io import fits

    from oasis_core.engine.pipeline import pipeline

    pm = make_plugin_manager()
    pm.register(ThirdParty(), name="thirdparty")
    registry = Registry(pm)
    result = pipeline(
        sim_target_done.path,
        backends={"mr": "scaled-mean"},
        options={"mr.scaled-mean.scale": 2.0},
        registry=registry,
        jobs=1,
    )
    header = fits.getheader(sim_target_done.path / "residuals" / "MR.fits")
    assert header["OASBACK"] == "scaled-mean"
    assert header["OAS MADE_BY"] == "thirdparty"
    assert any("scale = 2.0" in h for h in header["HISTORY"])
    assert "extract" in result
    # put the default master residual back for the other tests
    pipeline(sim_target_done.path, jobs=1)
    default = load_config(None, Registry()).backend("mr")
    assert fits.getheader(sim_target_done.path / "residuals" / "MR.fits")["OASBACK"] == default


PLUGIN_SOURCE = textwrap.dedent('''
    """A throw-away third-party plugin installed as a distribution."""
    import attrs
    import numpy as np
    from oasis_core.contracts.backends import ExtractBackend, option
    from oasis_core.contracts.hookspecs import hookimpl

    @attrs.frozen(kw_only=True)
    class PeakOptions:
        thresh: float = option(6.0, "peak threshold in sigmas")

    class PeakExtract(ExtractBackend):
        name = "peaks"
        Options = PeakOptions

        def extract(self, residual, *, options, workdir):
            from astropy.table import Table
            from scipy import ndimage
            z = residual.normalized
            peaks = (z == ndimage.maximum_filter(z, size=5)) & (z > options.thresh)
            y, x = np.nonzero(peaks)
            flux = residual.data[y, x]
            return Table({"x": x.astype(float), "y": y.astype(float), "flux": flux,
                          "flux_err": residual.noise[y, x], "peak": flux, "snr": z[y, x],
                          "a": np.ones(len(x)), "b": np.ones(len(x))})

    @hookimpl
    def oasis_extract_backends():
        yield PeakExtract()
''')


@pytest.mark.slow
def test_installed_distribution_with_entry_point_runs_in_the_pipeline(
    sim_target_done, tmp_path, monkeypatch
):
    from astropy.table import Table

    from oasis_core.engine.pipeline import pipeline

    (tmp_path / "oasis_peaks.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "oasis_peaks-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: oasis-peaks\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[oasis.plugins]\npeaks = oasis_peaks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(make_plugin_manager())
    assert registry.get("extract", "peaks").dist == "oasis-peaks"
    assert registry.get("extract", "peaks").version == "0.3"
    out = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", "plugins"],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    ).stdout
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if "│" in ln]
    [row] = [r for r in rows if r[:2] == ["extract", "peaks"]]
    assert row[3:5] == ["oasis-peaks", "0.3"]
    pipeline(sim_target_done.path, backends={"extract": "peaks"}, registry=registry, jobs=1)
    det = Table.read(sim_target_done.path / "sources" / "detections" / "MR.ecsv")
    assert det.meta["OASBACK"] == "peaks"
    assert det.meta["OASPLUG"] == "oasis-peaks==0.3"
    pipeline(sim_target_done.path, jobs=1)  # restore the default catalogs


class ConfigFileExtract(ExtractBackend):
    """A backend that reads its own configuration file and the residual's PSF."""

    name = "conf-peaks"
    user_files = ("peaks.conf", "absent.conf")

    def extract(self, residual, *, options, workdir):
        import numpy as np
        from astropy.table import Table

        thresh = float((workdir / "peaks.conf").read_text().split("=")[1])
        assert not (workdir / "absent.conf").exists()
        z = residual.normalized
        y, x = np.nonzero(z > thresh)
        fwhm = residual.psf.fwhm if residual.psf is not None else np.nan
        n = len(x)
        return Table(
            {
                "x": x.astype(float),
                "y": y.astype(float),
                "flux": residual.data[y, x],
                "snr": z[y, x],
                "psf_fwhm": np.full(n, fwhm),
                "thresh": np.full(n, thresh),
            }
        )


class ConfigFilePlugin:
    @hookimpl
    def oasis_extract_backends(self):
        yield ConfigFileExtract()


@pytest.mark.slow
def test_user_config_files_reach_the_backend_and_residuals_carry_their_psf(sim_target_done):
    from astropy.io import fits
    from astropy.table import Table

    from oasis_core.engine.pipeline import extract, pipeline

    target = sim_target_done.path
    conf = target / "configs" / "peaks.conf"
    conf.write_text("thresh = 3.5\n")
    pm = make_plugin_manager()
    pm.register(ConfigFilePlugin(), name="conffile")
    registry = Registry(pm)
    try:
        extract(target, backends={"extract": "conf-peaks"}, registry=registry, jobs=1)
        conf.write_text("thresh = 4.5\n")  # an edited file is an input: the work is redone
        extract(target, backends={"extract": "conf-peaks"}, registry=registry, jobs=1)
    finally:
        conf.unlink()
    det_dir = target / "sources" / "detections"
    name = sorted(p.stem for p in det_dir.glob("*.ecsv") if p.stem not in ("MR", "VAR"))[0]
    det = Table.read(det_dir / f"{name}.ecsv")
    mr = Table.read(det_dir / "MR.ecsv")
    assert len(det) > 0 and len(mr) > 0
    assert set(det["thresh"]) == {4.5}
    # each residual gets its science frame's PSF, the master residual the template's
    science_fwhm = fits.getheader(target / "psf" / f"{name}.psf.fits")["FWHM"]
    template_fwhm = fits.getheader(target / "templates" / "template.psf.fits")["FWHM"]
    assert det["psf_fwhm"][0] == pytest.approx(science_fwhm, rel=1e-5)
    assert mr["psf_fwhm"][0] == pytest.approx(template_fwhm, rel=1e-5)
    assert science_fwhm != pytest.approx(template_fwhm, rel=1e-3)
    pipeline(target, jobs=1)  # restore the default catalogs


# ------------------------------------------------- a backend's plain exception names it


class Buggy(MrBackend):
    """An mr backend with a plugin author's bugs."""

    name = "buggy"

    def master(self, residuals, *, options, workdir):
        return residuals[99]  # IndexError

    def extra(self):
        return "not a stage method"


class BuggySubtract(SubtractBackend):
    name = "buggy"
    needs_psf = True

    def subtract(self, science, template, *, options, workdir):
        raise StageError("a message of its own")

    def candidates(self, science, template, *, options):
        yield options
        raise ValueError("the second configuration is broken")


class BuggyCheck(MrBackend):
    name = "buggy-check"

    def check(self, options):
        raise AttributeError("no attribute 'exe'")


class BuggyPlugin:
    @hookimpl
    def oasis_mr_backends(self):
        yield Buggy()
        yield BuggyCheck()

    @hookimpl
    def oasis_subtract_backends(self):
        yield BuggySubtract()


def _frame(name):
    import numpy as np

    from oasis_core.contracts.model import Frame

    return Frame(data=np.zeros((8, 8)), name=name)


@pytest.fixture
def buggy(plugin_manager):
    plugin_manager.register(BuggyPlugin(), name="buggy")
    registry = Registry(plugin_manager)
    return (
        registry,
        registry.select("mr", "buggy", None),
        registry.select("subtract", "buggy", None),
    )


def test_a_plain_exception_in_a_stage_method_names_stage_backend_plugin_and_unit(buggy):
    from oasis_core.contracts.errors import BackendError

    registry, mr, _ = buggy
    frames = [_frame(f"f{i}") for i in range(3)]
    with pytest.raises(BackendError) as caught:
        mr.master(frames, options=None, workdir=None)
    provider = registry.get("mr", "buggy").provider
    assert str(caught.value) == (
        f"mr backend 'buggy' ({provider}) failed in master() on 3 frames (f0, f1, f2): "
        "IndexError: list index out of range"
    )
    assert isinstance(caught.value.__cause__, IndexError)
    assert mr.extra() == "not a stage method"  # other attributes are the backend's own


def test_oasis_errors_pass_and_lazy_candidates_are_guarded_too(buggy):
    from oasis_core.contracts.errors import BackendError

    _, _, sub = buggy
    frame = _frame("sci")
    with pytest.raises(StageError, match=r"^a message of its own$"):
        sub.subtract(frame, frame, options=None, workdir=None)
    tries = sub.candidates(frame, frame, options="first")
    assert next(tries) == "first"
    with pytest.raises(
        BackendError, match=r"failed in candidates\(\) on frame sci: ValueError: the second"
    ):
        next(tries)


def test_a_handle_is_its_backend_for_every_caller(buggy):
    import pickle

    from oasis_core.contracts.backends import SubtractBackend

    registry, _, sub = buggy
    assert isinstance(sub, SubtractBackend) and isinstance(sub, BuggySubtract)
    assert sub.name == "buggy" and sub.needs_psf is True and sub.Options is BuggySubtract.Options
    assert sub == registry.get("subtract", "buggy").backend
    copy = pickle.loads(pickle.dumps(sub))  # as the forkserver workers get it
    assert copy.provider == sub.provider and isinstance(copy, BuggySubtract)
    with pytest.raises(StageError, match="a message of its own"):
        copy.subtract(None, None, options=None, workdir=None)


def test_a_check_that_raises_is_unavailable_naming_the_plugin(buggy):
    registry = buggy[0]
    with pytest.raises(
        BackendUnavailable,
        match=r"^mr backend 'buggy-check' \(.*\): check\(\) failed: AttributeError: no",
    ):
        registry.select("mr", "buggy-check", None)
