"""Regime tasks: synthetic tasks with an exact teacher, to map where on-policy distillation wins (issue #42).

A trained teacher is only right on its own path; these tasks know the correct next-token distribution for
any prefix, including the ones a student invents, so the teacher is right off its path too. Two knobs a
regime map needs are settings rather than accidents of training: the teacher's entropy (``PathsTask``'s
``tau``: one right answer at 0, uniform over many at inf) and whether an error can be recovered from
(``ChainTask``'s ``fatal`` and ``recoverable`` arms). Everything is character-level: each digit, letter
and symbol is one token of ``vocab.char_tokenizer()``, so a task's characters are the model's tokens.

- ``vocab``: the character tokenizer (ChatML template, built in-process).
- ``tasks``: ``ChainTask`` (pointer chasing, horizon K) and ``PathsTask`` (walks on a graph, teacher
  temperature tau); the exact definitions are in its module docstring.
- ``exact``: ``next_char_probs``, ``ExactTeacher`` (floored log-probs over the whole vocabulary) and
  ``reference_completion`` (the teacher's own path, for SFT data).
"""
