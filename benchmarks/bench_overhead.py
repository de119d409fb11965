"""Overhead of otel-cmbagent: per-span processor cost, AG2 chat wall time, span data size.

Run:  make bench      (= .venv/ag2/bin/python benchmarks/bench_overhead.py)
      .venv/ag2/bin/python benchmarks/bench_overhead.py --quick    (smoke run, a few seconds)

Every ratio is against a baseline measured in the same run; timings are printed, never asserted.

1. Per-span cost of ``SequencingSpanProcessor`` at 1, 2 and 8 threads: the same loop
   (spans started under a per-thread parent, inside one ``oc.run()`` shared by all
   threads) on a bare SDK provider, on SDK + SimpleSpanProcessor(InMemorySpanExporter),
   and on that plus our processor first. Also "ours, no oc.run" (per-trace counters).
2. Wall time of scripted zero-latency AG2 chats (two agents, 60-char replies, never
   TERMINATE; and a 4-agent round-robin GroupChat) in three modes: uninstrumented,
   ours (``oc.instrument(capture_content=True)`` + ``oc.run()``), and AG2's own
   ``autogen.opentelemetry`` (``instrument_agent`` on every agent +
   ``instrument_llm_wrapper(capture_messages=True)``). ``instrument_llm_wrapper`` patches
   ``OpenAIWrapper.create`` for good, so every mode runs in its own child process
   (this script re-invoked with ``--child MODE``, which prints JSON); modes are
   interleaved round by round (5 rounds, 3 for the longest chat); each cell keeps its best. Note the
   uninstrumented time itself grows faster than linearly with turns (the openai SDK
   re-transforms the whole history on every call), which flattens any per-turn overhead.
   With ``--sinks`` two more modes run in the same rounds: "ours+sinks" = ``setup_tracing(sql_url=<SQLite file>,
   otlp=True, capture_content=True)`` (SQL rows written live, OTLP/HTTP to a loopback receiver in another process)
   and "AG2+OTLP" = AG2's own tracing with the SDK's ``BatchSpanProcessor(OTLPSpanExporter)`` to the same receiver:
   each tracing's full pipeline, the agent's wall time (the sinks write on their threads meanwhile). 2b also gives
   med×, the median over rounds of each round's own ratio. ``--paired TURNS --repeats N`` runs only the TURNS-turn
   chat in those three modes (uninstrumented, both full pipelines; ``--modes`` adds "ours", "ag2" and "ours+otlp"),
   N rounds (the order rotating), and prints each round's ours − AG2's (part 2c), timed to the chat's end and to
   the end of ``force_flush`` (every span delivered: ours writes rows during the chat, a 5 s OTLP batch exports
   after it). There each mode has a warmed-up process, and the processes take turns chat by chat, so a round's
   chats lie seconds apart (this host's speed drifts by ±20% within a minute); every ``--rounds-per-process``
   rounds (10) a fresh set of processes takes over, since a process may keep a speed of its own for its life.
   ``MODE#TAG`` runs MODE once more in processes of its own (``--modes plain,plain#2,...``: an A/A pair, whose
   difference is what the design shows when nothing differs). Each chat is flushed after
   it is timed, so no chat's backlog runs into the next one's time. It also prints the agent thread's context
   switches during the chat (Linux): the times it gave up its CPU — to the scripted server, or to a sink thread
   taking the GIL. Not a clock, but it moves between runs too (with which core each thread lands on).
3. Span data size per run (json.dumps of every span attribute value and span event
   attribute value), ours vs AG2-native, and its growth from the shortest to the longest chat.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_cmbagent as oc
from otel_cmbagent.tracing import DEFAULT_MAX_EVENTS_PER_SPAN

SPAN_TARGET_US = 3.0
MODES = ("plain", "ours", "ag2")
SINK_MODES = ("ours+sinks", "ag2+otlp")
PAIRED_MODES = MODES + SINK_MODES + ("ours+otlp",)


# --- 1. per-span processor cost ------------------------------------------------------------
@contextlib.contextmanager
def _public_api_only():
    """The processor without its private reach-in (reading and writing ``span._attributes._dict``): the fallback
    it takes on an SDK whose span keeps no such dict (``span.attributes`` / ``span.set_attributes``)."""
    from otel_cmbagent.pipeline import processor

    saved = processor._raw_attributes, processor._write_attributes

    def write(span, identity, order, depth):
        span.set_attributes({**(identity or {}), processor.semconv.EXECUTION_ORDER: order,
                             processor.semconv.DEPTH: depth})

    processor._raw_attributes, processor._write_attributes = (lambda span: getattr(span, "attributes", None)), write
    try:
        yield
    finally:
        processor._raw_attributes, processor._write_attributes = saved


def _provider(config: str) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    if config.startswith("ours"):
        provider.add_span_processor(oc.SequencingSpanProcessor())
    if config != "bare":
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _time_spans(config: str, threads: int, total: int) -> tuple[float, float]:
    """(wall µs, process-CPU µs) per span for ``total`` spans split over ``threads`` threads."""
    provider, exporter = _provider(config)
    tracer = provider.get_tracer("bench")
    per_thread = total // threads
    barrier = threading.Barrier(threads + 1)
    attributes = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "engineer"}

    def work() -> None:
        with tracer.start_as_current_span("parent"):
            barrier.wait()
            for _ in range(per_thread):
                tracer.start_span("child", attributes=attributes).end()

    scope = contextlib.nullcontext() if config == "ours, no oc.run" else oc.run(name="bench")
    public = _public_api_only() if config == "ours, public API" else contextlib.nullcontext()
    with scope, public:
        workers = [threading.Thread(target=oc.propagate_context(work)) for _ in range(threads)]
        gc.collect()
        for worker in workers:
            worker.start()
        barrier.wait()
        start, cpu_start = time.perf_counter(), time.process_time()
        for worker in workers:
            worker.join()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    exporter.clear()
    provider.shutdown()
    return elapsed / (per_thread * threads) * 1e6, cpu / (per_thread * threads) * 1e6


def bench_spans(total: int, repeats: int) -> None:
    configs = ("bare", "sdk+mem", "ours", "ours, no oc.run", "ours, public API")
    thread_counts = (1, 2, 8)
    best = {(c, t): float("inf") for c in configs for t in thread_counts}
    best_cpu = dict(best)
    for config in configs:  # warm-up: first-use costs (imports, caches) are not per-span costs
        _time_spans(config, 2, total // 4)
    for _ in range(repeats):  # interleaved, best of `repeats`
        for threads in thread_counts:
            for config in configs:
                wall, cpu = _time_spans(config, threads, total)
                best[config, threads] = min(best[config, threads], wall)
                best_cpu[config, threads] = min(best_cpu[config, threads], cpu)
    print(f"1. Per-span cost, µs/span (wall; {total:,} spans per cell split over the threads, best of {repeats};"
          " Δ cpu = the same difference on process CPU time)")
    head = ("threads", "bare SDK", "SDK+in-mem", "ours", "Δ vs in-mem", "Δ cpu", "ours×", "ours no-run",
            "Δ no-run", "public API", "Δ cpu saved", "≤+3µs?")
    print("  " + "".join(f"{h:>12}" for h in head))
    for t in thread_counts:
        bare, mem, ours, norun, public = (best[c, t] for c in configs)
        delta_cpu = best_cpu["ours", t] - best_cpu["sdk+mem", t]
        saved_cpu = best_cpu["ours, public API", t] - best_cpu["ours", t]
        cells = (t, f"{bare:.2f}", f"{mem:.2f}", f"{ours:.2f}", f"{ours - mem:+.2f}", f"{delta_cpu:+.2f}",
                 f"{ours / mem:.2f}", f"{norun:.2f}", f"{norun - mem:+.2f}", f"{public:.2f}", f"{saved_cpu:+.2f}",
                 "yes" if ours - mem <= SPAN_TARGET_US else "NO")
        print("  " + "".join(f"{c:>12}" for c in cells))
    print(f"  target: ours - (SDK+in-mem) ≤ +{SPAN_TARGET_US:.0f} µs/span (wall). 'public API': the processor without"
          " its reach-in into span._attributes._dict; 'Δ cpu saved' what the reach-in saves per span\n")


@contextlib.contextmanager
def _receiver(wanted: bool):
    """An OTLP/HTTP receiver in a child process for the --sinks modes (the one bench_sinks uses); "" if not wanted."""
    if not wanted:
        yield ""
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_sinks import child_receiver

    with child_receiver("http") as (endpoint, _poll):
        yield endpoint


# --- 2/3. AG2 chats, one child process per mode per round ---------------------------------
def _attr_bytes(attributes) -> int:
    return sum(len(json.dumps(v, default=str)) for v in (attributes or {}).values())


def _span_stats(exporter: InMemorySpanExporter | None) -> dict:
    if exporter is None:
        return {"bytes": 0, "spans": 0, "events": 0, "dropped_events": 0}
    spans = exporter.get_finished_spans()
    size = sum(_attr_bytes(s.attributes) + sum(_attr_bytes(e.attributes) for e in s.events) for s in spans)
    return {"bytes": size, "spans": len(spans), "events": sum(len(s.events) for s in spans),
            "dropped_events": sum(s.dropped_events for s in spans)}


def _child_provider(mode: str, exporter: InMemorySpanExporter | None, endpoint: str) -> TracerProvider:
    """The tracer provider of a mode, with its processors, AG2 instrumented by ours or by AG2's own."""
    # The span event limit setup_tracing() uses (the SDK default of 128 drops old messages of long chats).
    tp = TracerProvider(span_limits=SpanLimits(max_events=DEFAULT_MAX_EVENTS_PER_SPAN))
    if mode in ("ours+sinks", "ours+otlp"):  # ours+otlp: AG2's sink alone, like for like with ag2+otlp
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
        sql_url = f"sqlite:///{tempfile.mkdtemp()}/events.db" if mode == "ours+sinks" else None
        return oc.setup_tracing(sql_url=sql_url, otlp=True, capture_content=True, set_global=False,
                                handle_sigterm=False).tracer_provider
    if mode == "ours":
        tp.add_span_processor(oc.SequencingSpanProcessor())
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        oc.instrument(tracer_provider=tp, capture_content=True)
    elif mode.startswith("ag2"):
        from autogen.opentelemetry import instrument_llm_wrapper
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from otel_cmbagent.exporters.otlp import make_otlp_exporter

        if mode == "ag2+otlp":
            tp.add_span_processor(BatchSpanProcessor(make_otlp_exporter("http/protobuf", endpoint)))
        else:
            tp.add_span_processor(SimpleSpanProcessor(exporter))
        instrument_llm_wrapper(tracer_provider=tp, capture_messages=True)
    return tp


