"""Shared fixtures: tiny random-weight transformers models built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter, which must be on before triton is
# first imported (anything may import it: Inductor does): so at the start of the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(layers: int = 2, seed: int = 0, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval()


def tiny_bert(layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=128)
    return BertModel(config).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache entries leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


def tiny_model(family: str, seed: int = 0):
    """A tiny random-weight model of one architecture family, from its transformers config."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    if family == "llama":
        return tiny_llama(seed=seed)
    if family == "bert":
        return tiny_bert(seed=seed)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2)).eval()
    if family == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**common, num_key_value_heads=2, head_dim=16)).eval()
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)).eval()
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=128,
                                              word_embed_proj_dim=64)).eval()
    raise ValueError(f"unknown family {family!r}")
