"""Type compatibility of a link: which output types may feed which input types."""

from __future__ import annotations

from typing import Any


def validate_node_input(received_type: Any, input_type: Any, strict: bool = False) -> bool:
    """True when an output of `received_type` may be linked to an input of `input_type`.

    Types are names or comma-separated sets of names ("INT,FLOAT"); "*" accepts anything. Equality is
    tested as `not a != b` because packs declare wildcard types as str subclasses whose `__ne__`
    always answers False. `strict` requires every received type to be accepted, otherwise one shared
    type is enough.
    """
    if not (received_type != input_type):
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received = {t.strip() for t in received_type.split(",")}
    accepted = {t.strip() for t in input_type.split(",")}
    if "*" in received or "*" in accepted:
        return True
    if strict:
        return received <= accepted
    return bool(received & accepted)
