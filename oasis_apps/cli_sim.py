"""``oasis sim``: fake-source completeness (``fakes``) and false detections
(``same-field``), and the prompts of a bare ``oasis sim`` (OasisPy's SIM)."""

import logging
from typing import Annotated, Literal

import typer

from oasis_apps.cli_base import (
    PLUGINS_HINT,
    JobsOpt,
    QuietOpt,
    RichReporter,
    TargetArg,
    VerboseOpt,
    app,
    say,
    set_output,
)
from oasis_core.contracts.errors import OasisError

__all__ = ["same_field_menu", "sim", "sim_app", "sim_fakes", "sim_menu", "sim_same_field"]

log = logging.getLogger("oasis")


sim_app = typer.Typer(
    help="Simulations: fake-source completeness (fakes) and false detections (same-field).",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(sim_app, name="sim")


@sim_app.callback()
def sim(ctx: typer.Context) -> None:
    """Without a sub-command: choose a simulation and answer its prompts (OasisPy's SIM)."""
    if ctx.invoked_subcommand is None:
        sim_menu()


@sim_app.command("fakes")
def sim_fakes(
    target: TargetArg,
    n_fakes: Annotated[int, typer.Option("--n-fakes", "-n", help="Fakes per iteration.")] = 20,
    iterations: Annotated[int, typer.Option(help="Iterations (one frame each).")] = 50,
    input_mode: Annotated[
        Literal["flux", "mag"],
        typer.Option("--mode", help="Fake brightness in flux (ADU) or mag (with the zero point)."),
    ] = "flux",
    psf: Annotated[Literal["moffat", "gauss"], typer.Option("--psf", help="Fake profile.")] = (
        "moffat"
    ),
    subtract: Annotated[
        str, typer.Option("--subtract", help=f"Subtract backend ({PLUGINS_HINT}).")
    ] = "ois",
    f_min: Annotated[float, typer.Option("--f-min", help="Faintest fake (ADU or mag).")] = 0,
    f_max: Annotated[float, typer.Option("--f-max", help="Brightest fake (ADU or mag).")] = 40000,
    scale: Annotated[
        Literal["linear", "log"], typer.Option(help="Flux distribution in flux mode.")
    ] = "linear",
    zero_point: Annotated[float, typer.Option(help="Zero point when the header has none.")] = 25.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed: same fakes).")] = 0,
    adapt: Annotated[
        bool,
        typer.Option(
            help="Place half the fakes around the measured 50%/90% points (beyond --f-min/"
            "--f-max if needed); --no-adapt: all within the range."
        ),
    ] = True,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Inject fakes into TARGET's frames and measure the detection efficiency."""
    from oasis_apps.fakes import sim_fakes as run_fakes

    set_output(quiet, verbose)
    result = run_fakes(
        target,
        n_fakes=n_fakes,
        iterations=iterations,
        input_mode=input_mode,
        PSF=psf,
        subtract_method=subtract,
        f_min=f_min,
        f_max=f_max,
        flux_scale=scale,
        zero_point=zero_point,
        seed=seed,
        adapt=adapt,
        jobs=jobs,
        reporter=RichReporter(quiet),
    )
    say(f"catalog: {result.directory / 'fakes.txt'}; plot: {result.plot}")
    say(f"result: {result.line()}")


@sim_app.command("same-field")
def sim_same_field(
    location: Annotated[
        str,
        typer.Argument(help="Target (directory or name) or a FITS frame giving the sources."),
    ],
    num_ims: Annotated[int, typer.Option("--num-ims", "-n", help="Frames to render.")] = 100,
    mode: Annotated[
        Literal["moffat", "gauss", "real", "sky"],
        typer.Option(help="PSF: moffat, gauss, real (the frame's own) or sky (GalSim)."),
    ] = "moffat",
    bkg_mag: Annotated[
        float, typer.Option("--bkg-mag", help="Mean sky, mag/px (each frame within ±1.5).")
    ] = 22.5,
    fwhm_min: Annotated[float, typer.Option("--fwhm-min", help="Smallest FWHM, px.")] = 3.0,
    fwhm_max: Annotated[float, typer.Option("--fwhm-max", help="Largest FWHM, px.")] = 6.0,
    rot_min: Annotated[float, typer.Option("--rot-min", help="Smallest rotation, deg.")] = -2.5,
    rot_max: Annotated[float, typer.Option("--rot-max", help="Largest rotation, deg.")] = 2.5,
    shift_min: Annotated[float, typer.Option("--shift-min", help="Smallest x/y shift, px.")] = -2.0,
    shift_max: Annotated[float, typer.Option("--shift-max", help="Largest x/y shift, px.")] = 2.0,
    scale_mult: Annotated[
        tuple[float, float],
        typer.Option("--scale-mult", help="Interval of the multiplicative rescale a (a*image+b)."),
    ] = (0.0, 1.5),
    scale_add: Annotated[
        tuple[float, float],
        typer.Option("--scale-add", help="Interval of the additive rescale b, ADU."),
    ] = (-20.0, 50.0),
    zero_point: Annotated[
        float, typer.Option("--zero-point", help="Magnitude of 1 ADU (for the sky).")
    ] = 25.0,
    frame: Annotated[
        str | None, typer.Option(help="The real frame (default: the target's first frame).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed: same frames).")] = 0,
    jobs: JobsOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Render frames of one real frame's sources (varied seeing, sky, pointing, scale), run
    the pipeline, and count the false detections per frame."""
    from oasis_apps.samefield import sim_same_field as run_same_field

    set_output(quiet, verbose)
    result = run_same_field(
        location,
        numIms=num_ims,
        bkg_mag=bkg_mag,
        fwhm_min=fwhm_min,
        fwhm_max=fwhm_max,
        rot_min=rot_min,
        rot_max=rot_max,
        shift_min=shift_min,
        shift_max=shift_max,
        scale_mult=scale_mult,
        scale_add=scale_add,
        zero_point=zero_point,
        mode=mode,
        frame=frame,
        seed=seed,
        jobs=jobs,
        reporter=RichReporter(quiet),
    )
    say(f"table: {result.directory / 'samefield.txt'}; plot: {result.plot}")
    say(f"result: {result.line()}")


def same_field_menu() -> None:
    sim_same_field(
        typer.prompt("target or FITS frame"),
        num_ims=typer.prompt("frames to render", default=100, type=int),
        mode=typer.prompt("mode (moffat/gauss/real/sky)", default="moffat"),
        bkg_mag=typer.prompt("mean sky (mag/px)", default=22.5, type=float),
        fwhm_min=typer.prompt("FWHM lower bound", default=3.0, type=float),
        fwhm_max=typer.prompt("FWHM upper bound", default=6.0, type=float),
        rot_min=typer.prompt("minimum rotation (deg)", default=-2.5, type=float),
        rot_max=typer.prompt("maximum rotation (deg)", default=2.5, type=float),
        shift_min=typer.prompt("minimum x/y shift (px)", default=-2.0, type=float),
        shift_max=typer.prompt("maximum x/y shift (px)", default=2.0, type=float),
        scale_mult=(0.0, 1.5),
        scale_add=(-20.0, 50.0),
        zero_point=typer.prompt("zero point", default=25.0, type=float),
        frame=None,
        seed=0,
        jobs=None,
        quiet=False,
    )


def sim_menu() -> None:
    choice = typer.prompt("simulation (fakes / same-field)").strip()
    if choice == "fakes":
        target = typer.prompt("target (path or name)")
        sim_fakes(
            target,
            n_fakes=typer.prompt("fakes per iteration", default=20, type=int),
            iterations=typer.prompt("iterations", default=50, type=int),
            input_mode=typer.prompt("input mode (flux/mag)", default="flux"),
            psf=typer.prompt("PSF (moffat/gauss)", default="moffat"),
            subtract=typer.prompt("subtract method", default="ois"),
            f_min=typer.prompt("faintest fake", default=0.0, type=float),
            f_max=typer.prompt("brightest fake", default=40000.0, type=float),
            scale="linear",
            zero_point=25.0,
            seed=0,
            jobs=None,
            quiet=False,
        )
    elif choice in ("same-field", "samefield", "same_field"):
        same_field_menu()
    else:
        raise OasisError(f"unknown simulation {choice!r}; choose fakes or same-field")
