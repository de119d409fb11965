"""Real services the tests and benchmarks run against: PostgreSQL, Arize Phoenix, OTLP receivers."""
