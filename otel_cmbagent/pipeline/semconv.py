"""Attribute keys and values, in one place.

GenAI keys come from ``opentelemetry-semantic-conventions`` so they follow the
spec; our own ``cmbagent.*`` keys (attributes, event names, row meta keys) are
defined here and nowhere else. Where AG2's
own ``autogen.opentelemetry`` names a thing, the same name is used so traces from
both look alike in a viewer.
"""

from __future__ import annotations

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as _gen_ai
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as _gen_ai_metrics
from opentelemetry.semconv.attributes import error_attributes as _error

# --- OpenTelemetry GenAI semantic conventions -------------------------------
GEN_AI_OPERATION_NAME = _gen_ai.GEN_AI_OPERATION_NAME
GEN_AI_AGENT_NAME = _gen_ai.GEN_AI_AGENT_NAME
GEN_AI_PROVIDER_NAME = _gen_ai.GEN_AI_PROVIDER_NAME
GEN_AI_REQUEST_MODEL = _gen_ai.GEN_AI_REQUEST_MODEL
GEN_AI_REQUEST_TEMPERATURE = _gen_ai.GEN_AI_REQUEST_TEMPERATURE
GEN_AI_REQUEST_MAX_TOKENS = _gen_ai.GEN_AI_REQUEST_MAX_TOKENS
GEN_AI_REQUEST_TOP_P = _gen_ai.GEN_AI_REQUEST_TOP_P
GEN_AI_REQUEST_SEED = _gen_ai.GEN_AI_REQUEST_SEED
GEN_AI_RESPONSE_MODEL = _gen_ai.GEN_AI_RESPONSE_MODEL
GEN_AI_RESPONSE_ID = _gen_ai.GEN_AI_RESPONSE_ID
GEN_AI_RESPONSE_FINISH_REASONS = _gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
GEN_AI_USAGE_INPUT_TOKENS = _gen_ai.GEN_AI_USAGE_INPUT_TOKENS
GEN_AI_USAGE_OUTPUT_TOKENS = _gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
GEN_AI_TOOL_NAME = _gen_ai.GEN_AI_TOOL_NAME
GEN_AI_TOOL_TYPE = _gen_ai.GEN_AI_TOOL_TYPE
GEN_AI_TOOL_CALL_ID = _gen_ai.GEN_AI_TOOL_CALL_ID
GEN_AI_TOOL_CALL_ARGUMENTS = _gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS
GEN_AI_TOOL_CALL_RESULT = _gen_ai.GEN_AI_TOOL_CALL_RESULT
GEN_AI_INPUT_MESSAGES = _gen_ai.GEN_AI_INPUT_MESSAGES
GEN_AI_OUTPUT_MESSAGES = _gen_ai.GEN_AI_OUTPUT_MESSAGES
GEN_AI_CONVERSATION_ID = _gen_ai.GEN_AI_CONVERSATION_ID
GEN_AI_WORKFLOW_NAME = _gen_ai.GEN_AI_WORKFLOW_NAME
ERROR_TYPE = _error.ERROR_TYPE

OP_CHAT = _gen_ai.GenAiOperationNameValues.CHAT.value
OP_INVOKE_AGENT = _gen_ai.GenAiOperationNameValues.INVOKE_AGENT.value
OP_EXECUTE_TOOL = _gen_ai.GenAiOperationNameValues.EXECUTE_TOOL.value
OP_INVOKE_WORKFLOW = _gen_ai.GenAiOperationNameValues.INVOKE_WORKFLOW.value
# Not (yet) in the spec; the names AG2's own instrumentation uses.
OP_CONVERSATION = "conversation"
OP_EXECUTE_CODE = "execute_code"
OP_HUMAN_INPUT = "await_human_input"
OP_HANDOFF = "handoff"
OP_STEP = "step"
OP_FILE = "file"

