"""A small model of any local text: the WebText stages on a folder or file of your own (by default
this project's documentation), with its own params section (`localtext:` in params.yaml)."""
from pydantic import Field

from barkgpt.params import ModelParams, TrainParams
from barkgpt.pipelines.webtext import WebtextGates, WebtextPipeline, WebtextTokenizerParams, text_pipeline


class LocaltextPipeline(WebtextPipeline):
    """Any local text (a file or folder of .txt/.md/.jsonl/.parquet), the WebText stages, a small model."""

    source: str = Field("docs", description="a local .txt/.md/.jsonl/.parquet file or folder")
    tokenizer: WebtextTokenizerParams = WebtextTokenizerParams(vocab_size=512)
    model: ModelParams = ModelParams(n_layer=2, n_head=2, n_embd=64, block_size=64)
    train: TrainParams = TrainParams(max_steps=200, batch_size=16, learning_rate=3e-3, warmup_steps=20,
                                     threads=2, eval_every=100, eval_batches=4, checkpoint_every=100)
    gates: WebtextGates = WebtextGates(max_val_bpb=6.0)


PIPELINE = text_pipeline("localtext", "a small BPE model of a local text corpus (default: the project's docs)",
                         LocaltextPipeline, local_source=True)
