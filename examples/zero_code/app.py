"""An AG2 app with no tracing code: run it under `opentelemetry-instrument` and every step is traced.

    OTEL_TRACES_EXPORTER=console opentelemetry-instrument python examples/zero_code/app.py
"""

from autogen import ConversableAgent

from otel_cmbagent.testing import ScriptedLLM, text

with ScriptedLLM([text("Hello from the scripted model."), text("TERMINATE")]) as llm:
    assistant = ConversableAgent("assistant", llm_config=llm.llm_config(price=[0, 0]))
    user = ConversableAgent("user", llm_config=False, human_input_mode="NEVER", code_execution_config=False)
    user.initiate_chat(assistant, message="Say hello.", max_turns=2, silent=True)
print("chat finished")
