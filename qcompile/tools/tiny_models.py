"""Tiny random-weight models of twelve Hugging Face architectures, built from their transformers
configs (nothing downloads): what `qcompile zoo-matrix` and the architecture tests compile.

Each family is 2 layers of width 64 over a 256-token vocabulary, in the structure its
architecture really has: Llama, Mistral, Qwen2, Qwen3 (q/k norms), Gemma, Gemma 2 (sandwich
norms, soft-capped logits), Phi-3 (fused qkv and gate_up), GPT-2 (Conv1D: transposed weights
in an addmm), OPT, BERT (post-norm encoder), BART (encoder-decoder, post-norm) and Mixtral
(mixture of experts: a router linear and 3-D expert weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

VOCAB = 256
# the sizes every family shares: 2 layers of width 64, 4 heads of 16
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)


def tiny_llama(layers: int = 2, seed: int = 0, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval()


def tiny_bert(layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=128)
    return BertModel(config).eval()


def _config_models(seed: int) -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as tf

    kv = dict(num_key_value_heads=2)
    return {
        "llama": lambda: tiny_llama(seed=seed),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_COMMON, **kv)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_COMMON, **kv)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_COMMON, **kv, head_dim=16)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_COMMON, **kv, head_dim=16)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_COMMON, **kv, head_dim=16)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON, **kv, pad_token_id=0, eos_token_id=2)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                         n_positions=128, bos_token_id=0, eos_token_id=0)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                      num_attention_heads=4, max_position_embeddings=128,
                                                      word_embed_proj_dim=64)),
        "bert": lambda: tiny_bert(seed=seed),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_COMMON, **kv, num_local_experts=4,
                                                                  num_experts_per_tok=2)),
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """How to call one family: its inputs are token ids (and a decoder's for an encoder-decoder);
    `output` picks the tensor to compare (logits, or BERT's last hidden state)."""

    name: str
    decoder_inputs: bool = False  # an encoder-decoder: also decoder_input_ids
    causal_lm: bool = True  # has logits and a KV cache (use_cache=False for a plain forward)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The tiny model, eval mode, in `dtype`; the same weights for the same seed."""
        torch.manual_seed(seed)
        return _config_models(seed)[self.name]().eval().to(dtype)

    def inputs(self, seed: int, batch: int = 2, seq: int = 12) -> dict:
        """Keyword arguments of one call: token ids in [1, 256) (no padding id)."""
        g = torch.Generator().manual_seed(seed)
        kwargs = {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)}
        if self.decoder_inputs:
            kwargs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, max(1, seq // 2)), generator=g)
        if self.causal_lm:
            kwargs["use_cache"] = False
        return kwargs

    def output(self, out) -> torch.Tensor:
        return out.logits if self.causal_lm else out.last_hidden_state


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama"), Family("mistral"), Family("qwen2"), Family("qwen3"), Family("gemma"), Family("gemma2"),
    Family("phi3"), Family("gpt2"), Family("opt"), Family("bert", causal_lm=False),
    Family("bart", decoder_inputs=True), Family("mixtral"),
]}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random-weight model of one architecture family (`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family].build(seed, dtype)
