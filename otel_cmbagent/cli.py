"""The ``otel-cmbagent`` command (filled in by the CLI work)."""


def main() -> None:  # pragma: no cover - placeholder until the CLI lands
    raise SystemExit("otel-cmbagent: CLI not available yet")
