"""CPU instructions one scripted AG2 chat costs, per tracing mode: a count that does not move with the host's speed.

Run:  .venv/ag2/bin/python benchmarks/bench_instructions.py [--turns 50] [--modes plain,ours+sinks,ag2+otlp]
      .venv/ag2/bin/python benchmarks/bench_instructions.py --quick    (4 turns, about 2 minutes)
Needs valgrind (cachegrind; without it the script says so and measures nothing); at 50 turns each mode takes
~4 minutes.

Why: the 50-turn chat's wall time moved ±15% between identical runs on this 2-core machine (host drift), and even
60 interleaved in-process rounds left the sign of "ours − AG2's" to chance. An instruction count with string
hashing fixed repeated to within 0.15% here (15 M of a 10,300 M chat). Each mode runs in its own process (as in
``bench_overhead.py``: AG2's own ``instrument_llm_wrapper`` patches for good) twice under ``valgrind
--tool=cachegrind``: a warm-up 2-turn chat only, then the warm-up plus the N-turn chat; the difference is what the
N-turn chat cost the whole process, on every thread (the agent's, the SQL writer's, the OTLP exporter's; the
scripted LLM server's too, alike in every mode), flush included. The OTLP receiver runs in another process,
uncounted.

The modes are ``bench_overhead.py``'s: "plain" (uninstrumented), "ours+sinks" (``setup_tracing`` with a SQLite
file and OTLP/HTTP, content captured) and "ag2+otlp" (AG2's own ``autogen.opentelemetry`` with the SDK's
``BatchSpanProcessor(OTLPSpanExporter)``); "ours+otlp" (``setup_tracing`` with OTLP only: the same sink as
AG2's), "ours" and "ag2" (in-memory exporters: the instrumentation's own cost) work too. Under valgrind a
program runs ~50× slower, so sinks that batch by time would write many more, smaller batches than they do
at full speed: both sides batch by count and at the flush here (OTLP schedule delay and the SQL writer's delay
set to an hour), which is what a chat of a second or two gets at full speed (the SDK's 5 s OTLP delay: one export;
our SQL writer's 0.1 s: ~10 batches instead of one, a few ms more than counted here).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys

HOUR_MS = 3_600_000
DEFAULT_MODES = ("plain", "ours+sinks", "ag2+otlp")
WARM_UP_TURNS = 2


def run_child(mode: str, turns: int, endpoint: str, group: bool = False) -> None:
    """The warm-up chat, then (turns > 0) the measured one; everything flushed and shut down. ``group``: a 4-agent
    round-robin group chat of ``turns`` rounds instead of the 2-agent chat."""
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = str(HOUR_MS)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_overhead
    from autogen import AssistantAgent, ConversableAgent, GroupChat, GroupChatManager
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import otel_cmbagent as oc
    from otel_cmbagent.testing.scripted_llm import ScriptedLLM, text

    logging.getLogger("autogen.oai.client").setLevel(logging.ERROR)
    provider = None
    if mode != "plain":
        provider = bench_overhead._child_provider(mode, InMemorySpanExporter(), endpoint)
        for processor in provider._active_span_processor._span_processors:
            worker = getattr(processor, "_worker", None)
            if worker is not None:  # no quiet to wait for, no deadline: batches by count and at the flush
                worker.delay = worker.max_delay = HOUR_MS / 1000
    if mode.startswith("ag2"):
        from autogen.opentelemetry import instrument_agent
    # One devnull for the whole child: AG2's console handler keeps the stream it first saw (a closed one would make
    # every later message print a logging traceback, counted in every mode).
    with ScriptedLLM(lambda request: text("The estimate converges; residuals stay below tolerance. ok")) as server, \
            open(os.devnull, "w") as devnull:
        llm_config = server.llm_config(price=[0, 0])
        for n in (WARM_UP_TURNS, turns):
            if not n:
                continue
            if group:
                agents = [AssistantAgent(f"agent{i}", llm_config=llm_config, human_input_mode="NEVER") for i in range(4)]
                chat = GroupChat(list(agents), messages=[], max_round=n, speaker_selection_method="round_robin")
                agents.append(GroupChatManager(chat, llm_config=False))  # the last: the one the chat is started with
            else:
                agents = [ConversableAgent(name, llm_config=llm_config, human_input_mode="NEVER") for name in "ab"]
            if mode.startswith("ag2"):
                for agent in agents:
                    instrument_agent(agent, tracer_provider=provider)
            scope = oc.run(name=f"chat{n}") if mode.startswith("ours") else contextlib.nullcontext()
            with contextlib.redirect_stdout(devnull), scope:
                agents[0].initiate_chat(agents[-1], message="Start the analysis. " * 3, silent=True,
                                        **({} if group else {"max_turns": n}))
            if provider is not None:
                provider.force_flush()
    if provider is not None:
        provider.shutdown()


def count(mode: str, turns: int, endpoint: str, group: bool = False) -> int:
    """Instructions of one child run; string hashing fixed (``PYTHONHASHSEED=0``), so set and dict orders repeat."""
    child = [sys.executable, os.path.abspath(__file__), "--child", mode, "--turns", str(turns), "--endpoint", endpoint,
             *(["--group"] if group else [])]
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *child]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or not found:
        sys.exit(f"{mode} ({turns} turns) failed under valgrind:\n{done.stderr[-3000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--quick", action="store_true", help="4 turns (a smoke run)")
    parser.add_argument("--group", action="store_true",
                        help="a 4-agent round-robin group chat of --turns rounds instead of the 2-agent chat")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode and chat length (the median is kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.turns, args.endpoint, args.group)
        return
    if shutil.which("valgrind") is None:
        print("bench_instructions: valgrind is not installed (apt install valgrind): nothing measured")
        return
    if args.quick:
        args.turns = 4
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_sinks import child_receiver

    modes = args.modes.split(",")
    workload = f"{args.turns}-round 4-agent group chat" if args.group else f"{args.turns}-turn 2-agent chat"
    print(f"Instructions of one scripted {workload}, whole process, flush included "
          f"(valgrind cachegrind; (warm-up + chat) − warm-up; median of {args.repeats})")
    print(f"  {'mode':<12}{'instructions':>15}{'over plain':>14}{'×':>8}")
    chat: dict[str, int] = {}
    with child_receiver("http") as (endpoint, _poll):
        for mode in modes:
            chat[mode] = int(statistics.median(
                count(mode, args.turns, endpoint, args.group) - count(mode, 0, endpoint, args.group)
                for _ in range(args.repeats)))
            plain = chat.get("plain")
            over = f"{(chat[mode] - plain) / 1e6:>+12.1f} M" if plain and mode != "plain" else f"{'':>14}"
            ratio = f"{chat[mode] / plain:>8.3f}" if plain else f"{'':>8}"
            print(f"  {mode:<12}{chat[mode] / 1e6:>13.1f} M{over}{ratio}", flush=True)
    if {"plain", "ours+sinks", "ag2+otlp"} <= chat.keys():
        ours, ag2 = chat["ours+sinks"] - chat["plain"], chat["ag2+otlp"] - chat["plain"]
        print(f"  ours+sinks − AG2+OTLP: {(ours - ag2) / 1e6:+.1f} M instructions "
              f"({(chat['ours+sinks'] - chat['ag2+otlp']) / chat['plain']:+.2%} of the uninstrumented chat)")


if __name__ == "__main__":
    main()
