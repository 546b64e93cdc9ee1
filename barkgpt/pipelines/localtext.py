"""A small model of any local text: the WebText stages on a folder or file of your own (by default
this project's documentation), with its own params section (`localtext:` in params.yaml)."""
from barkgpt.pipelines.webtext import text_pipeline

PIPELINE = text_pipeline("localtext", "a small BPE model of a local text corpus (default: the project's docs)",
                         local_source=True)
