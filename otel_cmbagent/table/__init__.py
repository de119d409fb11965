"""The event table: cmbagent's ``execution_events`` format and everything that reads or maps it.

The sinks (``otel_cmbagent.exporters``) write it, the store, the CLI and the viewer read it; all of them
import the format from here.
"""
