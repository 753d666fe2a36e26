"""Shared pieces of the trainer tests: a character tokenizer, tiny models, tiny datasets."""

from __future__ import annotations

import string

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(chat: bool = False, eos_after: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable character, ``<bos>`` in front (and ``<eos>`` behind with eos_after,
    as Llama tokenizers saved with ``add_eos_token``); optionally a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = [c for c in string.printable if not c.isspace() or c == " "]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A" + (" <eos>" if eos_after else ""),
                                                       special_tokens=[("<bos>", 1), ("<eos>", 2)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def _tiny(config_cls, model_cls, vocab: int, seed: int, **extra):
    """2 layers, hidden 32, 4 heads, the character tokenizer's special ids."""
    torch.manual_seed(seed)
    return model_cls(config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, **extra))


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """Llama: tied embeddings."""
    return _tiny(LlamaConfig, LlamaForCausalLM, vocab, seed, num_key_value_heads=4, tie_word_embeddings=True)


def tiny_phi(vocab: int, seed: int = 0) -> PhiForCausalLM:
    """Phi: an untied LM head with a bias."""
    model = _tiny(PhiConfig, PhiForCausalLM, vocab, seed)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    return model


def tiny_granite(vocab: int, seed: int = 0) -> GraniteForCausalLM:
    """Granite: logits divided by ``logits_scaling`` after the head."""
    return _tiny(GraniteConfig, GraniteForCausalLM, vocab, seed, num_key_value_heads=4, logits_scaling=8.0)


def tiny_cohere(vocab: int, seed: int = 0) -> CohereForCausalLM:
    """Cohere: logits multiplied by ``logit_scale`` after the (tied) head."""
    return _tiny(CohereConfig, CohereForCausalLM, vocab, seed, num_key_value_heads=4, logit_scale=0.25)


def tiny_gemma2(vocab: int, seed: int = 0) -> Gemma2ForCausalLM:
    """Gemma 2: logits capped by ``final_logit_softcapping`` after the (tied) head; a cap this small
    bends the tiny model's logits (up to about 0.4) well into the tanh."""
    return _tiny(Gemma2Config, Gemma2ForCausalLM, vocab, seed, num_key_value_heads=4, head_dim=8,
                 final_logit_softcapping=0.2)


def tiny_recurrent_gemma(vocab: int, seed: int = 0):
    """RecurrentGemma: logits capped by ``logits_soft_cap`` after the (tied) head."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    return _tiny(RecurrentGemmaConfig, RecurrentGemmaForCausalLM, vocab, seed, num_key_value_heads=4, head_dim=8,
                 lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"], logits_soft_cap=0.2)


def tiny_hyperclovax(vocab: int, seed: int = 0):
    """HyperCLOVA X: logits multiplied by ``logits_scaling`` (Granite divides by its own)."""
    from transformers import HyperCLOVAXConfig, HyperCLOVAXForCausalLM

    return _tiny(HyperCLOVAXConfig, HyperCLOVAXForCausalLM, vocab, seed, num_key_value_heads=4, logits_scaling=4.0)


def tiny_falcon_h1(vocab: int, seed: int = 0):
    """Falcon-H1: logits multiplied by ``lm_head_multiplier``."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    return _tiny(FalconH1Config, FalconH1ForCausalLM, vocab, seed, num_key_value_heads=4, head_dim=8, mamba_d_ssm=32,
                 mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, lm_head_multiplier=0.25)


def tiny_minicpm3(vocab: int, seed: int = 0):
    """MiniCPM3: hidden states divided by ``logits_scaling`` (hidden_size / dim_model_base) before the head."""
    from transformers import MiniCPM3Config, MiniCPM3ForCausalLM

    return _tiny(MiniCPM3Config, MiniCPM3ForCausalLM, vocab, seed, num_key_value_heads=4, dim_model_base=8,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=16, kv_lora_rank=16)


#: A tiny model of every head the loss reads differently, by test id.
HEADS = {"llama-tied": tiny_llama, "phi-bias": tiny_phi, "granite-scaled": tiny_granite, "cohere-scaled": tiny_cohere,
         "gemma2-capped": tiny_gemma2, "recurrentgemma-capped": tiny_recurrent_gemma,
         "hyperclovax-scaled": tiny_hyperclovax, "falconh1-scaled": tiny_falcon_h1, "minicpm3-scaled": tiny_minicpm3}


def reward_rows(n: int = 8, k: int = 4, seed: int = 0) -> list[dict]:
    """Format-1 rows with responses of different lengths and distinct rewards."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        lengths = torch.randint(1, 7, (k,), generator=g).tolist()
        rows.append({"prompt": f"q{i}: say a", "responses": ["ab"[j % 2] * n_ for j, n_ in enumerate(lengths)],
                     "rewards": torch.randn(k, generator=g).tolist()})
    return rows


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
