"""ChatBarkGPT: LangChain's ChatOpenAI pointed at a BarkGPT server.

ChatOpenAI does the work (invoke, stream, batch and their async forms, usage, retries). What this
adds is the bark side: `base_url` is the server as `barkgpt serve` prints it, the key comes from
BARKGPT_API_KEY, no `model` means the one model the server serves, and `bark_prompt_for` shows the
prompt the server builds from LangChain messages (barkgpt/serve/contract.py: a user turn becomes
`User: speak`, an assistant turn `Assistant: <barks> <EOS>`).
"""
from __future__ import annotations

from langchain_core.messages import BaseMessage, convert_to_openai_messages
from langchain_openai import ChatOpenAI
from pydantic import Field, model_validator

from barkgpt.chat.client import DEFAULT_URL, api_key, api_url
from barkgpt.serve.contract import bark_prompt


def to_openai_messages(messages: list[BaseMessage]) -> list[dict]:
    return convert_to_openai_messages(messages)


def bark_prompt_for(messages: list[BaseMessage]) -> str:
    """The prompt-contract text the bark model sees for these messages."""
    return bark_prompt(to_openai_messages(messages))


class ChatBarkGPT(ChatOpenAI):
    model_name: str = Field(default="", alias="model")  # "": the server's one model
    temperature: float | None = 1.0
    max_tokens: int | None = Field(default=32, alias="max_completion_tokens")

    @model_validator(mode="before")
    @classmethod
    def _point_at_barkgpt(cls, values: dict) -> dict:
        values = dict(values)
        values["base_url"] = api_url(values.pop("base_url", None) or values.pop("openai_api_base", None)
                                     or DEFAULT_URL)
        values["api_key"] = api_key(values.pop("api_key", None) or values.pop("openai_api_key", None))
        return values

    @property
    def _llm_type(self) -> str:
        return "barkgpt"
