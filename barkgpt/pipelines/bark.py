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
