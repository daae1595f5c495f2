"""Regenerate the configuration block of README.md from the installed backends' Options."""

from __future__ import annotations

from pathlib import Path

from oasis_core.config import render_config
from oasis_core.plugins import Registry

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- config:start -->\n", 1)
_, tail = rest.split("<!-- config:end -->", 1)
block = f"```toml\n{render_config(Registry())}```\n"
readme.write_text(f"{head}<!-- config:start -->\n{block}<!-- config:end -->{tail}")
print(f"updated {readme}")
