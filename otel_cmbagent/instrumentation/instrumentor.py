"""``AG2Instrumentor``: class-level, idempotent, exactly undoable patches of the classic AG2 API."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref
from collections.abc import Collection
from typing import Any, Callable

import wrapt
from opentelemetry import trace

from ..pipeline.config import InstrumentationConfig
from ..pipeline.context import _TracerSource
from ..pipeline.values import log_internal_error, register_secrets_from_config, register_secrets_from_environment
from ..version import __version__
from . import ag2x
from .agent_patch import AgentWrappers
from .code_patch import CodeWrappers
from .contrib import BaseInstrumentor
from .conversation_patch import ConversationWrappers
from .groupchat_patch import GroupChatWrappers
from .llm_patch import LLMWrappers
from .package import classic_api_problem, installed_requirement
from .patching import PatchSet
from .spans import Runtime, before_call, traced
from .threads import propagate_thread_context

_logger = logging.getLogger(__name__)

SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"

# Modules whose classes define ``execute_code_blocks``; patched when (and if) they are imported.
EXECUTOR_MODULES = (
    "autogen.coding.local_commandline_code_executor",
    "autogen.coding.docker_commandline_code_executor",
    "autogen.coding.jupyter.jupyter_code_executor",
    "autogen.coding.jupyter.embedded_ipython_code_executor",
    "autogen.coding.yepcode_code_executor",
    "autogen.coding.daytona_code_executor",
    "autogen.coding.remyx_code_executor",
)


class AG2Instrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Trace AG2 (classic ``autogen`` API): conversations, agent turns, LLM calls, tools, code, files, handoffs.

    ``instrument(tracer_provider=None, capture_content=None, max_value_length=None,
    track_files=None, instrument_threading=True, instrument_processes=True, add_sequencer=True)``. With
    ``add_sequencer`` an SDK provider that has no ``SequencingSpanProcessor`` gets
    one, so zero-code (``opentelemetry-instrument``) runs are ordered too.
    """

    _lock = threading.RLock()

    def __init__(self) -> None:
        # BaseInstrumentor is a singleton: __init__ runs on every construction.
        if getattr(self, "_patches", None) is not None:
            return
        super().__init__()
        self._patches = PatchSet()
        self._process_patches = PatchSet()  # the standard library's (process pools, Process, Popen): not AG2's
        self._active = False
        self._runtime: Runtime | None = None
        self._threading: Callable[[], None] | None = None  # undoes thread context propagation
        self.tracer_provider: Any = None  # the provider the live patches report to

    def instrumentation_dependencies(self) -> Collection[str]:
        return (installed_requirement(),)

    def instrument(self, **kwargs: Any) -> Any:
        """Patch AG2; without the classic ``autogen`` module, log one line saying what to install and do nothing."""
        problem = None if self.is_instrumented_by_opentelemetry else classic_api_problem()
        if problem is not None and not kwargs.get("raise_exception_on_conflict"):
            if ag2x.installed():
                _logger.warning("otel-cmbagent: %s", ag2x.USING_TELEMETRY_MIDDLEWARE)
                self._instrument_without_patches(**kwargs)
                self._is_instrumented_by_opentelemetry = True
            else:
                _logger.error("otel-cmbagent: %s", problem)
            return None
        return super().instrument(**kwargs)

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    def _instrument(self, **kwargs: Any) -> None:
        with self._lock:
            runtime = self._instrument_without_patches(**kwargs)
            self._patch_agents(runtime)
            for module in EXECUTOR_MODULES:
                wrapt.register_post_import_hook(self._patch_executor_module, module)

    def _instrument_without_patches(self, **kwargs: Any) -> Runtime:
        """Everything but AG2's patches: the provider ``run``/``step`` use, the sequencer, secrets, threads and
        processes (all an AG2 1.x run needs: its own middleware makes the spans)."""
        with self._lock:
            tracer_provider = kwargs.get("tracer_provider")
            config = InstrumentationConfig.resolve(
                capture_content=kwargs.get("capture_content"),
                max_value_length=kwargs.get("max_value_length"),
                track_files=kwargs.get("track_files"),
            )
            tracer = trace.get_tracer(__name__, __version__, tracer_provider=tracer_provider, schema_url=SCHEMA_URL)
            self._runtime = runtime = Runtime(tracer=tracer, config=config)
            self.tracer_provider = tracer_provider
            _TracerSource.provider = tracer_provider
            if kwargs.get("add_sequencer", True):
                ensure_sequencer(tracer_provider or trace.get_tracer_provider())
            register_secrets_from_environment()
            self._active = True
            if kwargs.get("instrument_threading", True):
                self._instrument_threading()
            if kwargs.get("instrument_processes", True):
                self._instrument_processes()
            return runtime

    def _uninstrument(self, **kwargs: Any) -> None:
        with self._lock:
            self._active = False
            self._patches.restore()
            self._process_patches.restore()
            _TracerSource.provider = None
            if self._threading is not None:
                try:
                    self._threading()
                except Exception as exc:  # noqa: BLE001
                    log_internal_error("threading uninstrument", exc)
                self._threading = None
            self._runtime = None
            self.tracer_provider = None

    # --- patch targets ---------------------------------------------------------
    def _patch_agents(self, runtime: Runtime) -> None:
        from autogen.agentchat.conversable_agent import ConversableAgent
        from autogen.agentchat.groupchat import GroupChat, GroupChatManager
        from autogen.oai.client import OpenAIWrapper

        _AGENT_TYPES[0] = (ConversableAgent,)
        agent = AgentWrappers(runtime)
        conversation = ConversationWrappers(runtime)
        group = GroupChatWrappers(runtime)
        llm = LLMWrappers(runtime)
        code = CodeWrappers(runtime)

        spans: list[tuple[type, str, Any, Any]] = [
            (ConversableAgent, "initiate_chat", conversation.start_initiate_chat, conversation.finish),
            (ConversableAgent, "a_initiate_chat", conversation.start_initiate_chat, conversation.finish),
            (ConversableAgent, "initiate_chats", conversation.start_initiate_chats, conversation.finish),
            (ConversableAgent, "a_initiate_chats", conversation.start_initiate_chats, conversation.finish),
            (GroupChatManager, "run_chat", conversation.start_run_chat, conversation.finish),
            (GroupChatManager, "a_run_chat", conversation.start_run_chat, conversation.finish),
            (GroupChatManager, "resume", conversation.start_resume, conversation.finish),
            (GroupChatManager, "a_resume", conversation.start_resume, conversation.finish),
            (ConversableAgent, "generate_reply", agent.start_generate_reply, agent.finish_generate_reply),
            (ConversableAgent, "a_generate_reply", agent.start_generate_reply, agent.finish_generate_reply),
            (ConversableAgent, "execute_function", agent.start_execute_function, agent.finish_execute_function),
            (ConversableAgent, "a_execute_function", agent.start_execute_function, agent.finish_execute_function),
            (ConversableAgent, "get_human_input", agent.start_human_input, agent.finish_human_input),
            (ConversableAgent, "a_get_human_input", agent.start_human_input, agent.finish_human_input),
            (ConversableAgent, "execute_code_blocks", code.start_legacy, code.finish),
            (GroupChat, "select_speaker", group.start_select_speaker, group.finish_select_speaker),
            (GroupChat, "a_select_speaker", group.start_select_speaker, group.finish_select_speaker),
            (OpenAIWrapper, "create", llm.start_create, llm.finish_create),
        ]
        for owner, name, start, finish in spans:
            original = owner.__dict__.get(name)
            if original is not None:
                self._patches.wrap(owner, name, traced(runtime, _seeing_agents(start), finish, original))

        hooks: list[tuple[type, str, Any]] = [
            (ConversableAgent, "send", _seeing_agents(agent.record_send)),
            (ConversableAgent, "a_send", _seeing_agents(agent.record_send)),
            (ConversableAgent, "__init__", _register_agent_secrets),
            (OpenAIWrapper, "__init__", _register_client_secrets),
        ]
        for owner, name, hook in hooks:
            original = owner.__dict__.get(name)
            if original is not None:
                self._patches.wrap(owner, name, before_call(hook, original))

    def _patch_executor_module(self, module: Any) -> None:
        with self._lock:
            if not self._active:
                return
            try:
                for value in list(vars(module).values()):
                    if (
                        inspect.isclass(value)
                        and value.__module__ == module.__name__
                        and "execute_code_blocks" in value.__dict__
                    ):
                        self.patch_code_executor(value)
            except Exception as exc:  # noqa: BLE001
                log_internal_error(f"patching {getattr(module, '__name__', module)}", exc)

    def patch_code_executor(self, executor_class: type) -> bool:
        """Trace ``executor_class.execute_code_blocks`` (for custom executors); undone by ``uninstrument()``."""
        with self._lock:
            if not self._active or self._runtime is None:
                return False
            code = CodeWrappers(self._runtime)
            original = executor_class.__dict__.get("execute_code_blocks")
            if original is None:
                return False
            return self._patches.wrap(
                executor_class, "execute_code_blocks", traced(self._runtime, code.start_executor, code.finish, original)
            )

    def _instrument_processes(self) -> None:
        """Work in other processes stays in the run (pools, Process, code-run children); undone with the rest."""
        from .processes import instrument_processes
        from .subprocess_context import instrument_code_children

        try:
            instrument_processes(self._process_patches)
            instrument_code_children(self._process_patches)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("process context propagation", exc)

    def _instrument_threading(self) -> None:
        try:
            self._threading = propagate_thread_context()
        except Exception as exc:  # noqa: BLE001
            log_internal_error("thread context propagation", exc)

    @property
    def patched_attributes(self) -> list[tuple[type, str, Any]]:
        """``(class, attribute, original)`` for every patch in place (what ``uninstrument()`` restores)."""
        return self._patches.patched


