"""opd's errors: a user-facing refusal (``OpdError``: the message says what is wrong and what to do; the CLI
prints it as one ``opd: error:`` line and exits 2) and the non-finite value that stops a diverging run."""

from __future__ import annotations


class OpdError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class NonFiniteError(OpdError):
    """A quantity of a step that is not a finite number (a NaN, an infinity): ``quantity`` names it (``"loss"``,
    ``"gradient norm"``, ``"sampling distribution"``, ``"weights"``), the message says where it came from."""

    def __init__(self, quantity: str, message: str):
        super().__init__(message)
        self.quantity = quantity
