"""Self-contained HTML from Bokeh documents: BokehJS and every style inlined (no CDN, opens offline),
written atomically, or wrapped in an iframe for Jupyter."""

from __future__ import annotations

import html
import os
from pathlib import Path

from bokeh.document import Document
from bokeh.embed import file_html
from bokeh.resources import INLINE


def page(document: Document) -> str:
    """The document as one HTML page (titled by `document.title`) with BokehJS inlined."""
    return file_html(document, INLINE, document.title or "sae-circuits")


def write_page(document: Document, path: str | Path) -> Path:
    """Write `page(document)` to `path` through a temporary file, so it is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page(document), encoding="utf-8")
    os.replace(tmp, path)
    return path


def notebook_html(document: Document, height: int = 760) -> str:
    """The page in an iframe (`srcdoc`): what `_repr_html_` returns, so that Jupyter runs its
    scripts apart from the notebook's and from other views' (BokehJS loaded once per view)."""
    return (
        f'<iframe srcdoc="{html.escape(page(document), quote=True)}" '
        f'style="width:100%;height:{height}px;border:0"></iframe>'
    )
