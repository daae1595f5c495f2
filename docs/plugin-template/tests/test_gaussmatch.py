"""The plugin's own test: the stage contract on OASIS's simulated pair."""

from oasis_gaussmatch.backend import GaussMatch

from oasis_core.testing import check_backend, synthetic_pair


def test_contract_and_an_honest_noise_image():
    report = check_backend(GaussMatch(), "subtract")
    assert report.q > 0.9
    assert 0.9 < report.normalized_noise < 1.1


def test_a_science_frame_inside_the_template_shares_its_noise():
    pair = synthetic_pair(science_in_template=True, depth=2)  # ignored, it would give 0.86
    report = check_backend(GaussMatch(), "subtract", pair=pair)
    assert 0.9 < report.normalized_noise < 1.1
