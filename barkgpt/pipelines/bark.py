"""The bark pipeline: synthetic conversations under the prompt contract, a word vocabulary, and
contract accuracy as the metric (`User: speak Assistant: woof arf <EOS>`)."""
from __future__ import annotations

from barkgpt.layout import Layout
from barkgpt.pipelines import common
from barkgpt.pipelines.base import Pipeline, Stage


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


def _bark_suites(params, lay):
    from barkgpt.validation import bark_suites

    return bark_suites(params, lay)


def _token_suites(params, lay):
    from barkgpt.validation import token_suites

    return token_suites(params, lay)


PIPELINE = Pipeline(
    name="bark",
    description="the bark model: synthetic conversations, a 9-word vocabulary, contract accuracy",
    section=lambda params: params.bark,
    stages=(
        Stage("data", generate_data, "generate the synthetic bark conversations",
              code=("barkgpt/data/bark.py",), params=("seed", "bark.data"),
              outs=lambda lay: [lay.train_text, lay.val_text]),
        common.validate_stage(params=("bark.data", "bark.validation", "bark.model.block_size")),
        common.tokenize_stage(writes_tokenizer=True),
        common.validate_tokens_stage(),
        *common.model_stages(train_after=lambda lay: [lay.token_validation_report],
                             parity_params=("bark.eval", "bark.gates"),  # parity runs the contract test
                             curve="loss"),  # bpb says little on a 9-word language; the loss falls visibly
    ),
    metric="contract_accuracy",
    higher_is_better=True,
    summary=(("contract_accuracy", "contract_accuracy"), ("contract_accuracy_multi_turn", "multi_turn"),
             ("val_bpb", "val_bpb"), ("gate_passed", "gate_passed")),
    evaluate=evaluate,
    prompt_format="bark",
    tokens=word_tokenizer,
    extra={"suites": _bark_suites, "token_suites": _token_suites, "eos_per_line": False},  # bark lines spell their own <EOS>
)
