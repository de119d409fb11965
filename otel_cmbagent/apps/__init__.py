"""What people run on top of the event table: the ``otel-cmbagent`` command, the live viewer, the demo."""