def _context_switches() -> int:
    """The calling thread's context switches so far (Linux; 0 elsewhere): each time it gave up its CPU, e.g. to
    wait for the GIL another thread holds."""
    try:
        with open("/proc/thread-self/status") as status:  # voluntary_ctxt_switches, nonvoluntary_ctxt_switches
            return sum(int(line.split(":")[1]) for line in status if "ctxt_switches:" in line)
    except OSError:
        return 0


@contextlib.contextmanager
def chat_runner(mode: str, endpoint: str = ""):
    """A function running one workload (``chat50``, ``group60``) in ``mode`` and returning its figures, in a fresh
    scripted server and working directory; lazy imports and clients warmed up by a 2-turn chat and a short group chat."""
    from autogen import AssistantAgent, ConversableAgent, GroupChat, GroupChatManager
    from otel_cmbagent.testing.scripted_llm import ScriptedLLM, text

    logging.getLogger("autogen.oai.client").setLevel(logging.ERROR)
    exporter = InMemorySpanExporter() if mode in ("ours", "ag2") else None
    tp = _child_provider(mode, exporter, endpoint)
    if mode.startswith("ag2"):
        from autogen.opentelemetry import instrument_agent

    def prepare(agents: list) -> list:
        if mode.startswith("ag2"):
            for agent in agents:
                instrument_agent(agent, tracer_provider=tp)
        return agents

    def build(workload: str, cfg: dict):
        kind = workload.rstrip("0123456789")
        n = int(workload[len(kind):])
        if kind == "chat":
            a, b = prepare([ConversableAgent(name, llm_config=cfg, human_input_mode="NEVER") for name in "ab"])
            return lambda: a.initiate_chat(b, message="Start the analysis. " * 3, max_turns=n, silent=True)
        members = [AssistantAgent(f"agent{i}", llm_config=cfg, human_input_mode="NEVER") for i in range(4)]
        group = GroupChat(members, messages=[], max_round=n, speaker_selection_method="round_robin")
        manager, = prepare(members + [GroupChatManager(group, llm_config=False)])[-1:]
        return lambda: members[0].initiate_chat(manager, message="Start the analysis. " * 3, silent=True)

    def run(workload: str) -> dict:
        chat = build(workload, cfg)
        scope = oc.run(name=workload) if mode.startswith("ours") else contextlib.nullcontext()
        gc.collect()
        switches = _context_switches()
        start, cpu_start = time.perf_counter(), time.process_time()
        with scope:
            chat()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        switches = _context_switches() - switches
        if tp is not None:  # everything delivered (ours writes rows during the chat; a 5 s batch exports later)
            tp.force_flush()
        flushed = time.perf_counter() - start
        result = {"seconds": seconds, "cpu": cpu, "flushed": flushed, "switches": switches, **_span_stats(exporter)}
        if exporter is not None:
            exporter.clear()
        return result

    with ScriptedLLM(lambda req: text("The estimate converges; residuals stay below tolerance. ok")) as server, \
            tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)
        cfg = server.llm_config(price=[0, 0])
        for warm_up in ("chat2", "group4"):
            run(warm_up)
        yield run
    if mode.startswith("ours"):
        oc.uninstrument()


