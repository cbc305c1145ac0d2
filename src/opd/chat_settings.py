"""What a tokenizer renders chats with, set on the tokenizer object itself so that every rendering (sampling,
scoring, evaluation, a conversation's turns) reads the same: the keyword arguments its chat template receives
(``chat_template_kwargs``) and a template used in place of its own (``chat_template=``, or a training template
``opd.templates`` chose). Setting one copies the tokenizer when it already holds another value: one tokenizer
object may be shared by the student and the teacher."""

from __future__ import annotations

import copy

from transformers import PreTrainedTokenizerBase

TEMPLATE_KWARGS = "opd_chat_template_kwargs"  # the attribute ``with_template_kwargs`` sets on a tokenizer


def with_template_kwargs(tokenizer: PreTrainedTokenizerBase, kwargs: dict) -> PreTrainedTokenizerBase:
    """``tokenizer``, rendering every chat with ``kwargs`` passed to its template (``chat_template_kwargs``,
    e.g. ``{"enable_thinking": false}``); a copy when it already renders with other ones (one tokenizer object
    shared by the student and a served teacher)."""
    if template_kwargs(tokenizer) == kwargs:
        return tokenizer
    if hasattr(tokenizer, TEMPLATE_KWARGS):
        tokenizer = copy.copy(tokenizer)
    setattr(tokenizer, TEMPLATE_KWARGS, dict(kwargs))
    return tokenizer


def template_kwargs(tokenizer: PreTrainedTokenizerBase) -> dict:
    return getattr(tokenizer, TEMPLATE_KWARGS, {})


CHAT_TEMPLATE = "opd_chat_template"  # the attribute ``with_chat_template`` sets on a tokenizer


def with_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> PreTrainedTokenizerBase:
    """``tokenizer``, rendering every chat with ``template`` in place of its own (``chat_template=PATH``, or a
    training template ``opd.templates`` chose); None: its own. The tokenizer's ``chat_template`` is left as it
    is, so a saved checkpoint keeps the model's own. A copy whenever it changes (one tokenizer object may be
    shared by the student and the teacher)."""
    if getattr(tokenizer, CHAT_TEMPLATE, None) == template:
        return tokenizer
    tokenizer = copy.copy(tokenizer)
    setattr(tokenizer, CHAT_TEMPLATE, template)
    return tokenizer


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template every rendering of ``tokenizer`` uses: ``with_chat_template``'s, else its own."""
    return getattr(tokenizer, CHAT_TEMPLATE, None) or tokenizer.chat_template
