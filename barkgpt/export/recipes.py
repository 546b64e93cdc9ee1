"""Serving an exported GGUF without BarkGPT: an Ollama Modelfile and llama.cpp server commands.

The GGUF already carries the tokenizer and (bark) a Jinja chat template, so llama.cpp's own
server needs only the file and the context length. Ollama reads Go templates instead of Jinja, so
the Modelfile spells the bark prompt contract again: every user turn becomes `User: speak` (the
only user turn the model knows, as `barkgpt serve` does), every assistant turn
`Assistant: <barks> <EOS>`, and generation stops at `<EOS>`. docs/export.md shows how to use them.
"""
from __future__ import annotations

from pathlib import Path

from barkgpt.config import Params
from barkgpt.layout import Layout

def deploy_gguf(params: Params, name: str, root: Path | str = ".") -> Path:
    return Layout(name, Path(root)).gguf(params.deploy.quantization or params.export.deploy_quantization)


def context_length(params: Params, name: str) -> int:
    return getattr(params, name).model.block_size


def ollama_modelfile(params: Params, name: str, root: Path | str = ".") -> str:
    """A Modelfile for `ollama create barkgpt-<name> -f exports/<name>/Modelfile` (FROM is relative
    to the Modelfile's folder, exports/<name>/; the GGUF is in quantized/ below it)."""
    import os

    lay = Layout(name, Path(root))
    gguf = deploy_gguf(params, name, root)
    cfg = getattr(params, name)
    lines = [f"# {name}: {gguf.name}, written by barkgpt (barkgpt/export/recipes.py)",
             f"FROM ./{os.path.relpath(gguf, lay.exports)}",
             f"PARAMETER num_ctx {context_length(params, name)}"]
    from barkgpt.pipelines import get

    lines += get(name).modelfile(cfg)  # the pipeline's prompt template and sampling
    return "\n".join(lines) + "\n"


def llama_server_commands(params: Params, name: str, root: Path | str = ".") -> dict[str, list[str]]:
    """Two ways to serve the deploy GGUF over an OpenAI-compatible API with stock llama.cpp."""
    gguf, n_ctx = str(deploy_gguf(params, name, root)), str(context_length(params, name))
    alias = Path(gguf).stem
    return {
        # llama.cpp's own server binary; --jinja applies the chat template stored in the GGUF
        "llama-server": ["llama-server", "-m", gguf, "-c", n_ctx, "--jinja", "--host", "127.0.0.1", "--port", "8080",
                         "-a", alias],
        # the same server through llama-cpp-python (pip install 'llama-cpp-python[server]')
        "llama_cpp.server": ["python", "-m", "llama_cpp.server", "--model", gguf, "--n_ctx", n_ctx,
                             "--host", "127.0.0.1", "--port", "8080", "--model_alias", alias],
    }


def write_modelfile(params: Params, name: str, root: Path | str = ".") -> Path:
    from barkgpt.fileio import write_text

    path = Layout(name, Path(root)).exports / "Modelfile"
    write_text(path, ollama_modelfile(params, name, root))
    return path
