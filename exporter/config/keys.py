"""CURVE keys as ZeroMQ writes them (Z85), and the one reader of CURVE key files: the
socket options, the probe modules and the relay read their key files here.

A key file holds either the bare key (40 Z85 characters; surrounding whitespace ignored)
or a ZPL certificate as `zmq.auth.create_certificates` and czmq write it, whose
`public-key = "..."` / `secret-key = "..."` line gives the key (the value quoted with "
or ', or bare). Neither a file's path nor its content is ever quoted in an error: either
may be the secret itself.
"""

from __future__ import annotations

import re
import typing

import zmq

from exporter.config.files import KEY_MAX_BYTES, FileProblem, read_limited

# A 32-byte CURVE key in Z85: 40 characters of its alphabet.
Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

KeyKind = typing.Literal["public", "secret"]


class KeyFileError(ValueError):
    """Why a key file gives no key; the message names neither the path nor the content."""


def zpl_key(line: str, kind: KeyKind) -> str | None:
    """The value of a ZPL `<kind>-key = value` line, unquoted; None for any other line."""
    head, sep, value = line.partition("=")
    if not sep or head.strip() != f"{kind}-key":
        return None
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def parse_key(text: str, kind: KeyKind) -> bytes | None:
    """The Z85 key of `kind` in a key file's text (a bare key or a ZPL certificate), or
    None. A secret key must also give a public key (not every Z85 string is a key)."""
    candidate = text.strip()
    for line in text.splitlines():
        value = zpl_key(line, kind)
        if value is not None:
            candidate = value
            break
    if not Z85_KEY.fullmatch(candidate):
        return None
    key = candidate.encode()
    if kind == "secret":
        try:
            zmq.curve_public(key)
        except (zmq.ZMQError, ValueError):
            return None
    return key


def looks_like_key(text: str) -> bool:
    """Whether `text` (a value given as a path) is a key itself, pasted in place of a path."""
    return any(parse_key(text, kind) is not None for kind in ("public", "secret"))


def read_key_file(path: str, kind: KeyKind) -> bytes:
    """The Z85 CURVE key of `kind` in the file `path`; KeyFileError otherwise."""
    try:
        text = read_limited(path, KEY_MAX_BYTES).decode("utf-8")
    except (FileProblem, UnicodeDecodeError) as err:
        reason = str(err) if isinstance(err, FileProblem) else "not UTF-8 text"
        hint = (
            "; it looks like a Z85 key, not a path: put the key in a file and name the file"
            if looks_like_key(path)
            else ""
        )
        raise KeyFileError(f"cannot read key file: {reason} (value not shown{hint})") from None
    key = parse_key(text, kind)
    if key is None:
        raise KeyFileError(
            f"key file holds no Z85 CURVE {kind} key (expected 40 Z85 characters "
            f'or a ZPL certificate with {kind}-key = "..."; content not shown)'
        )
    return key
