"""One validation layer for every value the pack did not produce itself in this process.

Values reach the pack from LoRA file headers, HTTP request bodies, ComfyUI combo/path inputs (ComfyUI 0.3.75 does
not check V3 combo values against their options) and job records on disk. All of them are checked here, by the same
rules, before anything acts on them:

- numbers: the right type (a bool is not a number), finite, inside a stated range;
- names: plain file/folder names, never absolute, never `.`/`..`, never hidden, never a Windows device name or a
  name ending in a dot or space (Windows silently strips those, so two different names would be one file);
- paths: confined under their root folder with symlinks resolved;
- JSON: bounded size and nesting depth checked by a linear scan before the parser recurses, no NaN/Infinity
  literals, the expected shape.

Nothing here runs a regular expression built from outside data, and no check does more than linear work in the size
of its input. Every error is a `ValidationError` whose message names the input (`what`), says what is wrong and what
to do; callers re-raise it as their own error type (LoraFileError, JobError, a node's ValueError) where needed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


class ValidationError(ValueError):
    """A value from outside (file header, request, node input, record on disk) that the pack refuses."""


# ---------------------------------------------------------------------------------------------------------------
# Numbers


def number(value, what: str, *, lo: float | None = None, hi: float | None = None, integer: bool = False):
    """`value` as a finite int (integer=True) or float inside [lo, hi]. Accepts ints, floats and (for integers) floats
    with an integral value; refuses bools, strings, NaN, ±inf and out-of-range values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number, got {type(value).__name__} {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{what} must be a finite number, got {value}")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValidationError(f"{what} must be a whole number, got {value}")
            value = int(value)
    else:
        value = float(value)
    if lo is not None and value < lo:
        raise ValidationError(f"{what} must be at least {lo:g}, got {_short(value)}")
    if hi is not None and value > hi:
        raise ValidationError(f"{what} must be at most {hi:g}, got {_short(value)}")
    return value


def number_text(text, what: str, **limits):
    """A number written as text (a safetensors header value): parsed with float(), then checked like `number`."""
    if not isinstance(text, str):
        raise ValidationError(f"{what} must be text holding a number, got {type(text).__name__}")
    try:
        value = float(text.strip()) if len(text) <= 64 else None
    except ValueError:
        value = None
    if value is None:
        raise ValidationError(f"{what} must be a number, got {_short(text)}")
    return number(value, what, **limits)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Names and paths

# A fixed pattern, matched against bounded input (≤ 100 characters): linear, never built from outside data.
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _.+\-]{0,99}")
# Windows maps these names (with any extension, any case) to devices: `CON.safetensors` is the console.
WINDOWS_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{p}{i}" for p in ("COM", "LPT") for i in (*range(10), "\u00b9", "\u00b2", "\u00b3")]
)


def name_part(part, what: str) -> str:
    """One path part of a name the pack writes: letters, digits, space, `_ . + -`, not hidden, at most 100
    characters, not a Windows device name, not ending in a dot or a space."""
    if not isinstance(part, str) or not _NAME_PART.fullmatch(part):
        raise ValidationError(f"{what}: part {_short(part)} may only use letters, digits, space and _ . + - (not "
                              "starting with '.' or a space, at most 100 characters)")
    if part.endswith((".", " ")):
        raise ValidationError(f"{what}: part {part!r} ends with a dot or a space, which Windows drops (two names "
                              "would be one file); remove it")
    if part.split(".")[0].upper().rstrip(" ") in WINDOWS_DEVICE_NAMES:
        raise ValidationError(f"{what}: part {part!r} is a Windows device name (CON, PRN, AUX, NUL, COM1-9, "
                              "LPT1-9); choose another name")
    return part


def relative_name(name, what: str) -> str:
    """A relative name made of `name_part`s separated by '/' (sub-folders)."""
    if not isinstance(name, str):
        raise ValidationError(f"{what} must be text, got {type(name).__name__}")
    if not name:
        raise ValidationError(f"{what} is empty")
    if "\x00" in name:
        raise ValidationError(f"{what} contains a NUL character")
    if name.startswith(("/", "\\", "~")) or (len(name) > 1 and name[1] == ":") or os.path.isabs(name):
        raise ValidationError(f"{what} {_short(name)} is an absolute path; give a name relative to its folder")
    if "\\" in name:
        raise ValidationError(f"{what} {_short(name)} contains a backslash; separate sub-folders with '/'")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValidationError(f"{what} {_short(name)} would leave its folder (empty, '.' or '..' path parts are "
                              "not allowed)")
    for part in parts:
        name_part(part, what)
    return name


