"""The `barkgpt` command: one sub-command per stage (what dvc.yaml runs), plus generate.

Errors a user can fix print one clear message and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from barkgpt.errors import BarkError


def _params(args):
    from barkgpt.config import load_params

    return load_params(args.params)


def cmd_stage(args) -> None:
    """Any pipeline stage: `barkgpt <stage> <pipeline> [options]` runs the declared stage function."""
    from barkgpt.layout import Layout
    from barkgpt.pipelines import get

    pipe = get(args.pipeline)
    stage = pipe.stage(args.stage)
    options = {o.dest: getattr(args, o.dest) for o in stage.options}
    lay = Layout(pipe.name)
    result = stage.run(_params(args), pipe, lay, **options)
    if _prints_summary(result):
        print(summarize(stage, result))


def _prints_summary(result: dict) -> bool:
    """Rank 0 prints the summary; not the other ranks, nor a launcher whose rank 0 already did."""
    from barkgpt.distributed import from_env, under_torchrun

    return from_env().is_main and not (result.get("nproc", 1) > 1 and not under_torchrun())


def summarize(stage, out: dict) -> str:
    """One readable line (or a few) per stage result: the stage's own words, else its JSON."""
    return stage.describe(out) if stage.describe else json.dumps(out, indent=2, default=str)


def cmd_report(args) -> None:
    from barkgpt.report import log_report, write_report

    params = _params(args)
    path = write_report(params, args.pipeline)
    run_id = log_report(params, args.pipeline, path=path)
    print(f"wrote {path}" + (f"; logged to MLflow run {run_id}" if run_id else ""))


def cmd_modelfile(args) -> None:
    import shlex

    from barkgpt.export.recipes import llama_server_commands, write_modelfile

    params = _params(args)
    path = write_modelfile(params, args.pipeline)
    print(f"wrote {path}: ollama create barkgpt-{args.pipeline} -f {path}")
    for name, cmd in llama_server_commands(params, args.pipeline).items():
        print(f"{name}: {shlex.join(cmd)}")


def cmd_generate(args) -> None:
    from dataclasses import replace

    from barkgpt.layout import Layout
    from barkgpt.lm import Sampling, generate_text, load_lm

    lm = load_lm(Path(args.model) if args.model else Layout(args.pipeline).checkpoint, threads=args.threads)
    s = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 max_new_tokens=args.max_new_tokens, seed=args.seed)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        print(args.prompt + generate_text(lm, args.prompt, replace(s, seed=seed)))  # the model's own spacing


def cmd_serve(args) -> None:
    from barkgpt.serve import launch
    from barkgpt.serve.backends import load_backend, resolve_model
    from barkgpt.serve.settings import load_settings

    settings = load_settings(args.params, host=args.host, port=args.port, backend=args.backend,
                             model=args.model, chat_format=args.chat_format, model_id=args.model_id,
                             threads=args.threads, workers=args.workers)
    path = resolve_model(settings.serve, settings.root)  # a missing model fails here, with the fix named
    try:  # load now (the app's start-up reuses it): a damaged model is a clear error, not a uvicorn traceback
        load_backend(settings.serve, settings.root)
    except BarkError:
        raise
    except Exception as err:
        raise BarkError(f"{path}: cannot load the model ({type(err).__name__}: {err}); re-export or re-train it, "
                        "or pass another --model") from None
    s = settings.serve
    print(f"BarkGPT serving on http://{s.host}:{s.port}/ (chat page), OpenAI API at /v1", file=sys.stderr)
    launch.run(settings, args.log_level)


def cmd_runs(args) -> None:
    from barkgpt.layout import Layout
    from barkgpt.runs import format_runs, human_size, prune_runs

    lay = Layout(args.pipeline)
    if args.prune:
        removed = prune_runs(lay)
        print(f"removed {len(removed)} run folder(s) from {lay.runs}, {human_size(sum(r['bytes'] for r in removed))}"
              + "".join(f"\n  {r['id']} ({r['status']})" for r in removed))
        return
    print(format_runs(lay))


