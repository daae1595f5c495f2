"""Regenerate docs/configuration.md's key listing from the settings classes and the
installed backends' options (the tests check it is current)."""

from __future__ import annotations

from pathlib import Path

from oasis_core.engine.config import render_config
from oasis_core.engine.plugins import Registry

doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
text = doc.read_text()
head, rest = text.split("<!-- config:start -->\n", 1)
_, tail = rest.split("<!-- config:end -->", 1)
block = f"```toml\n{render_config(Registry())}```\n"
doc.write_text(f"{head}<!-- config:start -->\n{block}<!-- config:end -->{tail}")
print(f"updated {doc}")
