"""`barkgpt chat`: a terminal chat with a running server, streaming each reply as it arrives."""
from __future__ import annotations

import sys

from barkgpt.chat.client import openai_client, server_errors


def run_chat(url: str, api_key: str | None = None, temperature: float = 1.0, max_tokens: int = 32,
             stdin=None, stdout=None) -> list[dict]:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    with openai_client(url, api_key) as client, server_errors(url):
        model = client.models.list().data[0].id  # fails early, with a clear message, when no server is there
        stdout.write(f"chatting with {model} at {url}; empty line or Ctrl-D to quit\n")
        while True:
            stdout.write("you> ")
            stdout.flush()
            line = stdin.readline()
            if not line or not line.strip():
                break
            history.append({"role": "user", "content": line.strip()})
            stdout.write("bark> ")
            reply = []
            for chunk in client.chat.completions.create(model=model, messages=history, stream=True,
                                                        temperature=temperature, max_tokens=max_tokens):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    reply.append(piece)
                    stdout.write(piece)
                    stdout.flush()
            stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})
    return history