# Keys AG2's own instrumentation uses (same names, same meaning).
GEN_AI_USAGE_COST = "gen_ai.usage.cost"
GEN_AI_CONVERSATION_MAX_TURNS = "gen_ai.conversation.max_turns"
GEN_AI_CONVERSATION_TURNS = "gen_ai.conversation.turns"
GEN_AI_CONVERSATION_RESUMED = "gen_ai.conversation.resumed"
AG2_SPAN_TYPE = "ag2.span.type"
# AG2 1.x's tracer (the instrumentation scope of its TelemetryMiddleware's and hub's spans)
AG2X_SCOPE = "opentelemetry.instrumentation.ag2"
CODE_EXIT_CODE = "ag2.code_execution.exit_code"
CODE_OUTPUT = "ag2.code_execution.output"
HUMAN_INPUT_PROMPT = "ag2.human_input.prompt"
HUMAN_INPUT_RESPONSE = "ag2.human_input.response"
SPEAKER_SELECTED = "ag2.speaker_selection.selected"

# --- OpenInference (Arize Phoenix and other OpenInference-aware backends) --------------
# Phoenix converts gen_ai.* itself, but only knows chat/execute_tool/invoke_agent (anything else is an
# "unknown" span), builds a span's input/output columns from input.value/output.value only, and files a
# trace under the first session.id it sees. Keys a span sends explicitly win over its conversion.
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
OI_AGENT_NAME = "agent.name"
OI_SESSION_ID = "session.id"
MIME_TEXT = "text/plain"
MIME_JSON = "application/json"
# The OpenInference keys: carried on spans for trace backends, not stored in the rows (which have their own).
OPENINFERENCE_KEYS: frozenset[str] = frozenset(
    {OPENINFERENCE_SPAN_KIND, INPUT_VALUE, INPUT_MIME_TYPE, OUTPUT_VALUE, OUTPUT_MIME_TYPE, OI_AGENT_NAME, OI_SESSION_ID}
)

# --- cmbagent identity and ordering (exact names; the SQL sink maps them) ----
RUN_ID = "cmbagent.run_id"
SESSION_ID = "cmbagent.session_id"
NODE_ID = "cmbagent.node_id"
STEP_ID = "cmbagent.step_id"
EVENT_TYPE = "cmbagent.event_type"
EXECUTION_ORDER = "cmbagent.execution_order"
DEPTH = "cmbagent.depth"

# --- cmbagent details -------------------------------------------------------
RUN_NAME = "cmbagent.run.name"
STEP_NAME = "cmbagent.step.name"
AGENT_ROLE = "cmbagent.agent.role"
CODE_LANGUAGE = "cmbagent.code.language"
CODE_BLOCKS = "cmbagent.code.blocks"
CODE_BLOCK_COUNT = "cmbagent.code.block_count"
CODE_WORK_DIR = "cmbagent.code.work_dir"
CODE_EXECUTOR = "cmbagent.code.executor"
# What the code run's child processes cost, measured by os.wait4 for each child (summed; RSS: the peak).
CODE_CPU_USER = "cmbagent.code.cpu_user_s"
CODE_CPU_SYSTEM = "cmbagent.code.cpu_system_s"
CODE_MAX_RSS = "cmbagent.code.max_rss_bytes"
CODE_PROCESS_COUNT = "cmbagent.code.process_count"
FILE_PATH = "cmbagent.file.path"
FILE_SIZE = "cmbagent.file.size_bytes"
FILE_TYPE = "cmbagent.file.type"
FILE_CHANGE = "cmbagent.file.change"
HANDOFF_FROM = "cmbagent.handoff.from"
HANDOFF_TO = "cmbagent.handoff.to"
HANDOFF_METHOD = "cmbagent.handoff.method"
MESSAGE_SENDER = "cmbagent.message.sender"
MESSAGE_RECIPIENT = "cmbagent.message.recipient"
MESSAGE_ROLE = "cmbagent.message.role"
MESSAGE_CONTENT = "cmbagent.message.content"
MESSAGE_REQUEST_REPLY = "cmbagent.message.request_reply"
LLM_MESSAGE_COUNT = "cmbagent.llm.message_count"
LLM_HISTORY_OMITTED = "cmbagent.llm.history_messages_omitted"
TOOL_SUCCESS = "cmbagent.tool.success"
CONVERSATION_KIND = "cmbagent.conversation.kind"
CONVERSATION_RECIPIENT = "cmbagent.conversation.recipient"
CONVERSATION_CHATS = "cmbagent.conversation.chats"
GROUP_AGENTS = "cmbagent.group.agents"
ERROR_MESSAGE = "cmbagent.error.message"
# Set on a span ended because its process was stopped while it ran ("SIGTERM", "the process exiting").
INTERRUPTED = "cmbagent.interrupted"
# Set on a span the CLI's export rebuilt from a row still running (it ends at the time of the export).
INCOMPLETE = "cmbagent.incomplete"
# meta key of a running row: the process that wrote it (host|boot id|pid|start time), so readers can tell
# a dead writer's rows from live ones (otel_cmbagent.table.writers).
WRITER = "cmbagent.writer"
# What cmbagent's event-capture API (otel_cmbagent.compat) passes along: its ``context`` and
# ``metadata`` arguments (JSON), a handoff's ``reason`` and a message's ``tokens``.
CONTEXT = "cmbagent.context"
METADATA = "cmbagent.metadata"
HANDOFF_REASON = "cmbagent.handoff.reason"
MESSAGE_TOKENS = "cmbagent.message.tokens"

