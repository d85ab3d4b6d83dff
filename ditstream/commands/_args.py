"""Argument parsing shared by the commands: engine validators turned into usage errors (exit 2)."""

from __future__ import annotations

import typer


def size_arg(text: str | None, *, param_hint: str = "--size", square: bool = False) -> tuple[int, int] | None:
    """``--size WxH`` → (W, H); ``None`` stays None (the model's or the server's default)."""
    if text is None:
        return None
    from ditstream.engine.errors import ValidationError
    from ditstream.engine.sizes import parse_size

    try:
        return parse_size(text, square=square)
    except ValidationError as exc:
        raise typer.BadParameter(exc.message, param_hint=param_hint) from exc
