"""Render the jinja2 trees under image/templates/ into a target directory."""
from __future__ import annotations

from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_tree(tree: str, dest: Path, context: dict, overlay: Path | None = None) -> list[str]:
    """Render every *.j2 under templates/<tree> to dest/<same path without .j2>.

    `overlay` is a user's directory laid out like templates/: its files replace or add to
    the built-in ones. A template that renders to only whitespace is not written: that is
    how a profile leaves a file out. Returns the relative paths written.
    """
    roots = [overlay / tree] if overlay is not None and (overlay / tree).is_dir() else []
    roots.append(TEMPLATES / tree)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(r) for r in roots]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    written = []
    rels = sorted({p.relative_to(r).as_posix() for r in roots for p in r.rglob("*.j2")})
    for rel in rels:
        text = env.get_template(rel).render(**context)
        if not text.strip():
            continue
        out = dest / rel[: -len(".j2")]
        out.parent.mkdir(parents=True, exist_ok=True)
        # Replace, never write in place: the tree may share inodes with a cache entry.
        if out.exists() or out.is_symlink():
            out.unlink()
        out.write_text(text)
        written.append(rel[: -len(".j2")])
    return written