def lexical_relative(name, what: str) -> str:
    """A relative path as ComfyUI lists model files (any characters a file system allows, '/' or the OS separator
    between folders), refused when it is absolute, holds '..' or NUL: the rule for names the user's own files
    carry, which the pack reads but never writes."""
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{what} must be a non-empty file name, got {_short(name)}")
    if "\x00" in name or len(name) > 4096:
        raise ValidationError(f"{what} {_short(name)} is not a valid file name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or os.path.isabs(name):
        raise ValidationError(f"{what} {_short(name)} is an absolute path; choose a file from the list")
    if any(part == ".." for part in name.replace("\\", "/").split("/")):
        raise ValidationError(f"{what} {_short(name)} contains '..'; choose a file from the list")
    return name


def confined(root: str | os.PathLike, name: str, what: str, *, lexical: bool = False) -> Path:
    """`root/name` with symlinks resolved, refused unless it stays inside `root` (itself resolved). `name` must pass
    `relative_name` (names the pack writes) or, with lexical=True, `lexical_relative` (the user's own files)."""
    (lexical_relative if lexical else relative_name)(name, what)
    base = Path(root).resolve()
    target = (base / name).resolve()
    if not target.is_relative_to(base):
        raise ValidationError(f"{what} {_short(name)} resolves to {target}, outside {base}")
    return target


def one_of(value, options: Iterable, what: str):
    """`value` if it is one of `options` (a combo input's list)."""
    options = list(options)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or value not in options:
        shown = ", ".join(map(repr, options[:12])) + (f", ... ({len(options)} in all)" if len(options) > 12 else "")
        raise ValidationError(f"{what} {_short(value)} is not one of the choices ({shown or 'none available'}); "
                              "pick one from the list")
    return value


# ---------------------------------------------------------------------------------------------------------------
# JSON

MAX_JSON_DEPTH = 64
# Structure characters and string delimiters: a fixed character class, one pass over the text.
_JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')


def json_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in a JSON text, by a linear scan (strings skipped)."""
    depth = deepest = 0
    in_string = False
    skip_at = -1  # the character right after a backslash inside a string is escaped, whatever it is
    for match in _JSON_STRUCTURE.finditer(text):
        char, at = match.group(), match.start()
        if at == skip_at:
            continue
        if in_string:
            if char == "\\":
                skip_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str | bytes, what: str, *, max_bytes: int = 100 * 1024 * 1024, max_depth: int = MAX_JSON_DEPTH):
    """Parses JSON from outside: bounded size and nesting depth (checked before parsing, so the recursive parser
    never exhausts the stack), NaN/Infinity literals refused."""
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise ValidationError(f"{what} is {len(text)} bytes of JSON, more than the {max_bytes} allowed")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValidationError(f"{what} is not valid JSON (not UTF-8 text: {error})") from None
    if len(text) > max_bytes:
        raise ValidationError(f"{what} is {len(text)} characters of JSON, more than the {max_bytes} allowed")
    depth = json_depth(text)
    if depth > max_depth:
        raise ValidationError(f"{what} nests JSON {depth} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise ValidationError(f"{what} is not valid JSON ({str(error)[:200]})") from None


def json_object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def string_map(value, what: str) -> dict[str, str]:
    """A mapping of text to text (safetensors `__metadata__`)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValidationError(f"{what} must map text to text")
    return dict(value)


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def non_finite_tensors(tensors: Mapping[str, torch.Tensor] | Iterable, limit: int = 5) -> list[str]:
    """The names (at most `limit`) of floating-point tensors holding NaN or ±inf, in a (possibly nested) state."""
    found: list[str] = []

    def visit(value, name: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and value.numel() and not bool(
                    torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{name}[{index}]")

    visit(tensors, "")
    return found
