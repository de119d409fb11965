# Two commands do everything on a fresh machine:
#   make demo      - set up a virtualenv and run the demo (embedded scripted LLM, SQLite file, no API key)
#   make test      - set up both classic AG2 lines (ag2 0.14.0 and cmbagent-autogen 0.0.91.post11) and run the whole
#                    suite on each, the AG2 1.x tests on ag2 1.2.1, then the install tests (the built wheel into fresh
#                    virtualenvs, resolution next to cmbagent) once: ~15 min and ~2 GB (four virtualenvs, Chromium,
#                    PostgreSQL, Phoenix); installs Debian's
#                    postgresql and chromium when missing (root or sudo). The CI command.
#   make test-fast - day to day: the ag2 line only, without PostgreSQL, Chromium, Phoenix, the install tests and the
#                    slowest subprocess tests (markers postgres/browser/phoenix/install/slow); no system packages
PYTHON ?= python3
VENV   ?= .venv
AG2    := $(VENV)/ag2
FORK   := $(VENV)/cmbagent
AG2X   := $(VENV)/ag2x
PHOENIX := $(VENV)/phoenix
PHOENIX_SPEC ?= arize-phoenix==20.26.1
# Arize Phoenix, a real trace backend for tests/test_phoenix_e2e.py, runs from its own virtualenv
# (its dependencies are not the project's). The test skips without it, and fails under CI.
export OTEL_CMBAGENT_PHOENIX ?= $(abspath $(PHOENIX))/bin/phoenix
PYTEST_ARGS ?= -q -rs
# Python 3.12 for the resolution test next to cmbagent (which needs >= 3.12); pyenv's shim needs the version.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
export OTEL_CMBAGENT_PYTHON312 ?= $(PYTHON312)
CMBAGENT_SPEC ?= cmbagent==0.0.1.post63

.PHONY: demo test test-fast test-ag2 test-cmbagent test-ag2x test-install install-next-to-cmbagent bench clean system-deps
FAST_MARKERS := not install and not postgres and not browser and not phoenix and not slow

# The suite starts a throwaway PostgreSQL cluster (initdb/pg_ctl) and drives Debian's Chromium
# (Playwright cannot download its own browser here): install them from Debian when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing postgresql"; $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; fi
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing chromium"; $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; fi

# The two lines also cover both OpenTelemetry set-ups: ag2 with the contrib base class (extra [contrib]) and the
# newest wrapt (2.x); the fork with neither (built-in base and thread propagation) and wrapt 1.x.
$(AG2)/.ready: pyproject.toml
	$(PYTHON) -m venv $(AG2)
	$(AG2)/bin/pip install -q --disable-pip-version-check -e ".[ag2,contrib,dev]"
	touch $@

$(FORK)/.ready: pyproject.toml
	$(PYTHON) -m venv $(FORK)
	$(FORK)/bin/pip install -q --disable-pip-version-check -e ".[cmbagent,dev]" "wrapt < 2"
	touch $@

# AG2 1.x (module `ag2`, no `autogen`): its own TelemetryMiddleware makes the spans; the tests marked ag2x
# (tests/test_ag2x.py) check everything downstream of them. They run only here (the classic lines skip the module).
$(AG2X)/.ready: pyproject.toml
	$(PYTHON) -m venv $(AG2X)
	$(AG2X)/bin/pip install -q --disable-pip-version-check -e ".[dev]" "ag2[openai,tracing]==1.2.1"
	touch $@

$(PHOENIX)/.ready:
	$(PYTHON) -m venv $(PHOENIX)
	$(PHOENIX)/bin/pip install -q --disable-pip-version-check "$(PHOENIX_SPEC)"
	touch $@

demo: $(AG2)/.ready
	$(AG2)/bin/otel-cmbagent demo

test-fast: $(AG2)/.ready
	$(AG2)/bin/pytest $(PYTEST_ARGS) -m "$(FAST_MARKERS)"

test-ag2: $(AG2)/.ready $(PHOENIX)/.ready
	$(AG2)/bin/pytest $(PYTEST_ARGS)

test-cmbagent: $(FORK)/.ready $(PHOENIX)/.ready
	$(FORK)/bin/pytest $(PYTEST_ARGS)

# tests/test_packaging.py (marker "install", deselected in the two runs above): builds the wheel, installs it
# into fresh virtualenvs (newest pip) bare and next to each AG2 line, and resolves it next to cmbagent.
test-ag2x: $(AG2X)/.ready
	$(AG2X)/bin/pytest $(PYTEST_ARGS) -m ag2x tests/test_ag2x.py

test-install: $(AG2)/.ready
	$(AG2)/bin/pytest $(PYTEST_ARGS) -m install tests/test_packaging.py

# Not in CI (~2 GB, ~8 min): really install this project next to cmbagent on Python 3.12, then import both.
install-next-to-cmbagent:
	rm -rf $(VENV)/next-to-cmbagent && $(PYTHON312) -m venv $(VENV)/next-to-cmbagent
	$(VENV)/next-to-cmbagent/bin/pip install -q --disable-pip-version-check "$(CMBAGENT_SPEC)" "mistralai < 2" .
	$(VENV)/next-to-cmbagent/bin/python -c "from importlib.metadata import version; import cmbagent, otel_cmbagent as oc; \
	  patched = oc.instrument().patched_attributes; assert patched, 'AG2 not instrumented'; \
	  print(*(f'{name} {version(name)}' for name in ('cmbagent', 'otel-cmbagent', 'wrapt')), len(patched), 'AG2 attributes patched')"

# Both lines; the second runs even if the first fails, and the target fails if either did.
test: system-deps $(AG2)/.ready $(FORK)/.ready $(AG2X)/.ready $(PHOENIX)/.ready
	@status=0; \
	echo "== ag2 0.14.0"; $(MAKE) --no-print-directory test-ag2 || status=1; \
	echo "== cmbagent-autogen 0.0.91.post11"; $(MAKE) --no-print-directory test-cmbagent || status=1; \
	echo "== ag2 1.2.1 (AG2 1.x)"; $(MAKE) --no-print-directory test-ag2x || status=1; \
	echo "== install tests"; $(MAKE) --no-print-directory test-install || status=1; \
	exit $$status

bench: $(AG2)/.ready
	$(AG2)/bin/python benchmarks/bench_overhead.py --sinks
	$(AG2)/bin/python benchmarks/bench_hot_path.py
	$(AG2)/bin/python benchmarks/bench_sinks.py
	$(AG2)/bin/python benchmarks/bench_viewer.py
	$(AG2)/bin/python benchmarks/bench_cli.py
	$(AG2)/bin/python benchmarks/bench_hardening.py
	$(AG2)/bin/python benchmarks/bench_processes.py
	$(AG2)/bin/python benchmarks/bench_metrics.py
	$(AG2)/bin/python benchmarks/bench_instructions.py

clean:
	rm -rf $(VENV)
