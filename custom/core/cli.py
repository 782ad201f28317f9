"""Command-line arguments as ``fire`` (or a bundle override, or a MONAI Label ``--conf``) hands them over.

One parser for every script and config: flags arrive as bools or as strings ("--resume true", "--tta no"),
lists as lists, tuples, scalars or strings ("[32,32,32]", "unc,baseline", "[unc,baseline]"). Bad values
raise ``custom.core.errors.BraTSInputError`` (a ``ValueError``) that names the option, e.g.
``--plan: expected true or false, got 'maybe'``.
"""

from __future__ import annotations

import ast

import numpy as np

from custom.core.errors import BraTSInputError

_TRUE = ("true", "yes", "1", "on")

_FALSE = ("false", "no", "0", "off")

_NONE = ("none", "null", "")

_HEADER = "invalid command-line option"

#: what is left after a failed literal_eval must be bare words: these characters mean a malformed list
_STRUCTURE = set("[](){}")


def _error(name: str, problem: str) -> BraTSInputError:
    return BraTSInputError(f"--{name}: {problem}", header=_HEADER)


def as_bool(value, name: str = "flag") -> bool:
    """A flag: a bool (numpy too), 0/1 (numpy integers too) or true/false/yes/no/1/0/on/off (any case).

    Raises:
        BraTSInputError: anything else (``None``, "maybe", 2, ...), naming ``--<name>``.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _error(name, f"expected true or false, got {value!r}")


def _parse_text(text: str, raw, name: str):
    """A list-valued string: a Python literal when it is one, else comma-separated bare words."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    # bare words, e.g. "[unc,baseline]" or "unc, 'baseline'": one optional bracket pair around them
    pairs = {"[": "]", "(": ")"}
    opener, closer = text[:1], text[-1:]
    if opener in pairs and pairs[opener] == closer and len(text) >= 2:
        inner = text[1:-1]
    elif opener in pairs or closer in pairs.values():
        raise _error(name, f"cannot parse {raw!r} as a list like [1,2,3]")
    else:
        inner = text
    items = [part.strip().strip("'\"").strip() for part in inner.split(",")]
    if any(_STRUCTURE & set(item) for item in items):
        raise _error(name, f"cannot parse {raw!r} as a list like [1,2,3]")
    return [item for item in items if item]


def as_list(value, name: str = "value", length: int | None = None, cast=None):
    """A list argument: a list/tuple, a scalar, or a string "[a,b]" / "a,b" (None, "none", "null", "" -> None).

    Strings are read with ``ast.literal_eval`` when they are Python literals ("[32,32,32]", "0,1") and otherwise
    split on commas with surrounding brackets, blanks and quotes stripped ("[unc,baseline]" -> ["unc",
    "baseline"]). A scalar becomes ``[scalar]``, or ``length`` copies of it when ``length`` is given.
    ``cast`` (e.g. ``int``) is applied to each element.

    Raises:
        BraTSInputError: unparseable string, a value that is no list (a bool, a dict...), an element ``cast``
            rejects, or not ``length`` elements; the message names ``--<name>``.
    """
    raw = value
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _NONE:
            return None
        value = _parse_text(text, raw, name)
        if value is None:
            return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (str, int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        items = [value] * (1 if length is None else int(length))
    else:
        raise _error(name, f"expected a list like [1,2,3], got {raw!r}")
    if cast is not None:
        try:
            items = [cast(v) for v in items]
        except (TypeError, ValueError):
            kind = getattr(cast, "__name__", repr(cast))
            raise _error(name, f"expected {kind} values, got {raw!r}") from None
    if length is not None and len(items) != length:
        raise _error(name, f"expected {length} values, got {len(items)} ({raw!r})")
    return items