def cmd_sweep(args) -> None:
    from barkgpt.config import parse_params
    from barkgpt.params import read_raw
    from barkgpt.pipelines import get
    from barkgpt.sweep import load_space, parse_grid, run_sweep, sweepable_keys

    raw = read_raw(args.params)
    if args.list_keys:
        for key, value in sweepable_keys(raw, args.pipeline).items():
            print(f"{key} = {value!r}")
        return
    if bool(args.grid) == bool(args.space):
        raise BarkError("give the search space once: --grid KEY=V1,V2 (repeatable) or --space FILE --trials N")
    space = parse_grid(args.grid) if args.grid else load_space(args.space)

    def show(r) -> None:
        value = "" if r.value is None else f" val_bpb {r.value:.4f}"
        gate = f", gate {'passed' if r.gate_passed else 'failed'}" if r.state == "complete" else ""
        print(f"trial {r.number} {r.state}{value}{gate} in {r.seconds:.0f}s: {r.experiment} "
              f"{r.params}" + (f" ({r.error})" if r.error else ""), flush=True)

    summary = run_sweep(parse_params(raw, args.params), raw, get(args.pipeline), Path("."), space, args.trials,
                        args.jobs, args.storage, args.study, not args.no_prune, on_result=show)
    best, champion = summary["best"], summary["champion"]
    print(f"best trial {best['trial']}: {best['experiment']} {best['params']}")
    if champion["trial"] == best["trial"]:
        print(f"champion: {champion['model']} version {champion['version']} (this trial)")
    else:
        print(f"champion: {champion['model']} version {champion['version']} stays: it ranks above this sweep's best")
    print(f"apply it to the workspace: dvc exp apply {best['experiment']}  (then `dvc repro` finishes export "
          f"and parity); compare: dvc exp show --only-changed; MLflow parent run {summary['parent_run_id']}")


def cmd_chat(args) -> None:
    from barkgpt.chat.terminal import run_chat

    run_chat(args.url, api_key=args.api_key, temperature=args.temperature, max_tokens=args.max_tokens)


def cmd_deploy(args) -> None:
    from barkgpt.deploy.deployer import deploy_pipeline

    report = deploy_pipeline(_params(args), args.pipeline, ".")
    fn, rel = report["function"], report["release"]
    print(f"release {rel['id']} ({rel['status']}) at {rel['manifest_uri']}")
    print(f"function {fn['name']} version {fn['version']} (alias {fn['alias']}; changed: "
          f"{', '.join(fn['changed']) or 'nothing'}) on {report['target']}")
    print(f"url {fn['url']} (auth {fn['url_auth_type']}); report reports/{args.pipeline}/deploy.json")


def cmd_stack(args) -> None:
    from barkgpt.stack.run import Stack, dvc_remote_commands, env_lines

    stack = Stack(args.dir)
    if args.action == "compose":
        from barkgpt.stack.compose import render

        text = render()
        if args.check:
            if not Path("compose.yaml").exists() or Path("compose.yaml").read_text() != text:
                raise BarkError("compose.yaml disagrees with barkgpt/stack/services.py: run `barkgpt stack compose --write`")
            print("compose.yaml agrees with the stack's declarations")
        elif args.write:
            from barkgpt.fileio import write_text

            write_text("compose.yaml", text)
            print("wrote compose.yaml")
        else:
            print(text, end="")
        return
    if args.action == "up":
        stack.up(args.base_port)
    if args.action == "down":
        stopped = stack.down()
        print(f"stack in {stack.state}: " + ("stopped" if stopped else "nothing was running"))
        return
    status = stack.status()
    if args.action == "env":
        if not status["env"]:
            raise BarkError(f"no stack in {stack.state}: start one with `barkgpt stack up`")
        print(env_lines(status["env"]))
        return
    print(f"stack in {status['state']}")
    for name, state in status["services"].items():
        print(f"  {name:15} {state}")
    env = status["env"]
    if env:
        print(f"MLflow tracking server  {env['MLFLOW_TRACKING_URI']}")
        print(f"Prefect API             {env['PREFECT_API_URL']}")
        print(f"S3 endpoint             {env['AWS_ENDPOINT_URL']}")
        print(f"Optuna storage          {env['BARKGPT_OPTUNA_STORAGE']} (password: PGPASSFILE={env['PGPASSFILE']})")
        print("use it from a shell:    eval \"$(barkgpt stack env)\"")
        print("DVC remote of a clone:  " + "; ".join(dvc_remote_commands()))