# Span event carrying one agent-to-agent message.
MESSAGE_EVENT_NAME = "cmbagent.message"

# --- cmbagent.event_type values (cmbagent's execution_events vocabulary) ------
EVENT_RUN = "run"
EVENT_STEP = "step"
EVENT_CONVERSATION = "conversation"
EVENT_AGENT_CALL = "agent_call"
EVENT_LLM_CALL = "llm_call"
EVENT_TOOL_CALL = "tool_call"
EVENT_CODE_EXEC = "code_exec"
EVENT_FILE_GEN = "file_gen"
EVENT_HANDOFF = "handoff"
EVENT_HUMAN_INPUT = "human_input"
EVENT_MESSAGE = "message"  # the span event's type; its row is cmbagent's agent_call/message
EVENT_ERROR = "error"

# Attributes that carry content (message, argument, result, code, output).
# The content switch removes exactly these; exporters with their own content
# policy (OTLP) strip exactly these too.
CONTENT_ATTRIBUTES: frozenset[str] = frozenset(
    {
        GEN_AI_INPUT_MESSAGES,
        GEN_AI_OUTPUT_MESSAGES,
        GEN_AI_TOOL_CALL_ARGUMENTS,
        GEN_AI_TOOL_CALL_RESULT,
        CODE_BLOCKS,
        CODE_OUTPUT,
        HUMAN_INPUT_PROMPT,
        HUMAN_INPUT_RESPONSE,
        MESSAGE_CONTENT,
        CONTEXT,
        INPUT_VALUE,
        INPUT_MIME_TYPE,
        OUTPUT_VALUE,
        OUTPUT_MIME_TYPE,
    }
)

# --- metrics (otel_cmbagent.pipeline.metrics) -------------------------------
# GenAI metric names and the token type from the spec; ours under ``cmbagent.``.
METRIC_TOKEN_USAGE = _gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE
METRIC_OPERATION_DURATION = _gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION
GEN_AI_TOKEN_TYPE = _gen_ai.GEN_AI_TOKEN_TYPE
TOKEN_TYPE_INPUT = _gen_ai.GenAiTokenTypeValues.INPUT.value
TOKEN_TYPE_OUTPUT = "output"  # GenAiTokenTypeValues.COMPLETION's value (the member's name is deprecated)
METRIC_AGENT_TURNS = "cmbagent.agent.turns"
METRIC_TOOL_CALLS = "cmbagent.tool.calls"
METRIC_CODE_RUNS = "cmbagent.code.runs"
METRIC_COST = "cmbagent.run.cost"
# A metric point's outcome (tool calls, agent turns, code runs): success, or error with ``error.type``.
OUTCOME = "cmbagent.outcome"
OUTCOME_SUCCESS = "success"
OUTCOME_ERROR = "error"

# --- logs (otel_cmbagent.pipeline.logs) -------------------------------------
# What every logging.LogRecord carries: the names opentelemetry-instrumentation-logging uses, so
# formats written for it work, and the run id under its attribute key (exported as such over OTLP).
LOG_TRACE_ID = "otelTraceID"
LOG_SPAN_ID = "otelSpanID"
LOG_TRACE_SAMPLED = "otelTraceSampled"
LOG_SERVICE_NAME = "otelServiceName"
LOG_RUN_ID = RUN_ID