_sequenced: weakref.WeakSet[Any] = weakref.WeakSet()  # providers ensure_sequencer added a sequencer to


def ensure_sequencer(provider: Any) -> bool:
    """Add a ``SequencingSpanProcessor`` to an SDK provider that lacks one (zero-code setups).

    Returns True when one was added. Exporters that read attributes at span end
    see the order either way; sinks that act on span start want it added first,
    which ``setup_tracing()`` does.
    """
    from ..pipeline.processor import SequencingSpanProcessor

    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(provider, TracerProvider):
        return False
    try:
        max_events = getattr(getattr(provider, "_span_limits", None), "max_events", None)
        if isinstance(max_events, int) and max_events < 10_000:
            _logger.info(
                "otel-cmbagent: this TracerProvider keeps %d events per span; conversations longer than that "
                "lose their oldest message events in exported spans (raise OTEL_SPAN_EVENT_COUNT_LIMIT; "
                "setup_tracing() does). The SQL and websocket sinks receive every message regardless.",
                max_events,
            )
        # The provider's processors are private (``_active_span_processor._span_processors``, tested on
        # opentelemetry-sdk 1.45.x; no public accessor): without them, one sequencer per provider from here.
        processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", None)
        if processors is None:
            processors = (SequencingSpanProcessor(),) if provider in _sequenced else ()
        if any(isinstance(p, SequencingSpanProcessor) for p in processors):
            return False
        provider.add_span_processor(SequencingSpanProcessor())
        if ag2x.installed():  # before the exporters a zero-code set-up adds later
            provider.add_span_processor(ag2x.AG2xSpanProcessor())
        _sequenced.add(provider)
        _logger.debug("otel-cmbagent: added a SequencingSpanProcessor to %r", provider)
        return True
    except Exception as exc:  # noqa: BLE001
        log_internal_error("ensure_sequencer", exc)
        return False


