"""The core's rule on every template (oasis_core.engine.stacking): where the stack misses
frames over a source, the template is not one stack with the rest of it (issue 14)."""

from __future__ import annotations

import numpy as np

from oasis_core.contracts.model import Template, readonly
from oasis_core.engine.stacking import INCOMPLETE_SNR, incomplete_sources

SKY, NOISE = 300.0, 10.0


def star(shape, x, y, peak, fwhm=4.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sigma = fwhm / 2.3548
    return peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def template(weight, *, n=5, shape=(96, 96), seed=3):
    rng = np.random.default_rng(seed)
    data = SKY + rng.normal(0, NOISE, shape)
    data += star(shape, 30, 30, 5000.0)  # bright: 500 sigma
    data += star(shape, 70, 70, 5000.0)
    data += star(shape, 30, 70, 4.0 * NOISE)  # faint: 4 sigma
    t = Template(
        data=data.astype(np.float32),
        weight=np.asarray(weight, np.float32),
        inputs=tuple(f"f{i}" for i in range(n)),
        background=SKY,
        noise=NOISE,
    )
    readonly(t.data)
    readonly(t.weight)
    return t


def patch(weight, x, y, value, r=3):
    weight[y - r : y + r + 1, x - r : x + r + 1] = value


def test_a_star_missing_frames_is_masked_and_nothing_else():
    w = np.ones((96, 96))
    patch(w, 30, 30, 0.6)  # 3 of 5 frames over a bright star (saturated in the other two)
    patch(w, 50, 20, 0.2)  # one frame on the sky (a bleed trail in the others)
    patch(w, 30, 70, 0.4)  # two frames over a faint star
    w[0:3, :] = 0  # no data: stays 0, not counted
    found = incomplete_sources(template(w))
    core = star(w.shape, 30, 30, 5000.0) > INCOMPLETE_SNR * NOISE
    patch_30 = np.zeros(w.shape, bool)
    patch_30[27:34, 27:34] = True
    np.testing.assert_array_equal(found, patch_30 & core)
    assert found.sum() > 20


def test_complete_stacks_and_small_weight_differences_are_left_alone():
    w = np.ones((96, 96))
    patch(w, 30, 30, 0.95)  # 5 % lower, under HOLE_FRACTION: complete
    assert not incomplete_sources(template(w)).any()


def test_the_full_weight_is_the_stacks_own_not_one():
    # a backend whose weights are relative (every complete pixel at 0.4): only the pixels
    # below that level count as missing frames
    w = np.full((96, 96), 0.4)
    patch(w, 70, 70, 0.24)
    found = incomplete_sources(template(w))
    assert found[70, 70]
    assert not found[:, :50].any()


def test_a_frame_missing_over_a_star_in_a_stack_of_three():
    w = np.ones((96, 96))
    patch(w, 70, 70, 2 / 3)  # the saturated core of the sharpest frame of three
    found = incomplete_sources(template(w, n=3))
    assert found[70, 70]
    assert found.sum() == 49  # the whole 7x7 patch is bright


def test_one_frame_of_many_missing_over_a_star_is_not_a_hole():
    # a cosmic ray masked in one frame of 14: the median stack's PSF is the same
    w = np.ones((96, 96))
    patch(w, 30, 30, 13 / 14)
    assert not incomplete_sources(template(w, n=14)).any()


def test_a_dither_edge_across_a_star_is_a_step_not_a_hole():
    # frames offset by 30 px: the left part has 3 of 5 frames, the edge crosses a star
    w = np.ones((96, 96))
    w[:, :30] = 0.6
    found = incomplete_sources(template(w))
    assert not found.any()
    # the same star in a hole of the coverage is one
    w = np.ones((96, 96))
    patch(w, 30, 30, 0.6)
    assert incomplete_sources(template(w))[30, 30]


def test_judge_residual_masks_the_residual_there_and_a_fwhm_around():
    # the rule applies to every backend's residual; the backend's pixels are left as
    # they are (its kernel was fitted as before), only their weight is 0
    from scipy.ndimage import binary_dilation

    from oasis_core.contracts.model import Residual
    from oasis_core.engine.subtraction import judge_residual

    w = np.ones((96, 96))
    patch(w, 30, 30, 0.6)
    t = template(w)
    rng = np.random.default_rng(4)
    residual = Residual(
        data=rng.normal(0, 1, w.shape),
        noise=np.ones(w.shape),
        weight=np.ones(w.shape),
        q=0.99,
        meta={"fwhm": 4.0},
    )
    judged = judge_residual(residual, "r", 0.5, template=t)
    found = incomplete_sources(t)
    # and within 1 FWHM (4 px) of them: as far as the kernel and the PSF carry them
    yy, xx = np.mgrid[-4:5, -4:5]
    reach = binary_dilation(found, structure=xx**2 + yy**2 <= 16)
    np.testing.assert_array_equal(judged.weight == 0, reach)
    np.testing.assert_array_equal(judged.data, residual.data)
    assert judged.meta["incomplete_masked"] == int(reach.sum()) > found.sum() > 20
    assert judged.meta["usable"]
    assert residual.weight.all()  # the input is not changed
    complete = judge_residual(residual, "r", 0.5, template=template(np.ones(w.shape)))
    assert complete.weight.all() and complete.meta["incomplete_masked"] == 0


def frames_for(fwhms, missing, shape=(96, 96)):
    """Frames of the given seeing; frame ``missing`` has weight 0 in a patch at (30, 30)."""
    from oasis_core.contracts.model import Frame

    out = []
    for i, fwhm in enumerate(fwhms):
        w = np.ones(shape, np.float32)
        if i == missing:
            patch(w, 30, 30, 0.0)
        out.append(Frame(data=np.zeros(shape, np.float32), weight=w, fwhm=fwhm, name=f"f{i}"))
    return out


def test_psf_change_is_what_the_missing_frames_seeing_does_to_a_median_peak():
    from oasis_core.engine.stacking import psf_change

    fwhms = [3.0, 3.3, 3.6, 3.9, 4.2]
    peak = 1 / np.asarray(fwhms) ** 2
    sharpest = psf_change(frames_for(fwhms, 0))
    # the sharpest frame missing: the median of the other four (3.6 and 3.9's mean)
    expected = np.median(peak[1:]) / np.median(peak) - 1
    assert sharpest[30, 30] == np.float32(expected) and expected < -0.07
    assert (sharpest[~(sharpest != 0)] == 0).all() and (sharpest != 0).sum() == 49
    middle = psf_change(frames_for(fwhms, 2))  # a frame of the median seeing: less
    assert 0 < abs(middle[30, 30]) < abs(expected) / 2
    assert psf_change(frames_for(fwhms, None)).any() == False  # noqa: E712 - all there
    assert psf_change(frames_for([3.0, None, 3.6], 0)) is None  # a seeing not known


def test_one_frame_of_five_missing_is_a_hole_when_its_seeing_changes_the_star():
    # a star saturated in the sharpest frame only: 4 of 5 frames (under HOLE_FRACTION,
    # so the count alone does not see it) stack a core ~10 % fainter; the master
    # residual and the variability image of a null night showed it at 15-20 sigma
    from oasis_core.engine.stacking import psf_change

    w = np.ones((96, 96))
    patch(w, 30, 30, 0.8)
    fwhms = [3.0, 3.3, 3.6, 3.9, 4.2]
    t = template(w)
    assert not incomplete_sources(t).any()  # no seeing known: the count rule
    found = incomplete_sources(t, change=psf_change(frames_for(fwhms, 0)))
    assert found[30, 30] and found.sum() > 20 and not found[60:, :].any()
    # a frame of typical seeing missing changes the star less: its core alone
    faint = incomplete_sources(t, change=psf_change(frames_for(fwhms, 2)))
    assert faint[30, 30] and faint.sum() < found.sum()


def test_the_template_keeps_its_holes_and_every_residual_is_masked_by_them(tmp_path):
    # judged once, when the template is combined (the core's combine runner), read with
    # the template by every subtraction task: not judged again per frame
    import attrs

    from oasis_core.contracts.model import Residual
    from oasis_core.engine import io
    from oasis_core.engine.stacking import psf_change
    from oasis_core.engine.subtraction import judge_residual

    w = np.ones((96, 96))
    patch(w, 30, 30, 0.8)
    t = template(w)
    holes = incomplete_sources(t, change=psf_change(frames_for([3.0, 3.3, 3.6, 3.9, 4.2], 0)))
    t = attrs.evolve(t, holes=holes)
    io.write_frame(tmp_path / "template.fits", t)
    back = io.read_output_frame(tmp_path / "template.fits", cls=Template)
    np.testing.assert_array_equal(back.holes, holes)
    assert back.holes.sum() > 20 and back.inputs == ()  # OASTIN cards are the runner's
    plain = io.read_output_frame(tmp_path / "template.fits")  # a Frame: the data and weight
    np.testing.assert_array_equal(plain.weight, t.weight)
    ones = np.ones(w.shape)
    residual = Residual(data=ones, noise=ones, weight=ones, q=0.99, meta={"fwhm": 2.0})
    judged = judge_residual(residual, "r", 0.5, template=back)
    assert (judged.weight[holes] == 0).all() and judged.meta["incomplete_masked"] > holes.sum()
    # the count rule alone (no holes recorded) does not see one frame of five missing
    alone = judge_residual(residual, "r", 0.5, template=attrs.evolve(back, holes=None))
    assert alone.meta["incomplete_masked"] == 0
    np.testing.assert_array_equal(back.holes, holes)  # judging left the template's mask
