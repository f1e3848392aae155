"""Tiny random-initialised models of each supported architecture, saved as Hugging Face folders,
and a plain torch hook at a site: the reference that parity tests compare nnsight traces with.

Used by the test suite and the benchmarks; also handy for testing code built on this library without
downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from sae_circuits.protocols import Model
from sae_circuits.sites import Site, torch_module

ARCHITECTURES = ("gpt_neox", "gpt2", "llama", "qwen2")

SAMPLE_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The keys to the cabinet are on the table. def add(a, b):\n    return a + b\n"
    "Sparse autoencoders find interpretable features in language models. "
)


def build_tokenizer(vocab_size: int = 300, text: str = SAMPLE_TEXT) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `text`; any string can be encoded."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def random_model_config(
    architecture: str, vocab_size: int, d_model: int = 32, n_layers: int = 2, n_heads: int = 4
):
    """A small config of the given architecture (`gpt_neox`, `gpt2`, `llama` or `qwen2`)."""
    special = {"bos_token_id": 0, "eos_token_id": 0}
    if architecture == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            intermediate_size=4 * d_model,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            use_parallel_residual=True,
            **special,
        )
    if architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=256,
            **special,
        )
    if architecture in ("llama", "qwen2"):
        config_class = LlamaConfig if architecture == "llama" else Qwen2Config
        return config_class(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            intermediate_size=3 * d_model,
            max_position_embeddings=256,
            **special,
        )
    raise ValueError(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")


def save_random_model(
    folder: str | Path,
    architecture: str = "gpt_neox",
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """Save a random-initialised causal LM and its tokenizer into `folder`; return the folder.

    `vocab_size` (default: the tokenizer's) may exceed the tokenizer, e.g. to match a real model's
    unembedding cost in benchmarks.
    """
    folder = Path(folder)
    tokenizer = build_tokenizer()
    config = random_model_config(
        architecture, vocab_size or len(tokenizer), d_model, n_layers, n_heads
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_pythia_70m_shaped(folder: str | Path, seed: int = 0) -> Path:
    """A random GPT-NeoX with Pythia-70M's shape (6 layers, d=512, 8 heads, vocab 50304)."""
    return save_random_model(folder, "gpt_neox", 512, 6, 8, seed=seed, vocab_size=50304)


@contextmanager
def site_hook(
    model: Model,
    site: str | Site,
    rewrite: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Plain torch, without nnsight: inside the block every forward of the underlying torch module
    passes the activation at `site` (a module's output) through `rewrite`; the yielded dict holds
    the last activation seen, before the rewrite, under `"x"`."""
    path, io = Site.parse(site).resolve(model)
    if io != "output":
        raise ValueError(f"site_hook reads module outputs; {site} is the input of {path}")
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: object, output: object) -> object:
        x = output[0] if isinstance(output, tuple) else output
        seen["x"] = x
        new = x if rewrite is None else rewrite(x)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = torch_module(model).get_submodule(path).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
