"""The `barkgpt` command: one sub-command per stage (what dvc.yaml runs), plus generate.

Errors a user can fix print one clear message and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.params import PIPELINES


def _params(args):
    from barkgpt.params import load_params

    return load_params(args.params)


def cmd_bark_data(args) -> None:
    from barkgpt import stages

    out = stages.bark_data(_params(args))
    print(f"wrote {out['train']} and {out['val']}")


def cmd_webtext_ingest(args) -> None:
    from barkgpt import stages

    out = stages.webtext_ingest(_params(args))
    print(f"{out['source']}: {out['train_lines']:,} train lines, {out['val_lines']:,} val lines "
          f"({out['clean_duplicates']:,} duplicates, {out['clean_empty_or_short']:,} empty/short, "
          f"{out['clean_too_long']:,} over-long dropped)")


def cmd_webtext_tokenizer(args) -> None:
    from barkgpt import stages

    out = stages.webtext_tokenizer(_params(args))
    print(f"tokenizer {out['kind']} vocab {out['vocab_size']:,} hash {out['tokenizer_hash']}: "
          f"{out['val_bytes_per_token']:.3f} bytes/token on the validation split")


def cmd_validate(args) -> None:
    from barkgpt import stages

    report = stages.validate(_params(args), args.pipeline, tokens=args.tokens)
    print(f"{args.pipeline}: all {report['expectations']} expectations passed; "
          f"report: reports/{args.pipeline}/validation{'_tokens' if args.tokens else ''}.html")


def cmd_tokenize(args) -> None:
    from barkgpt import stages

    out = stages.tokenize(_params(args), args.pipeline)
    for split, manifest in out.items():
        print(f"{split}: {manifest['tokens']:,} tokens")


def cmd_train(args) -> None:
    from barkgpt import stages

    summary = stages.train(_params(args), args.pipeline, resume=args.resume, progress=not args.quiet)
    bpb = f", val bpb {summary['val_bpb']:.4f}" if summary.get("val_bpb") is not None else ""
    print(f"trained {summary['step']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.1f}s "
          f"({summary['tokens_per_s']:,.0f} tok/s); val loss {summary['best_val_loss']:.4f}{bpb}")


def cmd_evaluate(args) -> None:
    from barkgpt import stages

    metrics = stages.evaluate(_params(args), args.pipeline)
    print(json.dumps(metrics, indent=2))


def cmd_export(args) -> None:
    from barkgpt import stages

    for kind, path in stages.export(_params(args), args.pipeline).items():
        print(f"{kind}: {path}")


def cmd_quantize(args) -> None:
    from barkgpt import stages

    for kind, path in stages.quantize(_params(args), args.pipeline).items():
        print(f"{kind}: {path}")


def cmd_parity(args) -> None:
    from barkgpt import stages

    out = stages.parity(_params(args), args.pipeline)
    print(json.dumps(out, indent=2))


def cmd_generate(args) -> None:
    from dataclasses import replace

    import torch

    from barkgpt.checkpoint import load_model
    from barkgpt.engine import Sampling, generate_text
    from barkgpt.stages import paths_for

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    ckpt = Path(args.checkpoint) if args.checkpoint else paths_for(args.pipeline).checkpoint
    model, tok = load_model(ckpt)
    s = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 max_new_tokens=args.max_new_tokens, seed=args.seed)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        completion = generate_text(model, tok, args.prompt, replace(s, seed=seed))
        print(f"{args.prompt} {completion}".strip())


def cmd_serve(args) -> None:
    from barkgpt.serve import launch
    from barkgpt.serve.backends import resolve_model
    from barkgpt.serve.settings import load_settings

    settings = load_settings(args.params, host=args.host, port=args.port, backend=args.backend,
                             model=args.model, chat_format=args.chat_format, model_id=args.model_id,
                             threads=args.threads, workers=args.workers)
    resolve_model(settings.serve, settings.root)  # a missing model fails here, with the fix named
    s = settings.serve
    print(f"BarkGPT serving on http://{s.host}:{s.port}/ (chat page), OpenAI API at /v1", file=sys.stderr)
    launch.run(settings, args.log_level)


def cmd_chat(args) -> None:
    from barkgpt.chat.terminal import run_chat

    run_chat(args.url, api_key=args.api_key, temperature=args.temperature, max_tokens=args.max_tokens)


def cmd_deploy(args) -> None:
    from barkgpt import stages

    report = stages.deploy(_params(args), args.pipeline)
    fn, rel = report["function"], report["release"]
    print(f"release {rel['id']} ({rel['status']}) at {rel['manifest_uri']}")
    print(f"function {fn['name']} version {fn['version']} (alias {fn['alias']}; changed: "
          f"{', '.join(fn['changed']) or 'nothing'}) on {report['target']}")
    print(f"url {fn['url']} (auth {fn['url_auth_type']}); report reports/{args.pipeline}/deploy.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="barkgpt", description="Train, evaluate and ship tiny GPTs.")
    parser.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("bark-data", help="generate the synthetic bark conversations").set_defaults(fn=cmd_bark_data)
    sub.add_parser("webtext-ingest", help="read, clean and split the WebText-2 source (webtext.source)"
                   ).set_defaults(fn=cmd_webtext_ingest)
    sub.add_parser("webtext-tokenizer", help="train the byte-level BPE on the WebText-2 training split"
                   ).set_defaults(fn=cmd_webtext_tokenizer)

    p = sub.add_parser("validate", help="check a pipeline's data with Great Expectations suites")
    p.add_argument("pipeline", choices=PIPELINES)
    p.add_argument("--tokens", action="store_true",
                   help="check the token shards (ids, manifest counts, tokenizer hash) instead of the text")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("tokenize", help="encode a pipeline's text splits into token shards")
    p.add_argument("pipeline", choices=PIPELINES)
    p.set_defaults(fn=cmd_tokenize)

    p = sub.add_parser("train", help="train a pipeline's model")
    p.add_argument("pipeline", choices=PIPELINES)
    p.add_argument("--resume", action="store_true", help="continue from models/<pipeline>/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model and write its metrics JSON")
    p.add_argument("pipeline", choices=PIPELINES)
    p.set_defaults(fn=cmd_evaluate)

    for cmd, fn, text in (("export", cmd_export, "write GGUF (F32, F16) and Hugging Face files"),
                          ("quantize", cmd_quantize, "quantize the F32 GGUF with llama.cpp (Q8_0, Q4_0, Q4_K_M)"),
                          ("parity", cmd_parity, "compare llama.cpp with PyTorch, gate the quantizations")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("pipeline", choices=PIPELINES)
        p.set_defaults(fn=fn)

    p = sub.add_parser("generate", help="complete a prompt with a trained model")
    p.add_argument("--prompt", default="User: speak Assistant:")
    p.add_argument("--pipeline", default="bark", choices=PIPELINES)
    p.add_argument("--checkpoint", help="checkpoint file (default: models/<pipeline>/best.pt)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API and a chat page")
    p.add_argument("--host", help="default: serve.host (env BARKGPT_SERVE_HOST)")
    p.add_argument("--port", type=int, help="default: serve.port (env BARKGPT_SERVE_PORT)")
    p.add_argument("--backend", choices=["llama", "torch"], help="default: serve.backend (env BARKGPT_BACKEND)")
    p.add_argument("--model", help="a .gguf or .pt file (default: the pipeline's deploy model; env BARKGPT_MODEL)")
    p.add_argument("--model-id", help="the name clients use (default: from the file)")
    p.add_argument("--chat-format", help="llama.cpp chat format for GGUFs without a template, e.g. gemma")
    p.add_argument("--threads", type=int, help="decode threads (default: serve.threads)")
    p.add_argument("--workers", type=int, help="server processes, each with its own model (default: serve.workers)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("chat", help="chat with a running server in the terminal")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="bearer key (default: env BARKGPT_API_KEY)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("deploy", help="release the gated model to S3 and serve it from AWS Lambda "
                                      "(a local AWS API server when no AWS configuration exists)")
    p.add_argument("pipeline", nargs="?", default="bark", choices=PIPELINES)
    p.set_defaults(fn=cmd_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
