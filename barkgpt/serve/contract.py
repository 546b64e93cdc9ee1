"""Chat messages -> the bark model's prompt contract.

The bark vocabulary has nine words, so a user's own words cannot be represented. The mapping:
- each user turn (consecutive user messages count as one) becomes `User: speak`;
- each assistant turn becomes `Assistant: <its barks> <EOS>` (punctuation and case are ignored,
  words that are not barks are dropped;
  a turn with no barks left becomes `woof`, so the history keeps its shape);
- system and tool messages are dropped;
- the prompt ends with `Assistant:` so the model answers the last user turn.
Old turns are dropped from the front when the conversation does not fit the model's context.
"""
from __future__ import annotations

from barkgpt.errors import BarkError
from barkgpt.params import BARKS
from barkgpt.tokenizer import ASSISTANT, EOS, SPEAK, USER

USER_TURN = f"{USER} {SPEAK}"


def message_text(content) -> str:
    """OpenAI content is a string or a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if isinstance(part, dict))


def bark_turns(messages: list[dict]) -> list[str]:
    """Messages ({"role", "content"}) -> contract turns, the last one an open `User: speak Assistant:`."""
    turns: list[str] = []
    pending_user = False
    for m in messages:
        role = m.get("role")
        if role == "user":
            pending_user = True
        elif role == "assistant":
            words = (w.strip(".,;:!?\"'()").lower() for w in message_text(m.get("content")).split())
            barks = [w for w in words if w in BARKS] or ["woof"]
            turns.append(" ".join([USER_TURN, ASSISTANT, *barks, EOS]))
            pending_user = False
    if not pending_user:
        raise BarkError("the last chat message must be from the user (role 'user'); the model answers it")
    turns.append(f"{USER_TURN} {ASSISTANT}")
    return turns


def bark_prompt(messages: list[dict], max_words: int | None = None) -> str:
    """The contract prompt; with `max_words`, the oldest turns are dropped until it fits."""
    turns = bark_turns(messages)
    if max_words is not None:
        while len(turns) > 1 and sum(len(t.split()) for t in turns) > max_words:
            turns.pop(0)
    return " ".join(turns)
