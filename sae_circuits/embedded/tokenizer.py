"""Byte-level BPE tokenizer of the embedded model, trained with `tokenizers`, saved in HF format."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, required_words: Iterable[str] = ()
) -> Tokenizer:
    """Train a GPT-2/Pythia-style byte-level BPE (no prefix space, `<|endoftext|>` = id 0).

    Every word in `required_words` (e.g. " Mary") that BPE did not make a single token is added
    as an extra token, so the result always maps each of them to one id (see `check_single_tokens`).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    required = list(required_words)
    # an added token ("Mary") can split a learned one (" Mary"): add those too, until stable
    for _ in range(3):
        missing = [w for w in required if len(tok.encode(w).ids) != 1]
        if not missing:
            break
        tok.add_tokens(missing)
    check_single_tokens(tok, required)
    return tok


def check_single_tokens(tok: Tokenizer, words: Iterable[str]) -> None:
    """Raise ValueError naming the words that are not exactly one token."""
    bad = [w for w in words if len(tok.encode(w).ids) != 1]
    if bad:
        raise ValueError(f"not single tokens under this tokenizer: {bad}")


def to_transformers(tok: Tokenizer, model_max_length: int = 10**9) -> PreTrainedTokenizerFast:
    """Wrap as a `transformers` fast tokenizer with `<|endoftext|>` as bos, eos, unk and pad."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int = 10**9) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`."""
    to_transformers(tok, model_max_length).save_pretrained(str(out_dir))
