"""The live run viewer: web page, JSON API and ``/ws`` over the event table, on the live server.

``app`` (create_app: routes, guard, hub), ``api`` (HTTP handlers), ``feed`` (polling the table, broadcasting
changes), ``source`` (the database), ``page`` (the inlined page and its CSP), ``server`` (ViewerServer,
serve_viewer), ``static/`` (HTML, CSS, plain JS).
"""

from ...server.net import check_bind
from .app import create_app
from .server import ViewerServer, serve_viewer

__all__ = ["ViewerServer", "check_bind", "create_app", "serve_viewer"]
