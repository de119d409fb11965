"""The viewer's one page: index.html with style.css and app.js inlined, under a strict Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from ...table.encoding import jsonable


def _static(name: str) -> str:
    return resources.files("otel_cmbagent.apps.viewer").joinpath("static", name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


class Page:
    """One request, no token in sub-resource URLs; the script and style allowed by hash, nothing else."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        style = _static("style.css")
        script = _static("app.js")
        template = _static("index.html")
        # JSON in a data block: '<' escaped so no value can close the element
        config_json = json.dumps(jsonable(dict(config))).replace("<", "\\u003c").replace(">", "\\u003e")
        self.body = (
            template.replace("/*__STYLE__*/", style)
            .replace("/*__SCRIPT__*/", script)
            .replace("__CONFIG_JSON__", config_json)
        ).encode("utf-8")
        self.csp = "; ".join(
            [
                "default-src 'none'",
                f"script-src '{_sha256(script)}'",
                f"style-src '{_sha256(style)}'",
                "img-src 'self' data:",
                "connect-src 'self'",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            ]
        )
