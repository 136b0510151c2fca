"""What several verbs do first: set the CPU threads and load a model that must come with its tokenizer."""

from __future__ import annotations

from ..checkpoint import set_threads
from ..errors import OrionError


def load_with_tokenizer(model: str, purpose: str, device: str | None, threads: int | None):
    """(model, tokenizer) on `device`, computing with `threads` CPU threads; a model without a tokenizer is a
    one-line error saying what needs it."""
    from ..loading import load_model

    set_threads(threads)
    lm, tokenizer, _ = load_model(model, device=device)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; {purpose} needs one")
    return lm, tokenizer
