"""Regenerate docs/cli.md's command reference from the typer app (the tests check it is
current): every command, argument and option, with the help text `--help` shows, plus
the deprecated spellings that `--help` hides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
START = "<!-- cli:start -->\n"
END = "<!-- cli:end -->"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _usage(path: str, cmd: Any) -> str:
    pieces = [path, "[OPTIONS]"]
    for p in cmd.params:
        if p.param_type_name != "argument":
            continue
        name = p.name.upper()
        if p.nargs == -1:
            name += "..."
        pieces.append(name if p.required else f"[{name}]")
    if getattr(cmd, "commands", None):
        bare = getattr(cmd, "invoke_without_command", False)
        pieces.append("[COMMAND [ARGS]...]" if bare else "COMMAND [ARGS]...")
    return " ".join(pieces)


def _command(path: str, cmd: Any, ctx: Any, seen: dict[str, str]) -> list[str]:
    """The section of one command; a command identical to one already written (another
    name for it) gets one line saying so."""
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    shown = [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]
    hidden = [p for p in cmd.params if p.param_type_name == "option" and p.hidden]
    items = []
    for p in arguments:
        default = "" if p.required or p.default is None else f" [default: {p.default}]"
        items.append(f"- `{p.name.upper()}`: {_one_line(p.help)}{default}")
    for p in shown:
        record = p.get_help_record(ctx)
        if record is not None:
            items.append(f"- `{record[0]}`: {_one_line(record[1])}")
    for p in hidden:
        flags = ", ".join([*p.opts, *p.secondary_opts])
        items.append(f"- `{flags}` (hidden from `--help`): {_one_line(p.help)}")
    usage = _usage(path, cmd).removeprefix(path)
    key = "\n".join([_one_line(cmd.help), usage, *items])
    lines = [f"### `{path}`", ""]
    if key in seen:
        return [*lines, f"The same command as `{seen[key]}`.", ""]
    seen[key] = path
    lines += [_one_line(cmd.help), "", "```", _usage(path, cmd), "```", ""]
    return [*lines, *items, ""] if items else lines


def render() -> str:
    """The generated part of docs/cli.md, as markdown."""
    import typer

    from oasis_apps.cli import app

    root = typer.main.get_command(app)
    out: list[str] = []
    seen: dict[str, str] = {}

    def walk(path: str, cmd: Any, parent: Any) -> None:
        ctx = cmd.context_class(cmd, info_name=path.split()[-1], parent=parent)
        out.extend(_command(path, cmd, ctx, seen))
        for name, sub in getattr(cmd, "commands", {}).items():
            if not sub.hidden:
                walk(f"{path} {name}", sub, ctx)

    walk("oasis", root, None)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}{render()}{END}{tail}")
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
