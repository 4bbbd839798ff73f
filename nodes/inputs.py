"""Every widget value a prompt gives a TDM node is checked by the pack itself, against the node's own schema.

ComfyUI 0.3.75 does not check V3 combo values against their options, and skips its min/max checks for every input of
a node that defines `validate_inputs(**kwargs)`; a client can queue any JSON value for any widget. So each node checks
its inputs twice, by the same rules (tdm_core.validation): in `validate_inputs`, so a bad prompt is refused before it
runs, and at the top of `execute`, where values that arrive through links are known too. Combo options are read
from a fresh schema, so file lists are current.

File and folder combos (LoRA files, model folders, prompt files) are names of the user's own files: they must be one
of the listed choices and must not be absolute or hold '..'. The lists are ComfyUI's own (they follow links the
user placed in models/), and nothing a client can upload (input/, output/) is ever in a models/ listing. A node
names them in `USER_FILES` (input → the folder, as users know it); a missing file is reported as missing, with where
to get it when a preset names the file (`tdm_core.presets.where_to_get`), never with the folder's listing.

**One mistake, one error.** ComfyUI attaches whatever `validate_inputs` returns to *every* input the function
declares (a `**kwargs` function: every input of the node), so a missing LoRA came back as four copies of one error.
A node's `validate_inputs` therefore declares exactly one input, its user file (`validate_one`); ComfyUI's own
validation checks the rest (types, min/max; upstream also combo values), and `check_inputs` checks everything again
at the top of `execute` (0.3.75 checks no V3 combo, and NaN passes every min/max).
"""

from __future__ import annotations

from tdm_core import presets, validation

MAX_TEXT = 1_000_000  # characters of a text widget (prompts): far above any real prompt list


def check_inputs(node, values: dict, *, at_validation: bool = False) -> None:
    """Raises ValueError naming the node and input for the first value that is not what the schema allows.

    at_validation: ComfyUI passes None for inputs that come from a link before the graph runs; those are checked
    at execution instead."""
    schema = node.define_schema()
    title = schema.display_name or schema.node_id
    for spec in schema.inputs:
        if spec.id not in values:
            continue
        value = values[spec.id]
        if value is None and (at_validation or spec.optional):
            continue
        kind = str(spec.get_io_type())
        what = f"{title}: input '{spec.id}'"
        try:
            if kind == "COMBO" and spec.id in getattr(node, "USER_FILES", {}):
                _user_file(node, spec.id, value, spec.options or [], title)
            elif kind == "COMBO":
                validation.one_of(value, spec.options or [], what)
                if isinstance(value, str):
                    validation.lexical_relative(value, what)
            elif kind == "INT":
                validation.number(value, what, lo=spec.min, hi=spec.max, integer=True)
            elif kind == "FLOAT":
                validation.number(value, what, lo=spec.min, hi=spec.max)
            elif kind == "BOOLEAN":
                if not isinstance(value, bool):
                    raise validation.ValidationError(f"{what} must be true or false, got {type(value).__name__}")
            elif kind == "STRING":
                if not isinstance(value, str) or len(value) > MAX_TEXT:
                    raise validation.ValidationError(f"{what} must be text of at most {MAX_TEXT} characters")
        except validation.ValidationError as error:
            raise ValueError(str(error)) from None


def _user_file(node, input_id: str, value, options: list, title: str) -> None:
    folder = node.USER_FILES[input_id]
    what = f"{title}: {input_id}"
    if not isinstance(value, str) or not value:
        raise validation.ValidationError(f"{what} must be the name of a file in {folder}")
    validation.lexical_relative(value, f"{what}:")
    if value not in options:
        hint = presets.where_to_get(value)
        raise validation.ValidationError(
            f"{what}: {value[:200]!r} is not in {folder}. "
            + (hint or "Put it there, or pick a file that is, from the list")
            + ". After adding a file, refresh ComfyUI (R) so that the list shows it.")


def validate_one(node, input_id: str, value):
    """`validate_inputs` for the one input a node declares, usually its user file (see the module docstring): True,
    or the one error ComfyUI shows on that input."""
    try:
        check_inputs(node, {input_id: value}, at_validation=True)
    except ValueError as error:
        return str(error)
    return True
