"""The one live server: Starlette on uvicorn, a websocket hub, and the auth/network helpers they share.

The viewer (``otel-cmbagent serve``: page, JSON API and ``/ws`` fed from the table) and
``otel_cmbagent.exporters.websocket.serve()`` (``/ws`` fed by a websocket sink's callback) are this server.
"""
