"""Builds a real byte-level BPE tokenizer (DeepSeek's special tokens and chat template), offline.

The tokenizer is trained with the `tokenizers` BPE trainer on ``dsray/assets/corpus.txt``, a
small English corpus shipped with the package, so a model directory can be made with no
network. Training is deterministic (the trainer breaks count ties by pair order, not by hash
order), and the test suite builds twice in separate processes to keep it that way.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# DeepSeek's spelling: fullwidth bars and U+2581 "▁" in place of spaces.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Trainer special tokens take the first ids in list order, which pins bos=0 and eos=1 as in DeepSeek.
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]
BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID = range(len(SPECIAL_TOKENS))

# DeepSeek-V3's chat format without tool calls: bos, system prompts, then user / assistant
# turns, each assistant turn closed by eos. Every tag trims whitespace on both sides so the
# output is the same under transformers' Jinja settings and plain jinja2 defaults.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages if message['role'] == 'system' -%}\n"
    "{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}\n"
    "{{- message['content'] -}}\n"
    "{%- endfor -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- '<｜User｜>' + message['content'] -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)


def corpus_text() -> str:
    """The embedded training corpus."""
    return (resources.files("dsray") / "assets" / "corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` ids on the embedded corpus.

    The result can be smaller than ``vocab_size``: training stops when no pair occurs twice,
    like real DeepSeek-V3 whose tokenizer has fewer ids than its 129,280 embedding rows.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small for 256 byte tokens plus the specials")
    tokenizer = Tokenizer(models.BPE())
    # Digits in groups of at most three, as DeepSeek does, then GPT-2's byte-level word split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        # All 256 bytes, so any text encodes even if the corpus never shows a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus_text()], trainer=trainer)
    # Encoding adds bos in front, the way DeepSeek's tokenizer.json does.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, BOS_ID)],
            ),
        ]
    )
    if [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("the tokenizers trainer no longer puts special tokens first; pin their ids")
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict:
    """The ``tokenizer_config.json`` dict: special tokens, bos policy and chat template."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        # DeepSeek-V3 pads with eos; it has no separate pad token either.
        "pad_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out_dir: str | Path, vocab_size: int, model_max_length: int) -> int:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; returns the vocab size."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    config = tokenizer_config(model_max_length)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return tokenizer.get_vocab_size()
