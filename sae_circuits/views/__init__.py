"""Interactive views that open offline: self-contained HTML pages built with Bokeh (BokehJS inlined)
of a circuit (`circuit_view`), a feature (`feature_view`) and a dictionary (`dictionary_view`).
`write_page` saves one; `notebook_html` is what `_repr_html_` shows in Jupyter."""

from sae_circuits.views.circuit_html import circuit_view, node_reports
from sae_circuits.views.dictionary_html import dictionary_view
from sae_circuits.views.feature_html import feature_panel, feature_view
from sae_circuits.views.html import notebook_html, page, write_page

__all__ = [
    "circuit_view",
    "dictionary_view",
    "feature_panel",
    "feature_view",
    "node_reports",
    "notebook_html",
    "page",
    "write_page",
]
