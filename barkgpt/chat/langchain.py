"""ChatBarkGPT: a LangChain chat model that talks to the BarkGPT server.

LangChain messages become OpenAI chat messages here (`to_openai_messages`); the server maps them
to the model's prompt contract (barkgpt/serve/contract.py: a user turn is `User: speak`, an
assistant turn `Assistant: <barks> <EOS>`). `bark_prompt_for` shows that prompt client-side.
invoke, stream, batch and their async forms all work (batch comes from BaseChatModel).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, PrivateAttr

from barkgpt.chat.client import BarkClient
from barkgpt.serve.contract import bark_prompt

ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def to_openai_messages(messages: list[BaseMessage]) -> list[dict]:
    out = []
    for m in messages:
        role = m.role if isinstance(m, ChatMessage) else ROLES.get(m.type, "user")
        content = m.content if isinstance(m.content, str) else " ".join(
            p.get("text", "") if isinstance(p, dict) else str(p) for p in m.content)
        out.append({"role": role, "content": content})
    return out


def bark_prompt_for(messages: list[BaseMessage]) -> str:
    """The prompt-contract text the bark model sees for these messages."""
    return bark_prompt(to_openai_messages(messages))


class ChatBarkGPT(BaseChatModel):
    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None
    temperature: float = 1.0
    max_tokens: int | None = 32
    top_p: float | None = None
    seed: int | None = None
    timeout: float = 30.0
    retries: int = 3
    extra: dict[str, Any] = Field(default_factory=dict)
    _client: BarkClient | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "barkgpt"

    @property
    def _identifying_params(self) -> dict:
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature}

    @property
    def client(self) -> BarkClient:
        if self._client is None:
            self._client = BarkClient(self.base_url, self.api_key, timeout=self.timeout, retries=self.retries)
        return self._client

    def _options(self, stop: list[str] | None, kwargs: dict) -> dict:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p, "seed": self.seed, "stop": stop, **self.extra, **kwargs}

    @staticmethod
    def _result(resp: dict) -> ChatResult:
        choice = resp["choices"][0]
        msg = AIMessage(content=choice["message"]["content"], response_metadata={
            "finish_reason": choice.get("finish_reason"), "model_name": resp.get("model")})
        usage = resp.get("usage") or {}
        if usage:
            msg.usage_metadata = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                                  "total_tokens": usage["total_tokens"]}
        return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model": resp.get("model")})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(self.client.chat(to_openai_messages(messages), **self._options(stop, kwargs)))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(await self.client.achat(to_openai_messages(messages), **self._options(stop, kwargs)))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for text in self.client.stream(to_openai_messages(messages), **self._options(stop, kwargs)):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for text in self.client.astream(to_openai_messages(messages), **self._options(stop, kwargs)):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                await run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