def _log_to_stderr() -> None:
    """barkgpt's own log lines (training progress, notes) on stderr, plain; other libraries untouched."""
    import logging

    logger = logging.getLogger("barkgpt")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def cmd_dvc_yaml(args) -> None:
    from barkgpt.pipelines.dvcfile import check_dvc_files, write_dvc_files

    if args.check:
        stale = check_dvc_files(Path("."))
        if stale:
            raise BarkError(f"{', '.join(stale)} disagree with the pipeline declarations (barkgpt/pipelines/); "
                            "regenerate with: barkgpt dvc-yaml")
        print("dvc.yaml files agree with the pipeline declarations")
        return
    written = write_dvc_files(Path("."), args.pipelines)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("dvc.yaml files already agree with the pipeline declarations")


def add_stage_commands(sub) -> None:
    """One sub-command per stage name; its pipelines are those that declare the stage."""
    from barkgpt.pipelines import REGISTRY

    seen: dict[str, list] = {}
    for pipe in REGISTRY.values():
        for stage in pipe.stages:
            seen.setdefault(stage.name, []).append((pipe, stage))
    for name, entries in seen.items():
        pipes = [pipe.name for pipe, _ in entries]
        stage = entries[0][1]
        p = sub.add_parser(name, help=f"{stage.help} ({', '.join(pipes)})", description=stage.help)
        p.add_argument("pipeline", choices=pipes, help="which pipeline's stage to run")
        for opt in stage.options:
            p.add_argument(*opt.flags, dest=opt.dest, help=opt.help, **opt.kwargs)
        p.set_defaults(fn=cmd_stage, stage=name)


def version_text() -> str:
    """`barkgpt 0.1.0 (torch 2.13.0, llama-cpp-python 0.3.36, python 3.11.2)`, read from package
    metadata so that --version imports neither torch nor llama.cpp."""
    from importlib import metadata

    from barkgpt import __version__

    engines = []
    for dist in ("torch", "llama-cpp-python"):
        try:
            engines.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            engines.append(f"{dist} not installed")
    engines.append(f"python {sys.version.split()[0]}")
    return f"barkgpt {__version__} ({', '.join(engines)})"


