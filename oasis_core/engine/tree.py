"""The directory layout OASIS works in.

``oasis init ROOT`` creates ``ROOT/OASIS/{targets,simulations,temp,archive}``. A target
``ROOT/OASIS/targets/NAME/`` holds::

    configs/    oasis.toml (every key, its default and a comment) and last_run.toml
    data/       the input frames, copied in by `oasis get --unpack` (never modified)
    masks/      weight maps from the mask stage
    psf/        PSF models and psf.ecsv (FWHM, S/N per frame)
    aligned/    frames registered onto the reference grid
    templates/  template.fits and log.txt
    residuals/  residuals, their noise, MR.fits and log.txt
    sources/    sources.txt, filtered_sources.txt, MR_*.txt, total_sources.txt (+ ECSV)
    archive/    frames set aside by the psf stage (moved, never deleted) and log.txt
    .work/      scratch: run-<id>/ for the run holding the target (removed when it ends)
    .oasis.lock the lock of the run working on the target (see :mod:`oasis_core.engine.lock`)

Nothing is written outside the target (scratch included; ``OASIS/temp`` is not used).
Where stage outputs go is decided here only (:meth:`Target.stage_dir`). A
:class:`Target` may carry a *variant*: then the stages from the first one whose backend
choice varies onwards write under ``compare/<variant>/`` and the shared upstream outputs
stay where they are, so outputs of different backend choices live side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from oasis_core.contracts.errors import InputError
from oasis_core.contracts.stages import StageNames, StageTable, get_stage, stage_names

__all__ = [
    "ROOT_DIRS",
    "STAGE_DIRS",
    "TARGET_DIRS",
    "WRITTEN_DIRS",
    "Target",
    "find_target",
    "init_root",
]

ROOT_DIRS = ("targets", "simulations", "temp", "archive")
TARGET_DIRS = ("configs", "data", "psf", "templates", "residuals", "sources", "archive")
#: Stage name to its output folder: a view of :mod:`oasis_core.contracts.stages`.
STAGE_DIRS: Mapping[str, str] = StageTable(lambda stage: stage.folder)


def _written_dirs() -> tuple[str, ...]:
    return tuple(
        dict.fromkeys(
            [*(d for d in TARGET_DIRS if d != "data"), *STAGE_DIRS.values(), "compare", ".work"]
        )
    )


#: The folders of a target a run writes in (``data/`` is only read, except that the psf
#: stage moves outliers out of it when it can); every stage's folder included.
WRITTEN_DIRS: Sequence[str] = StageNames(_written_dirs)


def init_root(root: Path) -> Path:
    """Create ``root/OASIS`` and its sub-directories; return the ``OASIS`` directory."""
    base = Path(root) / "OASIS"
    for name in ROOT_DIRS:
        (base / name).mkdir(parents=True, exist_ok=True)
    return base


@attrs.frozen
class Target:
    """A target directory and where each stage keeps its outputs.

    Parameters
    ----------
    path : Path
        The target directory (``.../OASIS/targets/NAME``).
    variant : str, optional
        Name of a backend combination whose outputs live in ``compare/<variant>/``.
    variant_from : str
        First stage whose outputs belong to the variant.
    """

    path: Path = attrs.field(converter=lambda p: Path(p).resolve())
    variant: str | None = None
    variant_from: str = "subtract"

    @property
    def name(self) -> str:
        return self.path.name

    def create(self) -> Target:
        """Create the target's directories (idempotent)."""
        for name in TARGET_DIRS:
            (self.path / name).mkdir(parents=True, exist_ok=True)
        return self

    @property
    def configs(self) -> Path:
        return self.path / "configs"

    @property
    def config_file(self) -> Path:
        return self.configs / "oasis.toml"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def archive(self) -> Path:
        return self.path / "archive"

    def stage_dir(self, stage: str) -> Path:
        """Directory for ``stage``'s outputs (under ``compare/<variant>/`` when it varies)."""
        names = stage_names()
        base = self.path
        if self.variant and names.index(stage) >= names.index(self.variant_from):
            base = self.path / "compare" / self.variant
        return base / get_stage(stage).folder

    @property
    def work(self) -> Path:
        """The target's scratch area, ``.work/`` inside it (partial downloads wait there;
        a run's own scratch is
        :func:`oasis_core.engine.lock.scratch_dir`)."""
        return self.path / ".work"


def find_target(spec: str | Path) -> Target:
    """Resolve a target given as a path or as a name under ``./OASIS/targets``.

    Raises
    ------
    InputError
        When neither exists.
    """
    path = Path(spec)
    if path.is_dir():
        return Target(path)
    for base in (Path.cwd() / "OASIS" / "targets", Path.cwd() / "targets"):
        if (base / str(spec)).is_dir():
            return Target(base / str(spec))
    raise InputError(
        f"target {spec!s}: no such directory (give a path, or a name under ./OASIS/targets)"
    )