def run_child(mode: str, workloads: list[str], endpoint: str = "") -> dict:
    """Run each workload once (after a warm-up) in ``mode``; returns {workload: {seconds, bytes, ...}}."""
    with chat_runner(mode, endpoint) as run:
        return {workload: run(workload) for workload in workloads}


def serve_child(mode: str, workload: str, endpoint: str, reply) -> None:
    """Warm up, say "ready", then run ``workload`` once per line read from stdin, a JSON line each (for --paired:
    the modes' processes take turns, so each round's runs lie seconds apart)."""
    with chat_runner(mode, endpoint) as run:
        reply.write("ready\n")
        reply.flush()
        for _line in sys.stdin:
            reply.write(json.dumps(run(workload)) + "\n")
            reply.flush()


def _spawn(mode: str, workloads: list[str], endpoint: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--workloads", ",".join(workloads),
           "--endpoint", endpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_chats(turns: tuple[int, ...], group_rounds: int, rounds: int, endpoint: str = "") -> None:
    workloads = [f"chat{t}" for t in turns] + [f"group{group_rounds}"]
    best: dict[tuple[str, str, str], float] = {}  # (clock, mode, workload) -> best seconds
    # (mode, workload) -> the ratio to uninstrumented of each round (both measured in that round: drift cancels)
    paired: dict[tuple[str, str], list[float]] = {}
    sizes: dict[tuple[str, str], dict] = {}
    long_rounds = min(rounds, 3)  # the longest chat dominates the run time: at most 3 rounds
    modes = MODES + (SINK_MODES if endpoint else ())
    for i in range(rounds):  # modes interleaved round by round, so drift hits all of them alike
        for mode in modes:
            for workload, r in _spawn(mode, workloads if i < long_rounds else workloads[:2] + workloads[3:],
                                      endpoint).items():
                for clock in ("seconds", "cpu"):
                    best[clock, mode, workload] = min(best.get((clock, mode, workload), float("inf")), r[clock])
                sizes[mode, workload] = r
                plain = sizes.get(("plain", workload)) if mode != "plain" else None
                if plain is not None:
                    paired.setdefault((mode, workload), []).append(r["seconds"] / plain["seconds"])
    label = {w: (f"2 agents, {w[4:]} turns" if w.startswith("chat") else f"group chat 4×{w[5:]} rounds")
             for w in workloads}

    print(f"2. Wall time of a scripted zero-latency AG2 chat (s, best of {rounds}, {long_rounds} for {turns[-1]} turns;"
          " × = over uninstrumented;"
          " cpu× = same ratio on process CPU time, less sensitive to other load on the machine)")
    print(f"  {'workload':<26}{'uninstr. s':>11}{'ours s':>9}{'ours ×':>8}{'AG2-native s':>14}{'AG2 ×':>8}"
          f"{'ours cpu×':>11}{'AG2 cpu×':>10}")
    ratio, cpu = {}, {}
    for w in workloads:
        plain, ours, ag2 = (best["seconds", m, w] for m in MODES)
        ratio["ours", w], ratio["ag2", w] = ours / plain, ag2 / plain
        cpu["ours", w], cpu["ag2", w] = (best["cpu", m, w] / best["cpu", "plain", w] for m in ("ours", "ag2"))
        print(f"  {label[w]:<26}{plain:>11.3f}{ours:>9.3f}{ratio['ours', w]:>8.3f}{ag2:>14.3f}{ratio['ag2', w]:>8.3f}"
              f"{cpu['ours', w]:>11.3f}{cpu['ag2', w]:>10.3f}")
    lo, mid, hi, group = workloads[0], workloads[1], workloads[2], workloads[-1]
    for mode, name in (("ours", "ours"), ("ag2", "AG2-native")):
        flat, flat_cpu = ratio[mode, hi] / ratio[mode, lo], cpu[mode, hi] / cpu[mode, lo]
        verdict = f"   target ≤ 1.1: {'met' if flat <= 1.1 else 'MISSED'}" if mode == "ours" else ""
        print(f"  flatness {name:<11} (× at {hi[4:]} turns)/(× at {lo[4:]} turns) = {flat:.3f}"
              f" (cpu {flat_cpu:.3f}){verdict}")
    print(f"  target ours ≤ ×1.3 at {mid[4:]} turns: {ratio['ours', mid]:.3f} "
          f"{'met' if ratio['ours', mid] <= 1.3 else 'MISSED'};"
          f"  ours ≤ ×1.2 on the group chat: {ratio['ours', group]:.3f} "
          f"{'met' if ratio['ours', group] <= 1.2 else 'MISSED'}\n")
    if endpoint:
        _print_sink_modes(best, paired, workloads, label)

    print("3. Span data per run: bytes of json.dumps(value) over span + event attributes (spans/events/dropped)")
    print(f"  {'workload':<26}{'ours bytes':>12}{'ours s/e/drop':>16}{'AG2 bytes':>12}{'AG2 s/e/drop':>15}{'AG2/ours':>10}")
    for w in workloads:
        o, a = sizes["ours", w], sizes["ag2", w]
        print(f"  {label[w]:<26}{o['bytes']:>12,}{'%d/%d/%d' % (o['spans'], o['events'], o['dropped_events']):>16}"
              f"{a['bytes']:>12,}{'%d/%d/%d' % (a['spans'], a['events'], a['dropped_events']):>15}"
              f"{a['bytes'] / max(o['bytes'], 1):>10.2f}")
    if any(sizes[m, w]["dropped_events"] for m in ("ours", "ag2") for w in workloads):
        print("  note: 'drop' = span events discarded by the SDK's default limit of 128 events per span"
              " (OTEL_SPAN_EVENT_COUNT_LIMIT); their bytes are not counted")
    k = turns[-1] // turns[0]
    growth = {m: sizes[m, hi]["bytes"] / max(sizes[m, lo]["bytes"], 1) for m in ("ours", "ag2")}
    print(f"  growth {lo[4:]}→{hi[4:]} turns (linear ≈ {k}, quadratic ≈ {k * k}): "
          f"ours ×{growth['ours']:.2f}, AG2-native ×{growth['ag2']:.2f}")


def _print_sink_modes(best: dict, paired: dict, workloads: list[str], label: dict) -> None:
    print("2b. The same chats with each tracing's full pipeline (× over uninstrumented, same rounds): ours+sinks ="
          " setup_tracing(SQL + OTLP), AG2+OTLP = AG2's own tracing + BatchSpanProcessor(OTLP); one receiver."
          " med× = median over rounds of each round's own ratio (uninstrumented run in the same round)")
    print(f"  {'workload':<26}{'uninstr. s':>11}{'ours+sinks s':>13}{'×':>7}{'med×':>7}{'AG2+OTLP s':>12}{'×':>7}"
          f"{'med×':>7}{'cpu× ours':>11}{'cpu× AG2':>10}{'ours ≤ AG2? (best, med)':>25}")
    for w in workloads:
        plain, ours, ag2 = (best["seconds", m, w] for m in ("plain", *SINK_MODES))
        cpu_ours, cpu_ag2 = (best["cpu", m, w] / best["cpu", "plain", w] for m in SINK_MODES)
        med_ours, med_ag2 = (statistics.median(paired[m, w]) for m in SINK_MODES)
        verdict = f"{'yes' if ours <= ag2 else 'NO'}, {'yes' if med_ours <= med_ag2 else 'NO'}"
        print(f"  {label[w]:<26}{plain:>11.3f}{ours:>13.3f}{ours / plain:>7.3f}{med_ours:>7.3f}{ag2:>12.3f}"
              f"{ag2 / plain:>7.3f}{med_ag2:>7.3f}{cpu_ours:>11.3f}{cpu_ag2:>10.3f}{verdict:>25}")
    print()


def _median_interval(values: list[float], resamples: int = 4000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median (fixed seed): a difference whose interval holds 0 is not shown
    either way. One 50-turn chat's wall time varies by 6–8% from chat to chat here."""
    draw = random.Random(0).choices
    medians = sorted(statistics.median(draw(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _base_mode(mode: str) -> str:
    """``ours+sinks#2`` -> ``ours+sinks``: a tagged mode is the same mode in processes of its own (an A/A check)."""
    return mode.split("#", 1)[0]


def _start_children(modes: tuple[str, ...], workload: str, endpoint: str) -> dict[str, subprocess.Popen]:
    children = {mode: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", _base_mode(mode),
                                        "--workloads", workload, "--endpoint", endpoint], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True) for mode in modes}
    for mode, child in children.items():
        if child.stdout.readline().strip() != "ready":
            _stop_children(children)  # the others of this set too: the caller never got hold of them
            sys.exit(f"child {mode} failed (its stderr is above)")
    return children


def _stop_children(children: dict[str, subprocess.Popen]) -> None:
    for child in children.values():
        child.stdin.close()
        child.wait()


def bench_paired(workload: str, rounds: int, endpoint: str, modes: tuple[str, ...] = ("plain", *SINK_MODES),
                 rounds_per_process: int = 10) -> None:
    """One workload in ``modes`` (uninstrumented first; by default both full pipelines), ``rounds`` interleaved rounds
    (the order rotating): per-mode best and median, and per round ours − AG2's (both ran in that round: the machine's drift cancels); timed to the
    chat's end, then to the end of ``force_flush`` (every span delivered)."""
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    # One warmed-up process per mode, taking turns: a round's runs lie seconds apart. This host's speed drifts by
    # ±20% within a minute (the same uninstrumented chat took 1.7–2.5 s in one process); a process per run put
    # whole minutes and each process's own start between the runs compared. A process may also keep a speed of
    # its own for its life (its memory layout, its hash seed: the uninstrumented chat in two processes differed by
    # −3.6%, +2.9%, +1.5% in three 20-round A/A runs), so a fresh set serves every ``rounds_per_process`` rounds.
    children: dict[str, subprocess.Popen] = {}
    try:
        for round_number in range(rounds):
            if round_number % rounds_per_process == 0:
                _stop_children(children)
                children = _start_children(modes, workload, endpoint)
            # The order rotates each round: a run's place in its round moved its time by a few %.
            for mode in modes[round_number % len(modes):] + modes[:round_number % len(modes)]:
                children[mode].stdin.write("\n")
                children[mode].stdin.flush()
                line = children[mode].stdout.readline()
                if not line:
                    sys.exit(f"child {mode} failed (its stderr is above)")
                runs[mode].append(json.loads(line))
    finally:
        _stop_children(children)
    for key, what in (("seconds", "the chat"), ("flushed", "the chat until its spans are delivered (force_flush)")):
        seconds = {mode: [run[key] for run in runs[mode]] for mode in modes}
        print(f"2c. {workload}, {rounds} interleaved rounds, {what} (s; × = the round's own ratio to uninstrumented)")
        for mode in modes:
            ratios = [s / p for s, p in zip(seconds[mode], seconds["plain"])]
            switches = statistics.median(run["switches"] for run in runs[mode])
            print(f"  {mode:<12} best {min(seconds[mode]):.3f}  median {statistics.median(seconds[mode]):.3f}"
                  f"  median × {statistics.median(ratios):.3f}  agent thread's context switches {switches:.0f}")
        pairs = [("ours", "ag2"), ("ours+otlp", "ag2+otlp"), ("ours+sinks", "ag2+otlp")]
        pairs += [(mode, _base_mode(mode)) for mode in modes if mode != _base_mode(mode)]  # A/A: ours is the tagged one
        for ours, ag2 in pairs:
            if ours in seconds and ag2 in seconds:
                differences = [a - b for a, b in zip(seconds[ours], seconds[ag2])]
                low, high = _median_interval(differences)
                print(f"  {ours} − {ag2} per round: median {statistics.median(differences):+.3f} s (95% interval "
                      f"{low:+.3f} to {high:+.3f}, bootstrap); {ours} no slower in "
                      f"{sum(d <= 0 for d in differences)} of {rounds} rounds")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats of part 1 and rounds of part 2 (default 5, --quick 1)")
    parser.add_argument("--sinks", action="store_true",
                        help="also ours with SQL+OTLP and AG2's own with OTLP (part 2b; a receiver child process)")
    parser.add_argument("--chats-only", action="store_true", help="part 2 (and 3) only")
    parser.add_argument("--paired", metavar="TURNS", type=int,
                        help="only the TURNS-turn chat, uninstrumented and both full pipelines, --repeats rounds")
    parser.add_argument("--child", choices=MODES + SINK_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="plain,ours+sinks,ag2+otlp",
                        help=f"--paired: the modes, 'plain' first (of {','.join(PAIRED_MODES)})")
    parser.add_argument("--rounds-per-process", type=int, default=10,
                        help="--paired: a fresh process per mode every this many rounds (default 10)")
    parser.add_argument("--serve", choices=PAIRED_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        real_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # AG2 prints even with silent=True
        real_stdout.write(json.dumps(run_child(args.child, args.workloads.split(","), args.endpoint)) + "\n")
        return
    if args.serve:
        reply, sys.stdout = sys.stdout, open(os.devnull, "w")
        serve_child(args.serve, args.workloads, args.endpoint, reply)
        return
    repeats = rounds = args.repeats or (1 if args.quick else 5)
    started = time.perf_counter()
    print(f"otel-cmbagent overhead benchmark (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    if args.paired:
        modes = tuple(args.modes.split(","))
        if modes[0] != "plain" or not {_base_mode(mode) for mode in modes} <= set(PAIRED_MODES) \
                or len(set(modes)) < len(modes) or args.rounds_per_process < 1:
            parser.error(f"--modes: 'plain' first, then any of {','.join(PAIRED_MODES)} (each once; MODE#TAG = MODE "
                         "again in processes of its own); --rounds-per-process at least 1")
        with _receiver(True) as endpoint:
            bench_paired(f"chat{args.paired}", rounds, endpoint, modes, args.rounds_per_process)
        print(f"(total {time.perf_counter() - started:.0f} s)")
        return
    if not args.chats_only:
        bench_spans(total=2_000 if args.quick else 20_000, repeats=repeats)
    with _receiver(args.sinks) as endpoint:
        if args.quick:
            bench_chats(turns=(4, 8, 16), group_rounds=12, rounds=rounds, endpoint=endpoint)
        else:
            bench_chats(turns=(25, 50, 100), group_rounds=60, rounds=rounds, endpoint=endpoint)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
