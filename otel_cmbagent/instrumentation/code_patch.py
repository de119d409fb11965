"""Code execution -> ``execute_code {agent}``, and the files a run created or changed -> ``file {path}``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from ..pipeline import semconv
from ..pipeline.errors import mark_failed
from ..pipeline.openinference import add_start_keys, input_attributes, mark_ok, output_attributes, set_output
from ..pipeline.values import log_internal_error, safe_text, to_json
from .spans import Runtime, SpanStart, agent_name, argument

_SNAPSHOT_KEY = otel_context.create_key("cmbagent.work_dir_snapshot")
_SKIPPED_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints", ".venv", "node_modules"}

_FILE_TYPES = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf", ".eps"), "plot"),
    **dict.fromkeys((".csv", ".tsv", ".json", ".npy", ".npz", ".fits", ".h5", ".hdf5", ".parquet", ".pkl", ".dat"), "data"),
    **dict.fromkeys((".py", ".sh", ".ipynb", ".r", ".jl"), "code"),
    **dict.fromkeys((".txt", ".md", ".log", ".tex", ".rst", ".html"), "text"),
}

Snapshot = dict[str, tuple[int, int]]


def file_type(path: str) -> str:
    return _FILE_TYPES.get(os.path.splitext(path)[1].lower(), "other")


def snapshot(work_dir: str | None, limit: int) -> Snapshot | None:
    """``{path: (mtime_ns, size)}`` of the files under ``work_dir``, at most ``limit`` entries."""
    if not work_dir or not os.path.isdir(work_dir):
        return None
    files: Snapshot = {}
    stack = [work_dir]
    while stack and len(files) < limit:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in _SKIPPED_DIRS:
                            stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        files[entry.path] = (info.st_mtime_ns, info.st_size)
                        if len(files) >= limit:
                            break
        except OSError:
            continue
    return files


def _is_code_copy(path: str, size: int, sources: list[str]) -> bool:
    """The executor saves each code block to a file before running it: that is not a generated file."""
    candidates = [s for s in sources if len(s.encode("utf-8", "replace")) == size]
    if not candidates:
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            content = handle.read()
    except OSError:
        return False
    return content in candidates


def _blocks(code_blocks: Any) -> list[tuple[str, str]]:
    """(language, code) pairs from executor ``CodeBlock``s or the legacy ``(lang, code)`` tuples."""
    out: list[tuple[str, str]] = []
    for block in code_blocks or ():
        if isinstance(block, (tuple, list)) and len(block) >= 2:
            out.append((str(block[0] or ""), str(block[1])))
        else:
            out.append((str(getattr(block, "language", "") or ""), str(getattr(block, "code", ""))))
    return out


class CodeWrappers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limit = runtime.config.max_value_length

    def _start(self, agent: str, executor: str, work_dir: Any, code_blocks: Any) -> SpanStart:
        blocks = _blocks(code_blocks)
        languages = sorted({lang for lang, _ in blocks if lang})
        attributes: dict[str, Any] = {
            semconv.GEN_AI_OPERATION_NAME: semconv.OP_EXECUTE_CODE,
            semconv.EVENT_TYPE: semconv.EVENT_CODE_EXEC,
            semconv.AG2_SPAN_TYPE: "code_execution",
            semconv.GEN_AI_AGENT_NAME: agent,
            semconv.CODE_EXECUTOR: executor,
            semconv.CODE_BLOCK_COUNT: len(blocks),
        }
        if languages:
            attributes[semconv.CODE_LANGUAGE] = languages[0] if len(languages) == 1 else ",".join(languages)
        if work_dir:
            attributes[semconv.CODE_WORK_DIR] = str(work_dir)
        if self.runtime.config.capture_content:
            code = attributes[semconv.CODE_BLOCKS] = to_json([{"language": l, "code": c} for l, c in blocks], self.limit)
            attributes.update(input_attributes(code, semconv.MIME_JSON))
        values: tuple[tuple[str, Any], ...] = ()
        if self.runtime.config.track_files and work_dir:
            before = snapshot(str(work_dir), self.runtime.config.max_tracked_files)
            if before is not None:
                values = ((_SNAPSHOT_KEY, (str(work_dir), before, [c for _, c in blocks], time.time_ns())),)
        return SpanStart(f"execute_code {agent}", attributes, context_values=values)

    def start_executor(self, executor: Any, args: tuple, kwargs: dict) -> SpanStart:
        parent = getattr(trace.get_current_span(), "attributes", None) or {}
        agent = parent.get(semconv.GEN_AI_AGENT_NAME) or "unknown"
        work_dir = getattr(executor, "work_dir", None) or getattr(executor, "output_dir", None)
        return self._start(agent, type(executor).__name__, work_dir, argument(args, kwargs, 0, "code_blocks"))

    def start_legacy(self, agent: Any, args: tuple, kwargs: dict) -> SpanStart:
        config = getattr(agent, "_code_execution_config", None)
        work_dir = config.get("work_dir") if isinstance(config, dict) else None
        if work_dir is None and isinstance(config, dict):
            from autogen import code_utils  # the default AG2 uses when work_dir is not set

            work_dir = getattr(code_utils, "WORKING_DIR", None)
        return self._start(agent_name(agent), "legacy", work_dir, argument(args, kwargs, 0, "code_blocks"))

    def finish(self, span: trace.Span, instance: Any, args: tuple, kwargs: dict, result: Any) -> None:
        if isinstance(result, tuple) and len(result) >= 2:
            exit_code, output, code_file = result[0], result[1], None
        else:
            exit_code = getattr(result, "exit_code", None)
            output = getattr(result, "output", None)
            code_file = getattr(result, "code_file", None)
        if isinstance(exit_code, int):
            span.set_attribute(semconv.CODE_EXIT_CODE, exit_code)
        if self.runtime.config.capture_content and output is not None:
            text = safe_text(output, self.limit)
            span.set_attribute(semconv.CODE_OUTPUT, text)
            set_output(span, f"exit code {exit_code}\n{text}", semconv.MIME_TEXT)
        if isinstance(exit_code, int) and exit_code != 0:
            mark_failed(
                span,
                "code_execution_error",
                f"exit code {exit_code}" + (f": {output}" if self.runtime.config.capture_content and output else ""),
            )
        self._record_files(span, code_file)

    def _record_files(self, code_span: trace.Span, code_file: Any) -> None:
        state = otel_context.get_value(_SNAPSHOT_KEY)
        if not state:
            return
        work_dir, before, sources, started_ns = state
        try:
            after = snapshot(work_dir, self.runtime.config.max_tracked_files) or {}
        except Exception as exc:  # noqa: BLE001
            log_internal_error("file snapshot", exc)
            return
        skip = {os.path.abspath(str(code_file))} if code_file else set()
        now_ns = time.time_ns()
        for path in sorted(after):
            mtime_ns, size = after[path]
            previous = before.get(path)
            if previous == (mtime_ns, size) or os.path.abspath(path) in skip:
                continue
            if _is_code_copy(path, size, sources):
                continue
            relative = os.path.relpath(path, work_dir)
            stamp = min(max(mtime_ns, started_ns), now_ns)
            change = "modified" if previous is not None else "created"
            oi_values: dict[str, Any] = {}
            if self.runtime.config.capture_content:
                oi_values = {**input_attributes(relative, semconv.MIME_TEXT),
                             **output_attributes(f"{change}, {size} bytes", semconv.MIME_TEXT)}
            span = self.runtime.tracer.start_span(
                f"file {relative}",
                start_time=stamp,
                attributes=add_start_keys({
                    **oi_values,
                    semconv.GEN_AI_OPERATION_NAME: semconv.OP_FILE,
                    semconv.EVENT_TYPE: semconv.EVENT_FILE_GEN,
                    semconv.FILE_PATH: str(Path(path).resolve()),
                    semconv.FILE_SIZE: size,
                    semconv.FILE_TYPE: file_type(path),
                    semconv.FILE_CHANGE: change,
                    semconv.GEN_AI_AGENT_NAME: (getattr(code_span, "attributes", None) or {}).get(
                        semconv.GEN_AI_AGENT_NAME, "unknown"
                    ),
                }),
            )
            mark_ok(span)
            span.end(end_time=stamp)
