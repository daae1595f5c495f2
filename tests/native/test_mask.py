"""Tests of the ``native`` mask backend, :mod:`oasis_native.mask`."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest
from astropy.io import fits
from oasis_native.mask import NativeMask, NativeMaskOptions, saturation_level
from oasis_native.sim import SimSeries, simulate_series

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, readonly

SHAPE = (256, 256)
BACKEND = NativeMask()
OPTIONS = NativeMaskOptions()


def _frame(data: np.ndarray, header: fits.Header, name: str = "sim") -> Frame:
    return Frame(
        data=readonly(np.array(data)),
        header=header,
        name=name,
        gain=header["GAIN"],
        readnoise=header["RDNOISE"],
        saturation=header["SATURATE"],
    )


def _mask(frame: Frame, tmp_path: Path, **options: object) -> Frame:
    return BACKEND.mask(frame, options=attrs.evolve(OPTIONS, **options), workdir=tmp_path)


@pytest.fixture(scope="module")
def series() -> SimSeries:
    return simulate_series(3, SHAPE, seed=21, n_transients=2)


@pytest.fixture(scope="module")
def no_cosmics() -> SimSeries:
    return simulate_series(3, SHAPE, seed=21, n_transients=2, cosmic_rays=False)


def test_cosmic_rays_flagged_saturation_masked(
    series: SimSeries, no_cosmics: SimSeries, tmp_path: Path
) -> None:
    from scipy import ndimage

    for name, (data, header), (data_clean, _) in zip(
        series.names, series.frames, no_cosmics.frames, strict=True
    ):
        frame = _frame(data, header, name)
        out = _mask(frame, tmp_path)
        masked = out.weight == 0
        cosmic = data != data_clean  # the injected cosmic-ray pixels
        assert cosmic.sum() >= 10
        assert masked[cosmic].mean() > 0.8
        assert masked.mean() < 0.02
        assert out.meta["n_cosmic"] >= 0.8 * cosmic.sum()
        # saturated cores and bleed trails, grown by a pixel or two
        sat = data >= header["SATURATE"]
        assert sat.any()
        assert masked[sat].all()
        assert masked[ndimage.binary_dilation(sat)].all()
        assert out.meta["n_saturated"] > sat.sum()
        assert out.meta["saturation"] == header["SATURATE"]
        assert out.meta["masked_fraction"] == pytest.approx(masked.mean())
        assert out.weight.dtype == np.float32
        assert set(np.unique(out.weight)) <= {0.0, 1.0}
        # transients are not cosmic rays
        here = series.truth[series.truth["frame"] == name]
        iy, ix = np.rint(here["y"]).astype(int), np.rint(here["x"]).astype(int)
        assert (out.weight[iy, ix] == 1).all()
        # the input frame is untouched
        np.testing.assert_array_equal(frame.data, data)
        assert (frame.weight == 1).all()


def test_few_false_positives_without_cosmic_rays(tmp_path: Path) -> None:
    from scipy import ndimage

    clean = simulate_series(3, SHAPE, seed=21, n_transients=2, cosmic_rays=False, hot_pixels=False)
    for data, header in clean.frames:
        out = _mask(_frame(data, header), tmp_path)
        # star cores, the galaxy and the transients are not taken for cosmic rays...
        assert out.meta["n_cosmic"] < 0.0002 * data.size
        # ...and all that is masked belongs to the saturated stars
        near_saturated = ndimage.binary_dilation(data >= header["SATURATE"], iterations=25)
        assert not (out.weight[~near_saturated] == 0).any()


def _cosmic_score(
    masked: np.ndarray, cosmic: np.ndarray, usable: np.ndarray
) -> tuple[float, float]:
    """(fraction of the cosmic rays whose every pixel is masked, fraction of the good
    pixels masked): a cosmic ray is a connected group of injected pixels, counted when it
    lies on ``usable`` pixels (not on a saturated star); good pixels are the usable ones
    that no cosmic ray hit."""
    from scipy import ndimage

    groups, n = ndimage.label(cosmic, structure=np.ones((3, 3), bool))
    on_usable = ndimage.minimum(usable, groups, index=np.arange(1, n + 1)).astype(bool)
    caught = ndimage.minimum(masked, groups, index=np.arange(1, n + 1)).astype(bool)
    good = usable & ~cosmic
    return float(caught[on_usable].mean()), float(masked[good].mean())


def test_injected_cosmic_rays_caught_good_pixels_kept(tmp_path: Path) -> None:
    # the same frames with and without cosmic rays (hot pixels, which are masked as cosmic
    # rays are, left out of both)
    kwargs = {"seed": 5, "n_transients": 2, "hot_pixels": False}
    hit = simulate_series(6, SHAPE, **kwargs)
    clean = simulate_series(6, SHAPE, cosmic_rays=False, **kwargs)
    masked, cosmic, usable = [], [], []
    for (data, header), (data_clean, _) in zip(hit.frames, clean.frames, strict=True):
        frame = _frame(data, header)
        masked.append(_mask(frame, tmp_path).weight == 0)
        usable.append(_mask(frame, tmp_path, cosmics=False).weight > 0)  # saturation apart
        cosmic.append(data != data_clean)
    masked_all, cosmic_all, usable_all = (np.concatenate(a) for a in (masked, cosmic, usable))
    assert cosmic_all.sum() >= 150  # about 80 cosmic rays of 1-5 pixels
    caught, good_masked = _cosmic_score(masked_all, cosmic_all, usable_all)
    assert caught >= 0.95, caught  # measured: 1.0
    assert good_masked <= 0.001, good_masked  # measured: 1.1e-4
    # the score can fail: nothing masked, or everything near a cosmic ray masked
    assert _cosmic_score(np.zeros_like(masked_all), cosmic_all, usable_all)[0] == 0
    from scipy import ndimage

    blunt = ndimage.binary_dilation(cosmic_all, iterations=3) & usable_all
    assert _cosmic_score(blunt, cosmic_all, usable_all)[1] > 0.001


def test_sky_subtracted_frames_masked_the_same(series: SimSeries, tmp_path: Path) -> None:
    subtracted = simulate_series(3, SHAPE, seed=21, n_transients=2, sky_subtracted=True)
    for (data, header), (data_sub, header_sub) in zip(
        series.frames, subtracted.frames, strict=True
    ):
        with_sky = _mask(_frame(data, header), tmp_path)
        without = _mask(_frame(data_sub, header_sub), tmp_path)
        assert abs(without.meta["n_cosmic"] - with_sky.meta["n_cosmic"]) <= max(
            3, 0.1 * with_sky.meta["n_cosmic"]
        )
        agree = (with_sky.weight == 0) == (without.weight == 0)
        assert agree.mean() > 0.999


def test_incoming_weight_kept(series: SimSeries, tmp_path: Path) -> None:
    data, header = series.frames[0]
    data = data.copy()
    data[10:20, 30:40] = np.nan
    weight = np.ones(SHAPE, np.float32)
    weight[100:110, :] = 0.0  # a bad-pixel mask from the file
    weight[200, 200] = 0.5
    frame = attrs.evolve(
        _frame(data, header), weight=readonly(weight), data=readonly(data), meta={"keep": 1}
    )
    out = _mask(frame, tmp_path, cosmics=False)
    assert (out.weight[10:20, 30:40] == 0).all()
    assert (out.weight[100:110] == 0).all()
    assert out.weight[200, 200] == 0.5  # intermediate weights survive
    assert out.meta["keep"] == 1
    assert out.meta["n_cosmic"] == 0
    assert np.isnan(frame.data[10:20, 30:40]).all()  # input untouched


def test_too_many_cosmic_rays_is_an_error(series: SimSeries, tmp_path: Path) -> None:
    data, header = series.frames[0]
    frame = attrs.evolve(_frame(data, header), name="noisy_frame")
    with pytest.raises(StageError, match=r"'noisy_frame'.*cosmic rays would mask"):
        _mask(frame, tmp_path, max_cosmic_fraction=1e-5)


def test_saturation_level() -> None:
    data = np.arange(100, dtype=np.float32).reshape(10, 10)
    good = np.ones(data.shape, bool)
    assert saturation_level(data, good, 5000.0) == 5000.0
    assert saturation_level(data, good, None) is None  # a single maximum pixel
    data[:2, :3] = 1000.0  # a clipping plateau
    assert saturation_level(data, good, None) == pytest.approx(980.0)
    assert saturation_level(data, good, None, plateau_pixels=7) is None


@pytest.mark.parametrize("name", ["DEC-OBS04e", "DEC-OBS18a"])
def test_decam_sky_subtracted(name: str, tmp_path: Path, shared_data: Path) -> None:
    path = shared_data / "decam_n6" / f"{name}.mini.fits"
    header = fits.getheader(path)
    data = fits.getdata(path).astype("float32")
    frame = Frame(
        data=readonly(data),
        header=header,
        name=name,
        gain=(header["GAINA"] + header["GAINB"]) / 2,
        readnoise=(header["RDNOISEA"] + header["RDNOISEB"]) / 2,
        saturation=(header["SATURATA"] + header["SATURATB"]) / 2,
    )
    out = _mask(frame, tmp_path)
    assert out.meta["masked_fraction"] < 0.05
    if name == "DEC-OBS04e":
        assert out.meta["n_cosmic"] > 0  # real hits are found
    else:
        # no hits here: the sharpest pixels are stars'; the core of the one 4 pixels from
        # the left edge is no cosmic ray (astroscrappy alone, its median filters not
        # computed there, took it for one)
        assert (out.weight[123:129, 3:6] == 1).all()
    assert out.weight.shape == data.shape


def test_isis_without_gain_or_saturation(tmp_path: Path, shared_data: Path) -> None:
    data = fits.getdata(shared_data / "isis_example" / "infile0.fits").astype("float32")
    frame = Frame(data=readonly(data), name="infile0")
    assert frame.gain is frame.readnoise is frame.saturation is None
    out = _mask(frame, tmp_path)
    assert np.isnan(out.meta["saturation"])  # no clipping plateau: nothing saturated
    assert out.meta["n_saturated"] == 0
    assert out.meta["masked_fraction"] < 0.02  # a crowded field is not cosmic rays


@pytest.mark.parametrize("index", [4, 5])
def test_properimage_saturated_stars(index: int, tmp_path: Path, shared_data: Path) -> None:
    data = fits.getdata(shared_data / "properimage_null" / f"aligned_eso085-030-00{index}.fit")
    data = data.astype("float32")
    frame = Frame(data=readonly(data), name=f"eso-{index}")  # no SATURATE in the header
    out = _mask(frame, tmp_path)
    saturated = data >= 65535
    assert saturated.sum() > 50
    assert (out.weight[saturated] == 0).all()
    assert out.meta["saturation"] == pytest.approx(0.98 * 65535)
    assert out.meta["masked_fraction"] < 0.02


def test_bleed_trails_masked_other_columns_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(100.0, 5.0, (120, 90)).astype(np.float32)
    data[50:54, 40:43] = 1000.0  # a saturated core
    data[20:50, 41] = 400.0  # its bleed trail, above the noise up to the core
    data[54:70, 41] = 400.0
    data[20:70, 70] = 400.0  # a bright column that touches no saturated pixel
    frame = Frame(data=readonly(data), name="bleed", saturation=1000.0, gain=1.0)
    out = _mask(frame, tmp_path, cosmics=False, saturation_grow=0)
    masked = out.weight == 0
    assert masked[20:70, 41].all()
    assert masked[50:54, 40:43].all()
    assert not masked[:, 70].any()
    assert out.meta["n_saturated"] == 12 + 30 + 16
    no_bleed = _mask(frame, tmp_path, cosmics=False, saturation_grow=0, bleed=False)
    assert no_bleed.meta["n_saturated"] == 12


def test_windows_give_the_whole_frame_mask(series: SimSeries, tmp_path: Path) -> None:
    # an odd shape (partial blocks and strips), bad pixels and a NaN patch
    data, header = series.frames[1]
    data = np.array(data[3:250, 5:243])
    data[60:64, 100:103] = np.nan
    weight = np.ones(data.shape, np.float32)
    weight[:, 17] = 0.0
    frame = attrs.evolve(_frame(data, header), data=readonly(data), weight=readonly(weight))
    fast = _mask(frame, tmp_path)
    whole = _mask(frame, tmp_path, cosmic_windows=False)
    assert fast.meta["n_cosmic"] >= 10
    np.testing.assert_array_equal(fast.weight, whole.weight)
    assert fast.meta == whole.meta