def build_parser() -> argparse.ArgumentParser:
    from barkgpt.pipelines import REGISTRY

    parser = argparse.ArgumentParser(prog="barkgpt", description="Train, evaluate and ship tiny GPTs.")
    parser.add_argument("--params", default="params.yaml", help="configuration file (default: params.yaml)")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the versions of barkgpt and the engines it runs on, then exit")
    sub = parser.add_subparsers(dest="command", required=True)

    add_stage_commands(sub)

    p = sub.add_parser("generate", help="complete a prompt with a trained model")
    p.add_argument("--prompt", default="User: speak Assistant:", help="text to continue (default: %(default)r)")
    p.add_argument("--pipeline", default="bark", choices=list(REGISTRY), help="default: bark")
    p.add_argument("--model", "--checkpoint", dest="model",
                   help="a .pt checkpoint (PyTorch) or a .gguf (llama.cpp) (default: models/<pipeline>/best.pt)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="0 (or anything below 1e-5) = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this probability (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="stop after this many tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed; sample i uses seed + i (default: random)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions to print (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="decode threads (default: %(default)s)")
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
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("sweep", help="train many variants of a pipeline (an Optuna study; each trial a DVC "
                                     "experiment and a nested MLflow run); the best gated one becomes champion",
                       description="Sweep a pipeline's params: every combination of --grid values, or --trials "
                                   "samples from a --space file (docs/experiments.md).")
    p.add_argument("pipeline", choices=list(REGISTRY), help="which pipeline to train")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="try every combination of these values (repeatable)")
    p.add_argument("--space", metavar="FILE", help="a YAML file of params keys with {low, high[, log, step]} "
                   "or {choices: [...]}, sampled by TPE (with --trials)")
    p.add_argument("--trials", type=int, help="how many trials (default with --grid: every combination)")
    p.add_argument("--jobs", type=int, default=1, help="trials at once on this machine, each with its share of "
                   "the cores (default: %(default)s)")
    p.add_argument("--study", help="the study's name; a name that exists on the storage is joined, so several "
                   "machines can share one study (default: <pipeline>-<UTC time>)")
    p.add_argument("--storage", help="Optuna storage URL (default: OPTUNA_STORAGE, else sweep.storage)")
    p.add_argument("--no-prune", action="store_true", help="let every trial finish")
    p.add_argument("--list-keys", action="store_true", help="print the keys a sweep can vary, and exit")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("chat", help="chat with a running server in the terminal")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="bearer key (default: env BARKGPT_API_KEY)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="longest reply in tokens (default: %(default)s)")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("deploy", help="release the gated model to S3 and serve it from AWS Lambda "
                                      "(a local AWS API server when no AWS configuration exists)")
    p.add_argument("pipeline", nargs="?", default="bark", choices=list(REGISTRY), help="default: bark")
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("runs", help="list the training runs in runs/<pipeline>/ (status, size); --prune removes "
                                    "all but the one --resume continues")
    p.add_argument("pipeline", choices=list(REGISTRY), help="which pipeline's runs")
    p.add_argument("--prune", action="store_true", help="remove every run folder but the one `train --resume` "
                   "would continue (promoted runs keep their model in models/<pipeline>/ and MLflow)")
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("report", help="write reports/<pipeline>/report.md (hardware, data, params, loss curve, "
                                      "evaluation, parity, deploy, timings) and log it to the MLflow run")
    p.add_argument("pipeline", choices=list(REGISTRY), help="which pipeline's run")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("modelfile", help="write exports/<pipeline>/Modelfile (Ollama) and print llama.cpp "
                                         "server commands for the deploy GGUF")
    p.add_argument("pipeline", choices=list(REGISTRY), help="which pipeline's exported model")
    p.set_defaults(fn=cmd_modelfile)

    p = sub.add_parser("stack", help="a team's services on loopback: PostgreSQL, MLflow server (S3 artifacts), "
                                     "Prefect server + worker, S3 (docs/team.md)")
    p.add_argument("action", choices=["up", "down", "status", "env", "compose"],
                   help="up: start and print the status; down: stop; status; env: export lines for a shell; "
                        "compose: print compose.yaml")
    p.add_argument("--dir", default=os.environ.get("BARKGPT_STACK_DIR", ".stack"),
                   help="the stack's state folder (default: env BARKGPT_STACK_DIR, else .stack)")
    base = os.environ.get("BARKGPT_STACK_BASE_PORT")
    p.add_argument("--base-port", type=int, default=int(base) if base else None,
                   help="up: ports base..base+3 for PostgreSQL, S3, MLflow, Prefect (default: env "
                        "BARKGPT_STACK_BASE_PORT, else 5433, 9000, 5000, 4200)")
    p.add_argument("--write", action="store_true", help="compose: write compose.yaml")
    p.add_argument("--check", action="store_true", help="compose: exit 2 unless compose.yaml agrees")
    p.set_defaults(fn=cmd_stack)

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml files from the pipeline declarations (barkgpt/pipelines/)")
    p.add_argument("pipelines", nargs="*", choices=[[]] + [n for n in REGISTRY if not REGISTRY[n].default],
                   metavar="PIPELINE", help="also add these pipelines' stages (pipelines/<name>/dvc.yaml); "
                   "the default pipeline's dvc.yaml and any already there are always rewritten")
    p.add_argument("--check", action="store_true", help="only check that the committed files agree; exit 2 if not")
    p.set_defaults(fn=cmd_dvc_yaml)
    return parser


def main(argv: list[str] | None = None) -> int:
    from barkgpt import warm

    argv = sys.argv[1:] if argv is None else list(argv)
    code = warm.run(argv)  # a stage command forks from a warm process when one is ready
    if code is not None:
        return code
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        args.fn(args)
    except BarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk, wherever it was met (a file, MLflow's SQLite store)
        from barkgpt.fileio import disk_full_cause

        cause = disk_full_cause(err)
        if cause is None:
            raise
        print(f"error: disk full: {cause}; free space on that filesystem (e.g. old exports/, mlruns/, "
              ".dvc/cache: dvc gc) and run the stage again (files written before, the last good model "
              "included, are kept)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
