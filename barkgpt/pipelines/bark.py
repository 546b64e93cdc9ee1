"""The bark pipeline: synthetic conversations under the prompt contract, a word vocabulary, and
contract accuracy as the metric (`User: speak Assistant: woof arf <EOS>`)."""
from __future__ import annotations

from pydantic import Field, model_validator

from barkgpt.layout import Layout
from barkgpt.params import BARKS, ModelParams, Strict, TrainParams
from barkgpt.pipelines import common
from barkgpt.pipelines.base import Pipeline, Stage

# --- its params section (`bark:` in params.yaml) --------------------------------------------------

class BarkDataParams(Strict):
    train_conversations: int = Field(4000, gt=0, le=10_000_000, description="at most 10 million")
    val_conversations: int = Field(400, gt=0, le=1_000_000, description="at most 1 million")
    max_barks: int = Field(4, ge=1, le=16, description="barks per assistant turn: 1..max_barks")
    max_turns: int = Field(3, ge=1, le=8, description="turns in a multi-turn conversation")
    multi_turn_share: float = Field(0.3, ge=0.0, le=1.0)
    bark_mix: dict[str, float] = Field(
        default_factory=lambda: {"woof": 0.4, "arf": 0.3, "ruff": 0.2, "grrr": 0.1}
    )

    @model_validator(mode="after")
    def _check_mix(self):
        unknown = sorted(set(self.bark_mix) - set(BARKS))
        if unknown:
            raise ValueError(f"bark_mix has unknown barks {unknown}; allowed: {list(BARKS)}")
        if any(w < 0 for w in self.bark_mix.values()) or sum(self.bark_mix.values()) <= 0:
            raise ValueError("bark_mix weights must be >= 0 with a positive sum")
        return self


class BarkEvalParams(Strict):
    temperature: float = Field(1.0, ge=0, description="contract samples are drawn at this temperature")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int = Field(24, ge=1, le=8192)
    batch_size: int = Field(32, ge=1, le=4096, description="validation windows per batch (bits per byte)")
    max_batches: int | None = Field(None, ge=1, le=100_000, description="None = the whole validation split")
    seed: int = 0
    ood_prompts: list[str] = Field(
        default_factory=lambda: [
            "User: woof Assistant:",
            "User: speak speak Assistant:",
            "Assistant:",
            "User: grrr arf Assistant:",
        ]
    )


class BarkGates(Strict):
    """The contract gate: a one-sided binomial test on `contract_samples` sampled completions
    (barkgpt/gates.py). It passes when at most k break the contract, k chosen so that a model whose
    true accuracy is `contract_accuracy` passes with probability >= `pass_probability`."""

    contract_samples: int = Field(1000, ge=1, le=1_000_000, description="n: completions sampled per model and GGUF")
    contract_accuracy: float = Field(0.995, gt=0, lt=1, description="a model this good must pass ...")
    pass_probability: float = Field(0.999, gt=0, lt=1, description="... at least this often")
    reject_accuracy: float = Field(0.97, gt=0, lt=1, description="reported: how often a model this bad passes")

    def quality_checks(self, prefix: str, measured: dict) -> list:
        """The contract test on an evaluation report or a GGUF's quality (what gates.judge asks)."""
        from barkgpt.gates import Check, contract_test

        test = contract_test(self)
        n, failures = measured.get("contract_samples"), measured.get("contract_failures")
        if n != test.samples or failures is None:
            return [Check(prefix + "contract", False, f"measured on {n} samples, the test needs "
                          f"{test.samples}; re-run the stage")]
        ok = failures <= test.max_failures
        checks = [Check(prefix + "contract", ok, f"{failures} of {n} failed "
                        f"({'<=' if ok else '>'} {test.max_failures})")]
        # The rate is re-derived from the raw count: a report whose numbers disagree was edited.
        accuracy = measured.get("contract_accuracy")
        if accuracy is not None and abs(accuracy - (1 - failures / n)) > 1e-12:
            checks.append(Check(prefix + "contract.consistent", False, f"contract_accuracy {accuracy} is not "
                                f"1 - {failures}/{n}; the report was edited: re-run the stage"))
        return checks


class BarkValidateParams(Strict):
    """Great Expectations suite settings for the bark data (barkgpt/validation.py)."""

    mix_tolerance: float = Field(0.05, gt=0, le=1, description="max |observed - configured| bark share")


class BarkPipeline(Strict):
    data: BarkDataParams = BarkDataParams()
    validation: BarkValidateParams = BarkValidateParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: BarkEvalParams = BarkEvalParams()
    gates: BarkGates = BarkGates()


