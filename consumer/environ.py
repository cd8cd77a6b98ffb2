"""Environs as JSON text: parsed at the top level only, written out by joining what came.

A result of 100 tests is 150 KB of JSON, and most of it is never looked at on its way to the
recipe runner: the write needs a handful of small fields (``job_id``, ``saved_environ_id``,
``group_id``...), merges the result into the saved environ field by field and stores the merged
environ as JSON. :class:`RawEnviron` keeps each top-level field as the JSON text it arrived as
(a :class:`msgspec.Raw`, a view of the message body, not a copy), decodes a field only when it is
read, and serialises by joining those texts. Between the delivery and the recipe an environ is
then parsed once, by the runner, and serialised not at all.

Fidelity to the standard library, which upstream reads these environs with:

- :func:`parse` accepts exactly what ``json.loads`` accepts of a UTF-8 body. The fast scan refuses
  JSON's extensions that ``json.loads`` allows (``NaN``, ``Infinity``, unpaired surrogate escapes)
  and does not check UTF-8 inside values; the body is checked for UTF-8 apart, and anything the
  scan refuses is parsed again by ``json.loads``, which accepts or refuses it with its own error.
- What :meth:`RawEnviron.to_json` writes is valid JSON that ``json.loads`` reads as the same
  objects it reads from the fields' original texts: the texts are copied byte for byte.
- :func:`loads` is msgspec's full parse, with the same fallback (msgspec also refuses numbers
  beyond a double's range, which ``json.loads`` reads as infinities).
- Values are serialised by ``json.dumps`` (:meth:`RawEnviron.__setitem__`, :func:`dumps`): what a
  recipe's handlers put into an environ is written exactly as upstream writes it (msgspec writes
  ``NaN`` as ``null``, and dates and UUIDs where ``json.dumps`` refuses them).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import msgspec

__all__ = ["RawEnviron", "copy", "dumps", "environ_json", "loads", "parse"]

_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

#: What msgspec raises for input ``json.loads`` may still accept (a ``str`` holding unpaired
#: surrogates cannot even be handed to msgspec).
_REFUSED = (msgspec.DecodeError, msgspec.ValidationError, UnicodeEncodeError)


#: Texts at least this long are parsed with the cyclic garbage collector paused.
_PAUSE_GC_BYTES = 64 * 1024


def loads(data: bytes | str | msgspec.Raw) -> Any:
    """``json.loads`` of UTF-8 JSON text, by msgspec where it can."""
    # A large environ is tens of thousands of new lists and dicts: while they are made, each
    # few hundred of them would start a collection that looks through all the others (and,
    # every so often, through every object of the process), for garbage that cannot be there.
    paused = len(data) >= _PAUSE_GC_BYTES and gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _decoder.decode(data)
    except _REFUSED:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(text)
    finally:
        if paused:
            gc.enable()


def dumps(value: Any) -> bytes:
    """``json.dumps`` as upstream calls it, as UTF-8."""
    return json.dumps(value).encode("utf-8")


class RawEnviron(MutableMapping[str, Any]):
    """An environ (a JSON object) whose fields stay JSON text until they are read.

    Reading a field decodes it afresh: change a value read from it and the environ does not
    change; assign it back to change it. Assigning serialises the value as ``json.dumps`` does.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, msgspec.Raw]) -> None:
        #: Each field's JSON text, by name.
        self.fields = fields

    def __getitem__(self, key: str) -> Any:
        return loads(self.fields[key])

    def __setitem__(self, key: str, value: Any) -> None:
        self.fields[key] = msgspec.Raw(dumps(value))

    def __delitem__(self, key: str) -> None:
        del self.fields[key]

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"RawEnviron({', '.join(map(repr, self.fields))})"

    def copy(self) -> RawEnviron:
        """A shallow copy: the fields' texts are shared, which nothing changes in place."""
        return RawEnviron(dict(self.fields))

    def to_json(self) -> bytes:
        """The environ as UTF-8 JSON: each field's text as it came."""
        return _encoder.encode(self.fields)

    def to_dict(self) -> dict[str, Any]:
        """Every field decoded: the dict ``json.loads`` makes of :meth:`to_json`."""
        return {key: loads(raw) for key, raw in self.fields.items()}


def parse(body: bytes | str) -> RawEnviron | Any:
    """``json.loads`` of a UTF-8 body, lazily where possible: a JSON object is returned as a
    :class:`RawEnviron` when the fast scan takes it, anything else as ``json.loads`` returns it.

    Raises ``UnicodeDecodeError`` for a body that is not UTF-8 and ``ValueError`` (``json.loads``'s
    ``JSONDecodeError``) for one that is not JSON; JSON nested deeper than the interpreter's
    recursion limit raises ``RecursionError``, as ``json.loads`` does.
    """
    if isinstance(body, str):
        text = body
        data: bytes | str = body
    else:
        data = bytes(body)
        # Checked apart: the scan below does not look inside values for UTF-8, and json.loads
        # refuses a body that is not UTF-8 before anything else.
        text = data.decode("utf-8")
    try:
        return RawEnviron(_fields_decoder.decode(data))
    except _REFUSED:
        return json.loads(text)


def environ_json(env: Mapping[str, Any]) -> bytes:
    """An environ as UTF-8 JSON: a :class:`RawEnviron`'s fields joined, a dict by ``json.dumps``."""
    if isinstance(env, RawEnviron):
        return env.to_json()
    return dumps(env)


def copy(env: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A shallow copy of an environ, of its own kind."""
    return env.copy() if isinstance(env, RawEnviron) else dict(env)
