"""The status page's HTML and files: the Jinja2 template and the assets it loads, from the installed package.

The template (``status_assets/page.html``) renders every table of a snapshot
(:mod:`coldswarm.coordinator.status_data`) and carries the snapshot itself as a JSON block, from which
``status.js`` draws the charts with the vendored Chart.js (``chart.umd.min.js``, MIT, with its licence).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib import resources

import jinja2
from markupsafe import Markup

REFRESH_S = 10  # the page fetches itself again this often
#: the page's files, served from the installed package (assets dir of this package)
ASSETS = {
    "status.js": "application/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "application/javascript; charset=utf-8",
    "chart.js-LICENSE.md": "text/plain; charset=utf-8",
}
ASSETS_DIR = "status_assets"
CHART_JS_VERSION = "4.6.1"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    root = resources.files("coldswarm.coordinator").joinpath(ASSETS_DIR)
    out = {}
    for name, content_type in ASSETS.items():
        body = root.joinpath(name).read_bytes()
        out[name] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return out


def load_template() -> jinja2.Template:
    text = resources.files("coldswarm.coordinator").joinpath(ASSETS_DIR, "page.html").read_text()
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    env.filters.update(ago=_ago, utc=_utc, num=_num, dur=_dur)
    return env.from_string(text)


def _utc(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "-"


def _dur(seconds) -> str:
    if seconds is None:
        return "-"
    s = abs(float(seconds))
    text = f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
    return text


def _ago(ts) -> str:
    return f"{_dur(time.time() - ts)} ago" if ts else "-"


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def _json_for_html(data) -> str:
    """JSON that is safe inside ``<script type="application/json">`` (no ``</script>``, no ``<!--``)."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class PageRenderer:
    """Renders snapshots into the page; holds the assets, loaded once."""

    def __init__(self):
        self.assets = load_assets()
        self.template = load_template()

    def render(self, data: dict, login_error: str = "") -> str:
        return self.template.render(
            d=data,
            data_json=Markup(_json_for_html(data)),
            login_error=login_error,
            refresh_s=REFRESH_S,
            chart_js_version=CHART_JS_VERSION,
            etag={name: a.etag.strip('"')[:8] for name, a in self.assets.items()},
        )