# --- its stages and hooks -------------------------------------------------------------------------


def generate_data(params, pipe, lay: Layout) -> dict:
    from barkgpt.data.bark import write_bark_data

    out = write_bark_data(params.bark.data, params.seed, lay.data)
    return {split: str(path) for split, path in out.items()}


def word_tokenizer(params, lay: Layout):
    """The fixed bark vocabulary, saved beside the shards so every later stage reads the same one."""
    from barkgpt.tokenizer import WordTokenizer, save_tokenizer

    tok = WordTokenizer()
    save_tokenizer(tok, lay.tokenizer)
    return tok


def evaluate(params, pipe, lay: Layout) -> tuple[dict, dict]:
    """Bits per byte, loss, the contract test's failures, multi-turn and OOD rates, plus samples."""
    from barkgpt.evaluate import evaluate_bark, open_for_evaluation
    from barkgpt.stages import read_lines

    cfg = params.bark
    lm, val_ids, token_bytes = open_for_evaluation(lay, cfg.train.threads)
    return evaluate_bark(lm, val_ids, read_lines(lay.val_text), token_bytes, cfg.eval, cfg.gates)


def suites(params, lay):
    from barkgpt.validation import bark_suites

    return bark_suites(params, lay)


def token_suites(params, lay):
    from barkgpt.validation import token_suites as shard_suites

    return shard_suites(params, lay)


def gate_test(gates) -> dict:
    """The binomial test behind the gate, with its error rates, for metrics.json."""
    from barkgpt.gates import contract_test

    return contract_test(gates).__dict__


def greedy_prompts(tok, val_lines: list[str], n_ctx: int) -> list[list[int]]:
    """The contract prompt, an out-of-distribution one, a bare turn and multi-turn conversations."""
    from barkgpt.evaluate import CONTRACT_PROMPT, multi_turn_prompts

    prompts = [CONTRACT_PROMPT, "User: woof Assistant:", "Assistant:"] + multi_turn_prompts(val_lines, 5)
    return [tok.encode(p) for p in prompts]


def input_example(section) -> str:
    from barkgpt.evaluate import CONTRACT_PROMPT

    return CONTRACT_PROMPT


# Ollama reads Go templates, not the GGUF's Jinja one: every user turn becomes `User: speak` (the
# only user turn the model knows), every assistant turn `Assistant: <barks> <EOS>`.
BARK_TEMPLATE = (
    '{{- range .Messages }}{{- if eq .Role "user" }}User: speak {{ else if eq .Role "assistant" }}'
    "Assistant: {{ .Content }} <EOS> {{ end }}{{- end }}Assistant:"
)


def modelfile(section) -> list[str]:
    """Ollama's Go template spells the prompt contract; sampling as the evaluation samples."""
    return [f'TEMPLATE """{BARK_TEMPLATE}"""',
            'PARAMETER stop "<EOS>"', 'PARAMETER stop "User:"',
            f"PARAMETER temperature {section.eval.temperature:g}",
            # like the evaluation: sample from the model's own distribution, no extra filters
            "PARAMETER top_k 0", "PARAMETER top_p 1", "PARAMETER min_p 0", "PARAMETER repeat_penalty 1",
            f"PARAMETER num_predict {section.eval.max_new_tokens}"]


PIPELINE = Pipeline(
    name="bark",
    description="the bark model: synthetic conversations, a 9-word vocabulary, contract accuracy",
    params_class=BarkPipeline,
    section=lambda params: params.bark,
    stages=(
        Stage("data", generate_data, "generate the synthetic bark conversations",
              params=("seed", "bark.data"),
              outs=lambda lay: [lay.train_text, lay.val_text], describe=common.files_written),
        common.validate_stage(params=("bark.data", "bark.validation", "bark.model.block_size")),
        common.tokenize_stage(writes_tokenizer=True),
        common.validate_tokens_stage(),
        *common.model_stages(train_after=lambda lay: [lay.token_validation_report],
                             parity_params=("bark.eval", "bark.gates"),  # parity runs the contract test
                             curve="loss"),  # bpb says little on a 9-word language; the loss falls visibly
    ),
    metric="contract_accuracy",
    higher_is_better=True,
    summary=(("contract_accuracy", "contract_accuracy"), ("gate_passed", "gate_passed")),
    evaluate=evaluate, suites=suites, token_suites=token_suites, gate_test=gate_test,
    greedy_prompts=greedy_prompts, input_example=input_example, modelfile=modelfile,
    tokens=word_tokenizer,
    eos_per_line=False,  # bark lines spell their own <EOS>
)
