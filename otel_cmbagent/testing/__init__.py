"""Test helpers: a scripted OpenAI-compatible server so real AG2 agents run offline."""

from otel_cmbagent.testing.scripted_llm import Reply, ScriptedLLM, code, error, text, tool_call, tool_calls

__all__ = ["Reply", "ScriptedLLM", "code", "error", "text", "tool_call", "tool_calls"]
