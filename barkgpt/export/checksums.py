"""The sha256 of each file the export stages write, checked before the file is used.

Pre-flight proves a GGUF's structure; only the digest its stage recorded proves it is the file that
stage wrote: a GGUF with one flipped weight byte is still a valid GGUF, and llama.cpp would serve
it. The export stage records its files in reports/<p>/export.json, the quantize stage in
quantization.json; quantize, parity and `barkgpt serve` check a file against its record first.
"""
from __future__ import annotations

from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.fileio import read_json, sha256_file
from barkgpt.layout import Layout


def file_record(path: Path) -> dict:
    """What a stage's report says about a file it wrote."""
    path = Path(path)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _recorded(lay: Layout, path: Path) -> tuple[str | None, Path | None]:
    target = Path(path).resolve()
    for report in (lay.export_report, lay.quantization_report):
        entries = read_json(report) if report.exists() else {}
        for variant, entry in (entries.items() if isinstance(entries, dict) else ()):
            if isinstance(entry, dict) and lay.gguf(variant).resolve() == target:
                return entry.get("sha256"), report
    return None, None


def verify_recorded(lay: Layout, path: Path, required: bool = True) -> str | None:
    """The file's sha256, after checking it against its stage's record. A file no stage recorded
    is refused when `required` (parity judges only the pipeline's own files), else passed."""
    expected, report = _recorded(lay, path)
    redo = f"re-run the export and quantize stages (barkgpt export {lay.pipeline}; barkgpt quantize {lay.pipeline})"
    if expected is None:
        if required:
            raise BarkError(f"{path}: no sha256 recorded for it in {lay.export_report} or "
                            f"{lay.quantization_report}; {redo}")
        return None
    actual = sha256_file(path)
    if actual != expected:
        raise BarkError(f"{path}: sha256 {actual[:12]}... differs from {expected[:12]}... recorded in {report}; "
                        f"the file changed after it was written (damaged or replaced): {redo}, or restore it "
                        "(dvc checkout)")
    return actual
