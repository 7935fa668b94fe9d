"""Render the jinja2 trees under image/templates/ into a target directory."""
from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_tree(tree: str, dest: Path, context: dict) -> list[str]:
    """Render every *.j2 under templates/<tree> to dest/<same path without .j2>.

    A template that renders to only whitespace is not written: that is how a profile leaves a
    file out. Returns the relative paths written.
    """
    src = TEMPLATES / tree
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(src)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    written = []
    for path in sorted(src.rglob("*.j2")):
        rel = path.relative_to(src).as_posix()
        text = env.get_template(rel).render(**context)
        if not text.strip():
            continue
        out = dest / rel[: -len(".j2")]
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_symlink():
            out.unlink()
        out.write_text(text)
        written.append(rel[: -len(".j2")])
    return written