def _bound_argument(function: Any, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    try:
        return inspect.signature(function).bind_partial(None, *args, **kwargs).arguments.get(name)
    except (TypeError, ValueError):
        return None


def _register_agent_secrets(agent: Any, args: tuple, kwargs: dict) -> None:
    from autogen.agentchat.conversable_agent import ConversableAgent

    init = ConversableAgent.__dict__["__init__"]
    register_secrets_from_config(_bound_argument(getattr(init, "__wrapped__", init), args, kwargs, "llm_config"))


def _register_client_secrets(client: Any, args: tuple, kwargs: dict) -> None:
    register_secrets_from_config(kwargs)
    for value in args:
        register_secrets_from_config(value)


# Agents whose llm_config secrets are registered. ``__init__`` is patched, but an agent created before
# ``instrument()`` is first seen by a wrapper: its keys are registered then, once per agent (a WeakSet
# lookup, ~0.1 µs, on later calls), before anything of the call is recorded.
_agents_seen: weakref.WeakSet[Any] = weakref.WeakSet()
_AGENT_TYPES: list[Any] = [()]  # (ConversableAgent,) once instrumented


def _remember_agent(agent: Any) -> None:
    try:
        if agent in _agents_seen:
            return
        _agents_seen.add(agent)
    except TypeError:  # not weak-referenceable: not an AG2 agent
        return
    register_secrets_from_config(getattr(agent, "llm_config", None))
    # A group chat manager's members speak in its chat before any wrapper sees them.
    for member in getattr(getattr(agent, "_groupchat", None), "agents", None) or ():
        _remember_agent(member)


def _seeing_agents(function: Any) -> Any:
    """``function(instance, args, kwargs)`` after registering the secrets of the agents in the call."""

    @functools.wraps(function)
    def with_agent_secrets(instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            _remember_agent(instance)
            for value in (*args, *kwargs.values()):
                if isinstance(value, _AGENT_TYPES[0]):
                    _remember_agent(value)
        except Exception as exc:  # noqa: BLE001
            log_internal_error("registering an agent's secrets", exc)
        return function(instance, args, kwargs)

    return with_agent_secrets


def instrument(tracer_provider: trace.TracerProvider | None = None, **options: Any) -> AG2Instrumentor:
    """Instrument AG2 (idempotent: a second call while instrumented changes nothing)."""
    instrumentor = AG2Instrumentor()  # a singleton (BaseInstrumentor)
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider, **options)
    return instrumentor


def uninstrument() -> None:
    """Restore every patched attribute to the exact original object."""
    instrumentor = AG2Instrumentor()  # a singleton (BaseInstrumentor)
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


