"""A small LangGraph agent, as in the tutorial: the dog keeps barking while it is enthusiastic.

Each turn the model answers; a reply with at least `min_barks` barks counts as enthusiastic, and
then the user cheers it on ("speak!") for another turn. It stops when a reply is not enthusiastic
or after `max_turns` replies, whichever comes first.
"""
from __future__ import annotations

from typing import Annotated, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from barkgpt.params import BARKS


class BarkState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    turns: int
    enthusiastic: bool


def count_barks(text: str) -> int:
    return sum(1 for w in text.split() if w.strip(".,!?").lower() in BARKS)


def build_agent(model: BaseChatModel, max_turns: int = 3, min_barks: int = 2):
    def bark(state: BarkState) -> dict:
        reply = model.invoke(state["messages"])
        return {"messages": [reply], "turns": state.get("turns", 0) + 1,
                "enthusiastic": count_barks(str(reply.content)) >= min_barks}

    def cheer(state: BarkState) -> dict:
        return {"messages": [HumanMessage("speak!")]}

    def next_step(state: BarkState) -> str:
        return "cheer" if state["enthusiastic"] and state["turns"] < max_turns else END

    graph = StateGraph(BarkState)
    graph.add_node("bark", bark)
    graph.add_node("cheer", cheer)
    graph.add_edge(START, "bark")
    graph.add_conditional_edges("bark", next_step, ["cheer", END])
    graph.add_edge("cheer", "bark")
    return graph.compile()


def run_agent(model: BaseChatModel, opening: str = "speak", max_turns: int = 3, min_barks: int = 2) -> BarkState:
    agent = build_agent(model, max_turns, min_barks)
    return agent.invoke({"messages": [HumanMessage(opening)], "turns": 0, "enthusiastic": False},
                        {"recursion_limit": 2 * max_turns + 4})
