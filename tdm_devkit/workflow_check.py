"""Validates UI-format workflow JSONs (what users drag into ComfyUI) against a live server's `/object_info`, and
converts them to the API format `POST /prompt` takes, optionally swapping loader nodes for test-only injectors.

The checks are the ones a user meets when loading a shared workflow: node types the server does not know
("missing nodes"), links whose types do not fit, and widget values a node would reject (out of range, not among a
combo's options, wrong kind). Widget values map onto a node's widget inputs in schema order, as the frontend
saves them; INT inputs with `control_after_generate` (seeds) carry one extra saved value ("fixed", "randomize", …).

Across ComfyUI versions (0.3.75 and upstream 0.33) the same file must check the same way:
- a `COMFY_DYNAMICCOMBO_V3` input (upstream's SaveVideo `format`, whose options carry nested inputs such as `codec`)
  saves its selected key like a combo, and its legacy flat companion (SaveVideo's hidden optional `codec`) keeps the
  old saved position, so a 0.3.75-layout SaveVideo [prefix, format, codec] is read the same on both;
- trailing *optional* widgets may be absent from a saved node (the frontend gives them their defaults): newer
  versions add optional widgets (CreateVideo's `bit_depth`) that a file written for the older one lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Frontend-only nodes: never sent to the server.
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # newer ComfyUI: a combo whose options add nested inputs
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODE_ACTIVE, MODE_MUTED, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("workflow problems:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass
class WidgetSpec:
    name: str
    type: str  # INT, FLOAT, STRING, BOOLEAN, COMBO
    options: dict = field(default_factory=dict)
    choices: list | None = None  # COMBO options
    optional: bool = False

    @property
    def saved_values(self) -> int:
        # Seeds get a "control after generate" value; image inputs get the upload button's value.
        extra = self.options.get("control_after_generate") or self.options.get("image_upload")
        return 2 if extra else 1


def _input_type(spec) -> tuple[str, dict, list | None]:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return "COMBO", options, kind
    if kind == "COMBO":
        return "COMBO", options, list(options.get("options", []))
    if kind == DYNAMIC_COMBO:
        return "COMBO", options, [option["key"] for option in options.get("options", [])]
    return kind, options, None


def widget_specs(node_info: dict) -> list[WidgetSpec]:
    """The node's widget inputs in the order the frontend saves their values."""
    specs = []
    order = node_info.get("input_order") or {s: list(node_info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, options, choices = _input_type(node_info["input"][section][name])
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                specs.append(WidgetSpec(name, kind, options, choices, optional=section == "optional"))
    return specs


def required_saved_values(specs: list[WidgetSpec]) -> int:
    """How many saved values a node needs at least: all but its trailing optional widgets (see the docstring)."""
    count = sum(s.saved_values for s in specs)
    for spec in reversed(specs):
        if not spec.optional:
            break
        count -= spec.saved_values
    return count


def input_types(node_info: dict) -> dict[str, str]:
    out = {}
    for section in ("required", "optional"):
        for name, spec in node_info["input"].get(section, {}).items():
            out[name] = _input_type(spec)[0]
    return out


def types_fit(source: str, target: str) -> bool:
    if "*" in (source, target):
        return True
    sources, targets = set(source.split(",")), set(target.split(","))
    return bool(sources & targets)


def check_widget_value(spec: WidgetSpec, value) -> str | None:
    opts = spec.options
    if spec.type == "COMBO":
        if spec.choices and value not in spec.choices:
            return f"{value!r} is not one of the options ({', '.join(map(str, spec.choices[:8]))}…)"
        return None
    if spec.type == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if spec.type == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if spec.type == "INT" and float(value) != int(value):
        return f"{value!r} is not an integer"
    if "min" in opts and value < opts["min"]:
        return f"{value} is below the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{value} is above the maximum {opts['max']}"
    return None


def _split_widget_values(node: dict, specs: list[WidgetSpec]) -> tuple[dict, list[str]]:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes save a name → value mapping
        return {s.name: values[s.name] for s in specs if s.name in values}, []
    expected = sum(s.saved_values for s in specs)
    minimum = required_saved_values(specs)
    problems = []
    if not minimum <= len(values) <= expected:
        counted = f"{minimum}–{expected}" if minimum != expected else f"{expected}"
        problems.append(f"has {len(values)} widget values, its schema has {counted} ({[s.name for s in specs]})")
        return {}, problems
    out, i = {}, 0
    for spec in specs:
        if i >= len(values):
            break  # absent trailing optional widgets take their defaults
        out[spec.name] = values[i]
        if spec.options.get("control_after_generate") and values[i + 1] not in SEED_CONTROL_VALUES:
            problems.append(f"{spec.name}: control value {values[i + 1]!r} is not one of {sorted(SEED_CONTROL_VALUES)}")
        i += spec.saved_values
    return out, problems


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Every problem a user would hit loading and queueing this workflow; empty when it is sound."""
    problems: list[str] = []
    if "id" in workflow and not isinstance(workflow["id"], str):
        # the frontend's zod schema rejects the file with an alert on load
        problems.append(f"workflow id must be a string (a uuid), not {workflow['id']!r}")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    for node in nodes.values():
        label = f"node {node['id']} ({node.get('type')})"
        if node.get("type") in VIRTUAL_NODE_TYPES:
            continue
        info = object_info.get(node.get("type"))
        if info is None:
            problems.append(f"{label}: missing node type — the server has no node '{node.get('type')}'")
            continue
        values, value_problems = _split_widget_values(node, widget_specs(info))
        problems += [f"{label}: {p}" for p in value_problems]
        for spec in widget_specs(info):
            if spec.name in values:
                error = check_widget_value(spec, values[spec.name])
                if error:
                    problems.append(f"{label}: widget '{spec.name}': {error}")
    for link in workflow.get("links", []):
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = link[:6]
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id}: points at a node that does not exist ({origin_id} → {target_id})")
            continue
        source_type = _output_type(origin, origin_slot, object_info, nodes, workflow)
        target_type = _target_input_type(target, target_slot, object_info)
        if source_type is None or target_type is None:
            continue  # reported above as a missing node type, or a virtual node whose type is its link's
        if not types_fit(source_type, target_type):
            problems.append(
                f"link {link_id}: {origin.get('type')} output {origin_slot} is {source_type}, but "
                f"{target.get('type')} input '{target['inputs'][target_slot]['name']}' takes {target_type}"
            )
        elif not types_fit(str(link_type), target_type):
            problems.append(f"link {link_id}: saved as {link_type}, but the input takes {target_type}")
    return problems


def _output_type(node, slot, object_info, nodes, workflow):
    if node["type"] == "Reroute":
        upstream = _incoming_link(workflow, node["id"], 0)
        return None if upstream is None else _output_type(nodes[upstream[1]], upstream[2], object_info, nodes, workflow)
    if node["type"] in VIRTUAL_NODE_TYPES:
        return None
    info = object_info.get(node["type"])
    if info is None:
        return None
    outputs = info["output"]
    if slot >= len(outputs):
        return f"<no output {slot}>"
    kind = outputs[slot]
    return "COMBO" if isinstance(kind, list) else kind


def _target_input_type(node, slot, object_info):
    if node["type"] in VIRTUAL_NODE_TYPES:
        return None
    info = object_info.get(node["type"])
    if info is None:
        return None
    try:
        name = node["inputs"][slot]["name"]
    except (IndexError, KeyError):
        return f"<no input {slot}>"
    return input_types(info).get(name, f"<unknown input {name}>")


def _incoming_link(workflow, node_id, slot):
    for link in workflow.get("links", []):
        if link[3] == node_id and link[4] == slot:
            return link
    return None


def assert_valid(workflow: dict, object_info: dict) -> None:
    problems = check_workflow(workflow, object_info)
    if problems:
        raise WorkflowError(problems)


# -- API conversion ----------------------------------------------------------------------------------------------

@dataclass
class Substitute:
    """Replaces one output of a loader node by a test-only node, e.g. CheckpointLoaderSimple's MODEL by
    TDMTest_TinyModel. `inputs` may be a function of the original node's API inputs (e.g. to keep a prompt's text)."""

    class_type: str
    inputs: dict | object  # dict, or callable(original_inputs) -> dict


def to_api(workflow: dict, object_info: dict, substitutions: dict | None = None) -> dict:
    """UI format → API format (`{"id": {"class_type", "inputs"}}`), after validating it.

    `substitutions` maps a node type to `{output_slot: Substitute}`; every consumer of a substituted output is
    rewired to the replacement, and the original node is dropped (its other outputs must be unused or substituted).
    """
    assert_valid(workflow, object_info)
    substitutions = substitutions or {}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def resolve(link_id):
        _, origin_id, origin_slot, *_ = links[link_id]
        origin = nodes[origin_id]
        if origin["type"] == "Reroute":
            return resolve(origin["inputs"][0]["link"])
        return str(origin_id), origin_slot

    api: dict = {}
    for node in nodes.values():
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", MODE_ACTIVE) == MODE_MUTED:
            continue
        if node.get("mode", MODE_ACTIVE) == MODE_BYPASS:
            raise WorkflowError([f"node {node['id']} ({node['type']}) is bypassed; convert it by hand"])
        info = object_info[node["type"]]
        inputs, _ = _split_widget_values(node, widget_specs(info))
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                inputs[socket["name"]] = list(resolve(socket["link"]))
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}

    substituted = {}
    for node_id, entry in list(api.items()):
        slots = substitutions.get(entry["class_type"])
        if not slots:
            continue
        for slot, substitute in slots.items():
            new_id = f"{node_id}_sub{slot}"
            new_inputs = substitute.inputs(entry["inputs"]) if callable(substitute.inputs) else dict(substitute.inputs)
            api[new_id] = {"class_type": substitute.class_type, "inputs": new_inputs,
                           "_meta": {"title": f"{substitute.class_type} (for {entry['class_type']})"}}
            for other in api.values():
                for name, value in other["inputs"].items():
                    if value == [node_id, slot]:
                        other["inputs"][name] = [new_id, 0]
        substituted[node_id] = api.pop(node_id)["class_type"]
    dangling = [f"{oid}.{name} uses {substituted[value[0]]} {value[0]} output {value[1]}"
                for oid, other in api.items() for name, value in other["inputs"].items()
                if isinstance(value, list) and len(value) == 2 and value[0] in substituted]
    if dangling:
        raise WorkflowError([f"substituted node output without a substitute: {d}" for d in dangling])
    return api
