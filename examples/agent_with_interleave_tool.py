"""Example: an agent calls the pipeline as a tool, and a parent graph runs it as a subgraph."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import END, START, StateGraph

from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.context import Context
from interleave_thinker.graph import build_graph
from interleave_thinker.models.profiles import load_profile
from interleave_thinker.runner import make_settings, trajectory_input
from interleave_thinker.state import Request, RunOptions, TrajectoryState
from interleave_thinker.tools.agent_tool import TOOL_NAME, create_interleave_tool
from interleave_thinker.workspace import Workspace

MODEL_ENV = "INTERLEAVE_EXAMPLE_MODEL"
STORY = "A robot wakes up. It walks to the window. It opens the curtains."
SYSTEM_PROMPT = (
    f"You help people make illustrated documents. Call {TOOL_NAME} with a clear request, "
    "then tell the user what each step shows; refer to images by their sha256."
)


class ScriptedAgentModel(BaseChatModel):
    """Stands in for an LLM offline: asks the tool for the user's request, then sums it up."""

    @property
    def _llm_type(self) -> str:
        return "scripted-agent"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedAgentModel:
        return self  # it knows its one tool already

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            steps = [line for line in last.text.splitlines() if line.startswith("Step ")]
            reply = AIMessage(f"Your document has {len(steps)} steps: " + "; ".join(steps))
        else:
            # A fixed call id: running the example again finds this call's finished thread.
            call = {"name": TOOL_NAME, "args": {"request": last.text}, "id": "call_example",
                    "type": "tool_call"}
            reply = AIMessage("", tool_calls=[call])
        return ChatResult(generations=[ChatGeneration(message=reply)])


def agent_model(kind: str) -> BaseChatModel:
    if kind == "scripted":
        return ScriptedAgentModel()
    name = os.environ.get(MODEL_ENV)
    if not name:
        sys.exit(f"--model real needs {MODEL_ENV}, e.g. {MODEL_ENV}=openai:gpt-5-mini")
    from langchain.chat_models import init_chat_model

    return init_chat_model(name)


async def agent_with_tool(args: argparse.Namespace, options: RunOptions,
                          model: BaseChatModel) -> None:
    print("== an agent with the interleave_document tool ==")
    tool = create_interleave_tool(profile=args.profile, options=options, run_dir=args.run_dir)
    agent = create_agent(model, [tool], system_prompt=SYSTEM_PROMPT)
    result = await agent.ainvoke({"messages": [{"role": "user", "content": args.request}]})
    for message in result["messages"]:
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                print(f"tool call: {call['name']} {json.dumps(call['args'])}")
            if message.text:
                print(f"agent answer: {message.text}")
        elif isinstance(message, ToolMessage):
            print("tool result (what the agent reads):")
            print("\n".join(f"  | {line}" for line in message.text.splitlines()))
        else:
            print(f"{message.type}: {message.text}")


class IllustratedState(TrajectoryState, total=False):
    """The parent's state: its own fields plus the trajectory fields the subgraph reads."""

    topic: str
    summary: str


async def graph_as_subgraph(args: argparse.Namespace, options: RunOptions) -> None:
    print("\n== the trajectory graph as a node of a parent graph ==")
    backends = load_profile(args.profile)
    settings = make_settings(args.profile, backends, options)
    workspace = Workspace.open(args.run_dir)

    def prepare(state: IllustratedState) -> dict[str, Any]:
        return {**trajectory_input(Request(text=state["topic"]), settings)}

    def summarise(state: IllustratedState) -> dict[str, Any]:
        document = state["document"]
        assert document is not None
        shown = sum(step.image is not None for step in document.steps)
        return {"summary": f"{len(document.steps)} steps, {shown} with images"}

    # Same context schema as the subgraph: the context given to the parent reaches its nodes.
    builder = StateGraph(IllustratedState, context_schema=Context)
    builder.add_node("prepare", prepare)
    builder.add_node("illustrate", build_graph())  # compiled without a checkpointer: inherits
    builder.add_node("summarise", summarise)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "illustrate")
    builder.add_edge("illustrate", "summarise")
    builder.add_edge("summarise", END)

    url = f"sqlite:///{Path(args.run_dir).resolve() / 'parent.sqlite'}"
    async with open_checkpointer(url) as saver:
        parent = builder.compile(checkpointer=saver)
        config = {"configurable": {"thread_id": f"parent-{uuid.uuid4().hex[:8]}"}}
        final = await parent.ainvoke(
            {"topic": args.topic}, config, context=workspace.context(backends)
        )
        # The subgraph's checkpoints sit in the parent's saver, under the parent's thread.
        namespaces = sorted({
            item.config["configurable"]["checkpoint_ns"]
            async for item in saver.alist(config)
            if item.config["configurable"]["checkpoint_ns"]
        })
    print(f"parent checkpointer: {url}")
    print(f"subgraph checkpoints: {', '.join(namespaces)}")
    print(f"parent summary: {final['summary']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["scripted", "real"], default="scripted",
                        help=f"the agent's chat model: scripted (offline) or ${MODEL_ENV}")
    parser.add_argument("--profile", default="test", help="backends of the pipeline itself")
    parser.add_argument("--run-dir", default="example-runs", help="images, ledger, checkpoints")
    parser.add_argument("--request", default=STORY, help="what the user asks the agent")
    parser.add_argument("--topic", default="A seed falls. Rain comes. It blooms.",
                        help="what the parent graph illustrates")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    args = parser.parse_args()
    options = RunOptions(width=args.size, height=args.size)
    asyncio.run(agent_with_tool(args, options, agent_model(args.model)))
    asyncio.run(graph_as_subgraph(args, options))


if __name__ == "__main__":
    main()
