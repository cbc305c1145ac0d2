"""A character-level tokenizer for the regime tasks: one token per character, built in-process.

Ids 0..3 are the special tokens (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>`` EOS, ``<unk>``
for a character outside the alphabet), then one id per character of ``ALPHABET`` in its order. The chat
template is the ChatML one of the embedded models, so a prompt renders as
``<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
TURN_OPEN = "<|im_start|>"
EOS = "<|im_end|>"  # also the key of end-of-sequence in an exact teacher's next-character distribution
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, TURN_OPEN, EOS, UNK)  # ids 0.. in this order
SYMBOLS = ">:,;=!?-|. \n"
ALPHABET = string.digits + string.ascii_lowercase + SYMBOLS  # one token each, ids len(SPECIAL_TOKENS)..
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_vocab() -> dict[str, int]:
    """Token -> id: the special tokens, then each character of ``ALPHABET``."""
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer: every character of ``ALPHABET`` is exactly one token and decodes back to
    itself (no normalisation, no added spaces, no clean-up); any other character encodes to ``<unk>``."""
    tokenizer = Tokenizer(models.WordLevel(char_vocab(), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[TURN_OPEN], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=512,
    )


def save_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Write ``char_tokenizer()`` to ``directory`` in Hugging Face format (``AutoTokenizer`` loads it)."""
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
