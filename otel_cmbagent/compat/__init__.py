"""Drop-in for cmbagent's ``cmbagent.execution.event_capture`` and ``ag2_hooks``, built on the span pipeline.

    # before
    from cmbagent.execution.event_capture import EventCaptureManager, get_event_captor, set_event_captor
    from cmbagent.execution.ag2_hooks import install_ag2_hooks, uninstall_ag2_hooks, patch_code_executor
    # after
    from otel_cmbagent.compat import (EventCaptureManager, get_event_captor, set_event_captor,
                                      install_ag2_hooks, uninstall_ag2_hooks, patch_code_executor)

``event_capture`` (EventCaptureManager: cmbagent's capture API), ``captor_spans`` (the current captor, and each
capture as a span), ``attributes`` (a capture's arguments as span attributes), ``ag2_hooks`` (install/uninstall),
``pipeline`` (where a captor's spans go: its own sinks, from its db_session and callbacks).
"""

from .ag2_hooks import (
    install_ag2_hooks,
    patch_code_executor,
    patch_conversable_agent,
    patch_group_chat,
    uninstall_ag2_hooks,
)
from .captor_spans import get_event_captor, set_event_captor
from .event_capture import EventCaptureManager

__all__ = [
    "EventCaptureManager",
    "get_event_captor",
    "install_ag2_hooks",
    "patch_code_executor",
    "patch_conversable_agent",
    "patch_group_chat",
    "set_event_captor",
    "uninstall_ag2_hooks",
]
