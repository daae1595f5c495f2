"""Probes of values out of range: every option (file, command line), the numeric arguments
of ``oasis demo``, ``oasis sim`` and ``oasis compare``. Each is refused before any work,
in one line naming where, the key, the value and its range."""

from __future__ import annotations

from tests.integration.probe_kit import Probe, Workspace


def _config(text: str):
    def setup(ws: Workspace) -> None:
        (ws.target / "configs" / "oasis.toml").write_text(text)

    return setup


def _isis_config(text: str):
    def setup(ws: Workspace) -> None:
        path = ws.dir / "pair" / "default_config"
        path.write_text(text)
        ws.inputs.append(path)

    return setup


def _run(*options: str):
    return lambda ws: ["run", ws.target, "-q", "-j", "1", *options]


PROBES = [
    # ---------------------------------------------------------------- the command line
    Probe(
        id="config-q-floor-nan",
        argv=_run("-o", "subtract.q_floor=nan"),
        stderr=r"^error: command line: \[subtract\] q_floor = nan: must be a finite number in "
        r"\[0, 1\]$",
    ),
    Probe(
        id="config-sigclip-negative",
        argv=_run("-o", "mask.native.sigclip=-4.5"),
        stderr=r"^error: command line: \[mask.native\] sigclip = -4.5: must be a finite number "
        r"> 0$",
    ),
    Probe(
        id="config-jobs-negative",
        argv=_run("-j", "-5"),
        stderr=r"^error: command line: \[run\] jobs = -5: must be an integer >= 0$",
    ),
    Probe(
        id="config-ois-stamps-zero",
        argv=_run("-o", "subtract.ois.nstamps_x=0"),
        stderr=r"\[subtract.ois\] nstamps_x = 0: must be an integer >= 1$",
    ),
    Probe(
        id="config-fraction-inf",
        argv=_run("-o", "combine.fraction=inf"),
        stderr=r"\[combine\] fraction = inf: must be a finite number in \(0, 1\]$",
    ),
    Probe(
        id="config-unknown-choice",
        argv=_run("-o", "align.reference=best"),
        stderr=r"\[align\] reference = 'best': must be one of snr, seeing$",
    ),
    Probe(
        id="config-pair-option",
        argv=lambda ws: [
            "subtract-pair",
            ws.science,
            ws.template,
            ws.dir / "out.fits",
            "-o",
            "sigma_clip=-1",
        ],
        stderr=r"command line: \[subtract.ois\] sigma_clip = -1.0: must be a finite number > 0$",
    ),
    # ---------------------------------------------------------------- configs/oasis.toml
    Probe(
        id="config-file-q-floor-nan",
        setup=_config("[subtract]\nq_floor = nan\n"),
        argv=_run(),
        stderr=r"configs/oasis.toml: \[subtract\] q_floor = nan: must be a finite number in "
        r"\[0, 1\]$",
    ),
    Probe(
        id="config-file-backend-option",
        setup=_config("[extract.native]\nthresh = -3.0\n"),
        argv=_run(),
        stderr=r"configs/oasis.toml: \[extract.native\] thresh = -3.0: must be a finite number "
        r"> 0$",
    ),
    Probe(
        id="config-file-wrong-type",
        setup=_config("[run]\nmin_frames = 'three'\n"),
        argv=_run(),
        stderr=r"configs/oasis.toml: \[run\] min_frames = 'three': must be an integer >= 1$",
    ),
    # ---------------------------------------------------------------- a file an option names
    Probe(
        id="config-isis-file-value",
        setup=_isis_config("ngauss 4\n"),
        argv=lambda ws: [
            "subtract-pair",
            ws.science,
            ws.template,
            ws.dir / "out.fits",
            "-o",
            f"isis_config={ws.dir / 'pair' / 'default_config'}",
            "-o",
            "subtract.optimize=false",
        ],
        stderr=r"default_config: ngauss = 4: must be an integer in \[1, 3\] "
        r"\(subtract.ois.isis_config\)$",
    ),
    # ---------------------------------------------------------------- oasis demo
    Probe(
        id="demo-size-zero",
        argv=lambda ws: ["demo", ws.dir / "demo", "--size", "0", "-q"],
        stderr=r"^error: oasis demo: size = 0: must be an integer >= 256$",
    ),
    Probe(
        id="demo-frames-zero",
        argv=lambda ws: ["demo", ws.dir / "demo", "--frames", "0", "-q"],
        stderr=r"^error: oasis demo: frames = 0: must be an integer >= 3$",
    ),
    Probe(
        id="demo-too-large-for-memory",
        argv=lambda ws: ["demo", ws.dir / "demo", "--size", "1000000", "-q"],
        stderr=r"^error: oasis demo: --size 1000000 with --frames 12 and \d+ worker\(s\) needs "
        r"about [\d.]+ PB of memory; this machine has [\d.]+ [GT]B: use --size \d+ or less$",
    ),
    Probe(
        id="demo-seed-negative",
        argv=lambda ws: ["demo", ws.dir / "demo", "--seed", "-1", "-q"],
        stderr=r"^error: oasis demo: seed = -1: must be an integer >= 0$",
    ),
    # ---------------------------------------------------------------- oasis sim, compare
    Probe(
        id="sim-fakes-none",
        argv=lambda ws: ["sim", "fakes", ws.target, "--n-fakes", "0", "-q"],
        stderr=r"^error: oasis sim fakes: n_fakes = 0: must be an integer in \[1, 1000\]$",
    ),
    Probe(
        id="sim-fakes-no-iterations",
        argv=lambda ws: ["sim", "fakes", ws.target, "--iterations", "0", "-q"],
        stderr=r"^error: oasis sim fakes: iterations = 0: must be an integer >= 1$",
    ),
    Probe(
        id="sim-fakes-flux-order",
        argv=lambda ws: ["sim", "fakes", ws.target, "--f-min", "500", "--f-max", "100", "-q"],
        stderr=r"^error: oasis sim fakes: f_max = 100.0: must be a finite number > f_min "
        r"\(500.0\)$",
    ),
    Probe(
        id="sim-fakes-flux-nan",
        argv=lambda ws: ["sim", "fakes", ws.target, "--f-min", "nan", "-q"],
        stderr=r"^error: oasis sim fakes: f_min = nan: must be a finite number >= 0$",
    ),
    Probe(
        id="sim-same-field-fwhm",
        argv=lambda ws: ["sim", "same-field", ws.target, "--fwhm-min", "0", "-q"],
        stderr=r"^error: oasis sim same-field: fwhm_min = 0.0: must be a finite number > 0$",
    ),
    Probe(
        id="sim-same-field-order",
        argv=lambda ws: ["sim", "same-field", ws.target, "--rot-min", "3", "-q"],
        stderr=r"^error: oasis sim same-field: rot_max = 2.5: must be a finite number >= "
        r"rot_min \(3.0\)$",
    ),
    Probe(
        id="compare-fakes-negative",
        argv=lambda ws: ["compare", ws.target, "--subtract", "ois,zogy", "--fakes", "-3", "-q"],
        stderr=r"^error: oasis compare: fakes = -3: must be an integer in \[0, 1000\]$",
    ),
]
