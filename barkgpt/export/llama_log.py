"""llama.cpp's log, captured: its warnings go into the stage's report and the log gets one line.

llama.cpp logs through one process-wide callback (`llama_log_set`). llama-cpp-python installs one
that maps ggml's log levels with an out-of-date table (ggml's WARN, 3, is taken for ERROR), so with
`verbose=False` every warning still reaches stderr: ~35 lines per quantization of a small model
("ncols 64 not divisible by 256 ... falling back to q5_0") and one `n_ctx_seq (256) > n_ctx_train
(64)` per model opened. Here one callback replaces it:

- inside `captured()`, warnings and errors are collected (whole lines; llama.cpp sends some lines
  in pieces) and errors still go to stderr, so a failure's cause stays visible;
- outside, warnings and errors go to stderr as before, info and debug chatter nowhere (unless
  `set_verbose(True)`: `load_lm(..., verbose=True)` asks for llama.cpp's whole log).

`summary(lines)` counts them by kind for a report, `one_line(...)` is the single log line.
"""
from __future__ import annotations

import ctypes
import re
import sys
import threading
from collections import Counter
from contextlib import contextmanager

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line)
INFO, WARN, ERROR, CONT = 2, 3, 4, 5

_lock = threading.Lock()
_collectors: list[list[str]] = []
_pending = {"level": 0, "text": ""}
_callback = None  # the ctypes callback must outlive every call llama.cpp makes to it
_verbose = [False]


def set_verbose(on: bool) -> None:
    """Also print llama.cpp's info lines (its whole load log); for debugging a model that will not load."""
    install()
    _verbose[0] = on


def _emit(level: int, line: str) -> None:
    line = line.rstrip()
    if not line:
        return
    if level < WARN:
        if _verbose[0] and level >= INFO:  # asked for: llama.cpp's whole log, as llama.cpp prints it
            print(line, file=sys.stderr, flush=True)
        return
    if _collectors:
        _collectors[-1].append(line)
        if level >= ERROR:
            print(line, file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def _on_log(level: int, text: bytes, _user_data) -> None:
    piece = (text or b"").decode("utf-8", errors="replace")
    with _lock:
        if level != CONT:
            if _pending["text"] and level != _pending["level"] and not _pending["text"].endswith("\n"):
                # a new message of another level: the unfinished one is complete
                _emit(_pending["level"], _pending["text"])
                _pending["text"] = ""
            _pending["level"] = level if not _pending["text"] else _pending["level"]
        _pending["text"] += piece
        if _pending["text"].endswith("\n"):
            _emit(_pending["level"], _pending["text"])
            _pending["text"] = ""


def install() -> None:
    """Route llama.cpp's log through `_on_log` (idempotent; call after importing llama_cpp)."""
    global _callback
    import llama_cpp

    if _callback is None:
        _callback = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


@contextmanager
def captured():
    """Collect llama.cpp's warnings (and errors) logged inside the block into the yielded list."""
    install()
    lines: list[str] = []
    with _lock:
        _collectors.append(lines)
    try:
        yield lines
    finally:
        with _lock:
            if _pending["text"]:
                _emit(_pending["level"], _pending["text"])
                _pending["text"] = ""
            _collectors.remove(lines)


# "warning: blk.0.attn_k.weight - ncols 64 not divisible by 256 (required for type q4_K) -> falling
# back to q5_0": one line per tensor; the kind of warning is the text with names and numbers masked.
_FALLBACK = re.compile(r"^warning: (\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\)"
                       r"\s*-> falling back to\s+(\w+)")
_NUMBER = re.compile(r"\d+")


def kind(line: str) -> str:
    if _FALLBACK.match(line):
        return "tensor fell back to another type (rows do not fill the type's blocks)"
    if "tensor(s) required fallback quantization" in line:
        return "llama.cpp's count of those fallbacks"
    return _NUMBER.sub("N", line)


# Warnings that BarkGPT's own models always give, and why each is harmless: the report says so
# next to them, so that a reader can tell them from a warning that needs a look.
EXPLAINED = {
    "special_eos_id is not in special_eog_ids": (
        "bark's <EOS> is a word of its vocabulary, not one of the token texts llama.cpp knows as end of "
        "generation; llama.cpp adds the EOS id to that set itself, and generation stops on it (parity checks)"),
    "model vocab missing newline token": (
        "a word vocabulary has no newline token; nothing BarkGPT does with llama.cpp needs one"),
    "possible training context overflow": (
        "llama.cpp rounds the context up to a multiple of 256; prompts and replies stay within the trained "
        "context (the server and the gates cap them)"),
    "fell back to another type": (
        "a small model's rows do not fill a 256-value k-quant block, so llama.cpp quantizes those tensors "
        "with the fallback type it names (listed under the quantization's fallbacks)"),
    "count of those fallbacks": "the total of the fallbacks above",
}


def summary(lines: list[str]) -> list[dict]:
    """[{"kind", "count", "lines", "explained"?}] by kind, most frequent first, for a JSON report. A
    list, so that `dvc metrics show` (which skips lists) gets no column from it when the report is a
    DVC metric. `explained` says why a warning BarkGPT's models always give is harmless."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(kind(line), []).append(line)
    out = []
    for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        why = next((reason for text, reason in EXPLAINED.items() if text in k), None)
        out.append({"kind": k, "count": len(v), "lines": v, **({"explained": why} if why else {})})
    return out


def one_line(what: str, lines: list[str], where: str) -> str:
    """`quantize bark q4_k_m: 15 llama.cpp warnings (14 x tensor fell back ...); see reports/...`"""
    if not lines:
        return f"{what}: no llama.cpp warnings"
    kinds = Counter(kind(line) for line in lines).most_common()
    shown = "; ".join(f"{n} x {k}" for k, n in kinds[:2]) + ("; ..." if len(kinds) > 2 else "")
    return f"{what}: {len(lines)} llama.cpp warning{'s' * (len(lines) != 1)} ({shown}); listed in {where}"
