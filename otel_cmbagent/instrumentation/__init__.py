"""AG2 instrumentation: class-level patches of the classic ``autogen`` API that open spans.

``instrumentor`` (AG2Instrumentor, what is patched), one ``*_patch`` module per AG2 surface (the span's
name and attributes from the call), ``spans`` (the guarded span lifecycle they share), ``patching`` (exactly
undoable wrapt patches), ``messages`` (AG2 messages in the GenAI shape), ``package`` (which AG2 is installed),
and the fallbacks for optional contrib packages: ``contrib`` (BaseInstrumentor) and ``threads`` (context
propagation into threads).
"""
