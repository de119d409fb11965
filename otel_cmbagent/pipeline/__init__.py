"""The span pipeline below the instrumentation: what every span carries and how it is ordered.

``context`` (``oc.run``/``oc.step``, run identity, per-run order counters), ``processor``
(SequencingSpanProcessor: gapless order, depth, identity), ``semconv`` (every attribute key), ``config``
(options: argument > environment > default), ``values`` (recorded values made safe: serialisation, secrets,
the log-once guard), ``errors`` (exceptions on spans), ``listeners`` (message events for live sinks),
``open_spans`` (spans still open when the process stops).
"""
