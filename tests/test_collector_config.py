"""Static checks of the shipped OpenTelemetry Collector pipeline and its docker compose example.

There is no collector binary or Docker engine on the test machines, so these tests parse
the YAML and check what `otelcol validate` / `docker compose config` would catch first:
undefined components, processor order, receiver bind addresses, exporter hosts that are
not compose services, and the files compose mounts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COLLECTOR_CONFIG = ROOT / "collector-config.yaml"
EXAMPLES = ROOT / "examples"
COMPOSE_FILE = EXAMPLES / "docker-compose.yaml"
COLLECTOR_SERVICE = "otel-collector"

# Pipeline elements and the top-level sections they may be defined in
# (a connector is both the exporter of one pipeline and the receiver of another).
_PIPELINE_SECTIONS = {
    "receivers": ("receivers", "connectors"),
    "processors": ("processors",),
    "exporters": ("exporters", "connectors"),
}
# Exporter types whose `endpoint` is a network address of another service.
_NETWORK_EXPORTERS = {"otlp", "otlp_grpc", "otlphttp", "otlp_http", "zipkin"}


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _component_type(component_id: str) -> str:
    """`otlp/jaeger` -> `otlp`: the part before the first slash names the component type."""
    return component_id.split("/", 1)[0]


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    # A component with no settings is written `debug:` and loads as None; a section can too.
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def check_config(config: dict[str, Any]) -> list[str]:
    """Problems a collector would reject at startup, or that break this project's conventions.

    * every component a pipeline references is defined at top level (an id `type/name`
      counts as defined only when that exact key exists), and so is every service extension;
    * every pipeline has at least one receiver and one exporter;
    * `memory_limiter` is the first processor and `batch` the last in every pipeline.
    """
    problems: list[str] = []
    if not isinstance(config, dict):
        return ["config is not a mapping"]
    service = config.get("service")
    if not isinstance(service, dict):
        return ["no `service` section"]

    extensions = _section(config, "extensions")
    for ext in service.get("extensions") or []:
        if ext not in extensions:
            problems.append(f"service extension {ext!r} is not defined under `extensions`")

    pipelines = service.get("pipelines")
    if not isinstance(pipelines, dict) or not pipelines:
        problems.append("service has no pipelines")
        return problems

    for pipeline_id, pipeline in pipelines.items():
        pipeline = pipeline or {}
        for kind, sections in _PIPELINE_SECTIONS.items():
            for component in pipeline.get(kind) or []:
                if not any(component in _section(config, s) for s in sections):
                    problems.append(
                        f"pipeline {pipeline_id!r}: {kind[:-1]} {component!r} is not defined under `{sections[0]}`"
                    )
        for kind in ("receivers", "exporters"):
            if not pipeline.get(kind):
                problems.append(f"pipeline {pipeline_id!r} has no {kind}")

        processors = list(pipeline.get("processors") or [])
        if not processors or _component_type(processors[0]) != "memory_limiter":
            problems.append(
                f"pipeline {pipeline_id!r}: memory_limiter must be the first processor (got {processors})"
            )
        if not processors or _component_type(processors[-1]) != "batch":
            problems.append(f"pipeline {pipeline_id!r}: batch must be the last processor (got {processors})")
    return problems


def _endpoint_host(endpoint: str) -> str | None:
    """Host of `jaeger:4317`, `http://tempo:4318`, `0.0.0.0:4317` or `[::]:4317`."""
    parsed = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    return parsed.hostname


def _endpoint_port(endpoint: str) -> int | None:
    parsed = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    return parsed.port


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, short (`src:dst[:mode]`) or long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume.get("target", ""))))
        else:
            parts = str(volume).split(":")
            if len(parts) >= 2:
                mounts.append((parts[0], parts[1]))
    return mounts


def _published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs, short (`[ip:]host:container[/proto]`) or long syntax."""
    published = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                published.add((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/", 1)[0].split(":")
        if len(parts) >= 2:
            published.add((int(parts[-2]), int(parts[-1])))
    return published


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _load(COLLECTOR_CONFIG)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE_FILE)


# --- all YAML parses -------------------------------------------------------------

_YAML_FILES = sorted([COLLECTOR_CONFIG, *EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml")])


@pytest.mark.parametrize("path", _YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    assert isinstance(_load(path), dict), f"{path} does not hold a YAML mapping"


def test_expected_files_exist() -> None:
    for path in (COLLECTOR_CONFIG, COMPOSE_FILE, EXAMPLES / "tempo.yaml", EXAMPLES / "grafana-datasources.yaml"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


# --- the collector pipeline ------------------------------------------------------


def test_collector_config_has_no_problems(config: dict[str, Any]) -> None:
    assert check_config(config) == []


def test_traces_pipeline_shape(config: dict[str, Any]) -> None:
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"] == ["memory_limiter", "batch"]
    assert set(traces["exporters"]) == {"otlp/jaeger", "otlp/tempo", "debug"}
    assert config["service"]["extensions"] == ["health_check"]


def test_check_config_reports_broken_config(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    traces = broken["service"]["pipelines"]["traces"]
    traces["exporters"] = [*traces["exporters"], "otlp/zipkin"]  # never defined
    traces["processors"] = ["batch", "memory_limiter"]  # wrong order
    broken["service"]["extensions"] = ["health_check", "pprof"]  # pprof never defined

    problems = check_config(broken)

    assert any("'otlp/zipkin'" in p and "not defined" in p for p in problems), problems
    assert any("memory_limiter must be the first" in p for p in problems), problems
    assert any("batch must be the last" in p for p in problems), problems
    assert any("'pprof'" in p for p in problems), problems
    assert len(problems) == 4, problems


def test_check_config_matches_component_ids_exactly(config: dict[str, Any]) -> None:
    # `otlp/jaeger` is defined; bare `otlp` (another instance of the same type) is not.
    broken = copy.deepcopy(config)
    broken["service"]["pipelines"]["traces"]["exporters"] = ["otlp"]
    assert check_config(broken) == ["pipeline 'traces': exporter 'otlp' is not defined under `exporters`"]


def test_check_config_requires_both_processors(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    broken["service"]["pipelines"]["traces"]["processors"] = []
    problems = check_config(broken)
    assert len(problems) == 2 and all("processor" in p for p in problems), problems


def test_otlp_receiver_binds_all_interfaces(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    for protocol, port in (("grpc", 4317), ("http", 4318)):
        endpoint = protocols[protocol]["endpoint"]
        assert _endpoint_host(endpoint) == "0.0.0.0", f"{protocol} receiver binds {endpoint}"
        assert _endpoint_port(endpoint) == port, f"{protocol} receiver binds {endpoint}"


def test_health_check_binds_all_interfaces(config: dict[str, Any]) -> None:
    assert config["extensions"]["health_check"]["endpoint"] == "0.0.0.0:13133"


def test_memory_limiter_settings(config: dict[str, Any]) -> None:
    limiter = config["processors"]["memory_limiter"]
    assert limiter["check_interval"]
    assert 0 < limiter["spike_limit_percentage"] < limiter["limit_percentage"] <= 100


def test_exporters_point_at_compose_services(config: dict[str, Any], compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    checked = 0
    for exporter_id, settings in _section(config, "exporters").items():
        if _component_type(exporter_id) not in _NETWORK_EXPORTERS:
            continue
        host = _endpoint_host(settings["endpoint"])
        assert host in services, f"exporter {exporter_id!r} sends to {host!r}, not a service in {COMPOSE_FILE.name}"
        checked += 1
    assert checked >= 2  # jaeger and tempo


# --- the compose example ---------------------------------------------------------


def test_compose_collector_mounts_config_and_publishes_otlp(compose: dict[str, Any]) -> None:
    collector = compose["services"][COLLECTOR_SERVICE]
    assert "opentelemetry-collector-contrib" in collector["image"]
    assert not collector["image"].endswith(":latest") and ":" in collector["image"], "pin the collector image"

    mounts = dict(_mounts(collector))
    assert "../collector-config.yaml" in mounts, mounts
    assert (COMPOSE_FILE.parent / "../collector-config.yaml").resolve() == COLLECTOR_CONFIG
    # the mount target must be the file the collector is told to load
    target = mounts["../collector-config.yaml"]
    command = collector.get("command") or []
    command = command.split() if isinstance(command, str) else command
    assert not command or any(target in arg for arg in command), (target, command)

    ports = _published_ports(collector)
    for port in (4317, 4318, 13133):
        assert (port, port) in ports, f"collector does not publish {port}: {ports}"


def test_compose_publishes_ui_ports(compose: dict[str, Any]) -> None:
    assert (16686, 16686) in _published_ports(compose["services"]["jaeger"])
    assert (3000, 3000) in _published_ports(compose["services"]["grafana"])
    # only the collector owns the OTLP ports on the host
    for name, service in compose["services"].items():
        if name != COLLECTOR_SERVICE:
            assert not {h for h, _ in _published_ports(service)} & {4317, 4318}, name


def _mounted_file(compose: dict[str, Any], service: str, target_suffix: str) -> Path:
    for source, target in _mounts(compose["services"][service]):
        if target.endswith(target_suffix) and source.startswith("."):
            return (COMPOSE_FILE.parent / source).resolve()
    raise AssertionError(f"service {service!r} mounts no local file at *{target_suffix}")


def test_compose_tempo_config_exists_and_receives_otlp(compose: dict[str, Any]) -> None:
    tempo = compose["services"]["tempo"]
    command = tempo.get("command") or []
    command = command.split() if isinstance(command, str) else command
    config_arg = next(arg for arg in command if arg.startswith("-config.file="))
    path = _mounted_file(compose, "tempo", config_arg.split("=", 1)[1])
    assert path.is_file(), path

    tempo_config = _load(path)
    grpc = tempo_config["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]
    assert grpc["endpoint"] == "0.0.0.0:4317"
    assert tempo_config["storage"]["trace"]["backend"] == "local"


def test_compose_grafana_datasources(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    environment = grafana.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    assert str(environment.get("GF_AUTH_ANONYMOUS_ENABLED")).lower() == "true"
    assert environment.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Admin"

    path = _mounted_file(compose, "grafana", "/provisioning/datasources/datasources.yaml")
    datasources = _load(path)["datasources"]
    by_type = {ds["type"]: ds for ds in datasources}
    assert {"tempo", "jaeger"} <= set(by_type)
    services = set(compose["services"])
    for ds in datasources:
        assert _endpoint_host(ds["url"]) in services, ds["url"]
