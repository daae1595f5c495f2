"""Real cutouts, every subtract method, the defaults: what survey alerts and targeted
follow-up give (issue 12).

63x63 science/template stamps are cut from the shared DECam and ISIS series
(:mod:`tests.cutouts`), point sources injected into the science stamp only (5-80 sigma,
on blank sky and on extended objects), plus stamps centred on real stars with nothing
injected. Each stamp is subtracted once per method through ``oasis subtract-pair
--catalog``'s code path (:func:`oasis_core.engine.pair.subtract_pair` with ``catalog``:
the extract stage's detection and the core's filters on the residual as written), and
for every method:

- no stamp is refused (an error) and none comes back fully masked;
- the injected flux is recovered within 10 % (the median ratio over the injected stamps,
  measured in the residual's PSF aperture, :func:`tests.cutouts.measure_flux`);
- of the sources injected above 10 sigma, at least 90 % are kept detections at S/N >= 5
  within 2 px;
- no star stamp has a kept detection at its centre (the star subtracts away).

The stamps are cut once per module; each method's outcomes once per method.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest

from tests.cutouts import Stamp, decam_stamps, isis_stamps, measure_flux

METHODS = ("ois", "zogy", "hotpants")

#: Injected sources of at least this expected S/N must be found.
DETECT_SNR = 10.0


@attrs.frozen
class Outcome:
    """One stamp subtracted by one method."""

    stamp: Stamp
    refused: str = ""  # the error, when the method refused the pair
    masked: bool = False  # every pixel of the residual has weight 0
    ratio: float = math.nan  # measured / injected flux (injected stamps)
    found: bool = False  # a kept detection at S/N >= 5 within 2 px of the source
    central: bool = False  # a kept detection within max(2 px, 1 FWHM) of the centre


@pytest.fixture(scope="module")
def stamps(shared_data, tmp_path_factory) -> list[Stamp]:
    out = tmp_path_factory.mktemp("cutouts")
    decam = decam_stamps(shared_data, out / "decam", per_pair={"blank": 4, "galaxy": 3, "star": 1})
    isis = isis_stamps(
        shared_data, out / "isis", frames=3, per_pair={"blank": 3, "galaxy": 2, "star": 1}
    )
    return decam + isis


def _outcome(stamp: Stamp, method: str, workdir: Path, registry: object) -> Outcome:
    from astropy.io import fits
    from astropy.table import Table

    from oasis_core.contracts.errors import OasisError
    from oasis_core.engine.pair import subtract_pair

    out, catalog = workdir / "residual.fits", workdir / "candidates.ecsv"
    try:
        residual = subtract_pair(
            stamp.science, stamp.template, out, method=method, catalog=catalog, registry=registry
        )
    except OasisError as err:
        return Outcome(stamp, refused=str(err))
    if not (residual.weight > 0).any():
        return Outcome(stamp, masked=True)
    data = np.where(residual.weight > 0, residual.data, np.nan)
    fwhm = max(stamp.fwhm, float(fits.getheader(out).get("FWHM", 0.0)))
    flux = measure_flux(data, stamp.x, stamp.y, stamp.psf, fwhm)
    table = Table.read(catalog, format="ascii.ecsv")
    kept = table[np.asarray(table["reason"]) == "kept"] if len(table) else table
    dist = np.hypot(np.asarray(kept["x"], float) - stamp.x, np.asarray(kept["y"], float) - stamp.y)
    snr = np.asarray(kept["snr"], float)
    return Outcome(
        stamp,
        ratio=flux / stamp.flux if stamp.flux > 0 else math.nan,
        found=bool(np.any((dist <= 2.0) & (snr >= 5.0))),
        central=bool(np.any(dist <= max(2.0, stamp.fwhm))),
    )


@pytest.fixture(scope="module", params=METHODS)
def outcomes(request, stamps, tmp_path_factory) -> tuple[str, list[Outcome]]:
    method = request.param
    if method == "hotpants" and shutil.which("hotpants") is None:
        pytest.skip("hotpants not on PATH (build it from https://github.com/acbecker/hotpants)")
    from oasis_core.engine.plugins import Registry

    workdir = tmp_path_factory.mktemp(f"cutouts-{method}")
    registry = Registry()
    logging.getLogger("oasis").setLevel(logging.ERROR)  # one warning per stamp otherwise
    try:
        results = [_outcome(s, method, workdir, registry) for s in stamps]
    finally:
        logging.getLogger("oasis").setLevel(logging.NOTSET)
    return method, results


def _figures(method: str, results: list[Outcome]) -> str:
    """The per-method figures, for the failure messages (and the report)."""
    injected = [o for o in results if o.stamp.kind != "star"]
    bright = [o for o in injected if o.stamp.snr > DETECT_SNR]
    stars = [o for o in results if o.stamp.kind == "star"]
    ratios = [o.ratio for o in injected if np.isfinite(o.ratio)]
    return (
        f"{method}: {len(results)} stamps, {sum(bool(o.refused) for o in results)} refused, "
        f"{sum(o.masked for o in results)} fully masked; median flux ratio "
        f"{np.median(ratios) if ratios else math.nan:.3f} over {len(ratios)} of "
        f"{len(injected)} injected; found {sum(o.found for o in bright)}/{len(bright)} above "
        f"{DETECT_SNR:g} sigma; {sum(o.central for o in stars)}/{len(stars)} star stamps "
        "with a kept detection at the centre"
    )


def test_enough_stamps_of_every_kind(stamps):
    kinds = {k: sum(s.kind == k for s in stamps) for k in ("blank", "galaxy", "star")}
    assert sum(s.kind != "star" for s in stamps) >= 30, kinds
    assert kinds["galaxy"] >= 5 and kinds["star"] >= 5, kinds
    assert {s.series for s in stamps} == {"decam", "isis"}
    assert sum(s.snr > DETECT_SNR for s in stamps) >= 20


def test_no_refusal(outcomes):
    method, results = outcomes
    refused = [f"{o.stamp.science.name}: {o.refused}" for o in results if o.refused]
    masked = [o.stamp.science.name for o in results if o.masked]
    assert not refused and not masked, (
        f"{_figures(method, results)}; refused: {refused[:3]}; masked: {masked[:5]}"
    )


def test_injected_flux_is_recovered(outcomes):
    method, results = outcomes
    ratios = [o.ratio for o in results if o.stamp.kind != "star"]
    ratios = [r if np.isfinite(r) else 0.0 for r in ratios]  # refused or masked: lost
    assert len(ratios) >= 30
    assert abs(float(np.median(ratios)) - 1.0) <= 0.10, _figures(method, results)


def test_bright_injected_sources_are_detected(outcomes):
    method, results = outcomes
    bright = [o for o in results if o.stamp.kind != "star" and o.stamp.snr > DETECT_SNR]
    found = sum(o.found for o in bright)
    assert found >= 0.9 * len(bright), _figures(method, results)


def test_real_stars_leave_no_detection(outcomes):
    method, results = outcomes
    stars = [o for o in results if o.stamp.kind == "star"]
    central = [o.stamp.science.name for o in stars if o.central]
    assert stars and not central, f"{_figures(method, results)}: {central}"
