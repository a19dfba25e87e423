"""Turns a GGUF checkpoint into a safetensors model directory, once."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)


def packaged_gguf(package: str) -> Path:
    """The .gguf file a model package ships, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package!r} ships no .gguf file")
    return files[0]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize `gguf` into `out_dir` (safetensors + tokenizer); no-op if already there."""
    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        return out_dir
    logger.info("converting %s to a safetensors model in %s", gguf.name, out_dir)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir
