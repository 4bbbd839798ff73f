"""Builds UI-format workflows (what users drag into ComfyUI) from a short declarative description and a server's
`/object_info`, so widget order, socket types and defaults always come from the real node schemas."""

from __future__ import annotations

from dataclasses import dataclass, field

from .workflow_check import WIDGET_TYPES, _input_type, widget_specs

NODE_WIDTH = 340
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
GAP = 40  # free space kept between stacked nodes
# The view a workflow opens with, in a 1920×1080 browser window clear of the frontend's toolbar and the queue notice
# under its Run button (top: 136 px) and its sidebar (left): the whole graph when it fits at a readable zoom, else
# the top-left part at MIN_READABLE_ZOOM, where the Read me and the loaders are (the user pans to the rest). Below
# about 0.57 the frontend's default level of detail (LiteGraph.Canvas.MinFontSizeForLOD 8 px, 14 px node text on a
# 1× screen) draws no text at all: workflows once opened at 0.46–0.57 as blank grey boxes. Core's templates open at
# 0.66–0.88. The real-browser check measures it with live node sizes at the user's default settings.
VIEW = {"width": 1920, "height": 1080, "left": 72, "top": 136, "right": 24, "bottom": 24}
MIN_READABLE_ZOOM = 0.75
# Nodes that show a report box on the canvas (web/tdm_nodes.js): room for it below their widgets.
REPORT_HEIGHT = 70
REPORTING_NODES = {"TDMLoraLoader", "TDMDistillLoraLoader", "TDMKSampler", "TDMScheduler"}


def bounding_box(ui_node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a saved node in canvas units, its title bar included."""
    x, y = ui_node["pos"]
    width, height = ui_node["size"]
    return (x, y - TITLE_HEIGHT, x + width, y + height)


def overlaps(ui_nodes: list[dict]) -> list[tuple]:
    """Pairs of saved nodes (by id) whose boxes intersect."""
    boxes = [(n["id"], bounding_box(n)) for n in ui_nodes]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
            if box_a[0] < box_b[2] and box_b[0] < box_a[2] and box_a[1] < box_b[3] and box_b[1] < box_a[3]]


def fit_view(ui_nodes: list[dict]) -> dict:
    """`extra.ds` for VIEW (see there): LiteGraph draws canvas point p at (p + offset) · scale. The whole graph when
    it fits at MIN_READABLE_ZOOM or more, else MIN_READABLE_ZOOM anchored at the graph's top-left corner."""
    boxes = [bounding_box(n) for n in ui_nodes]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    usable_w = VIEW["width"] - VIEW["left"] - VIEW["right"]
    usable_h = VIEW["height"] - VIEW["top"] - VIEW["bottom"]
    fits = min(1.0, usable_w / (right - left), usable_h / (bottom - top))
    scale = max(MIN_READABLE_ZOOM, int(fits * 100) / 100)  # a round zoom, rounded down so it still fits
    return {"scale": scale, "offset": [round(VIEW["left"] / scale - left, 1), round(VIEW["top"] / scale - top, 1)]}


def must_be_on_screen(ui_node: dict) -> bool:
    """The nodes the saved view always shows whole: the Read me and the loaders (what a user fills in first)."""
    return ui_node["type"] == "MarkdownNote" or "Loader" in ui_node["type"]


@dataclass
class Node:
    key: str  # a name for links in the description; ids are assigned in order
    type: str
    widgets: dict = field(default_factory=dict)  # widget name -> value (others take the schema default)
    links: dict = field(default_factory=dict)  # input name -> (source key, output slot)
    pos: tuple = (0, 0)
    title: str | None = None
    size: tuple | None = None
    properties: dict = field(default_factory=dict)


def _stack_columns(ui_nodes: list[dict]) -> None:
    """Nodes sharing an x stack downwards in their description order: each starts at its given y or just below the
    one above it (title bar and GAP included), whichever is lower, so a node grown by new widgets never covers the
    next one."""
    bottoms: dict[float, float] = {}
    for ui_node in sorted(ui_nodes, key=lambda n: (n["pos"][0], n["pos"][1], n["order"])):
        x, y = ui_node["pos"]
        if x in bottoms:
            y = max(y, bottoms[x] + GAP + TITLE_HEIGHT)
        ui_node["pos"] = [x, y]
        bottoms[x] = y + ui_node["size"][1]


def _default(spec) -> object:
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return spec.choices[0] if spec.choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec.type]


def build(nodes: list[Node], object_info: dict, pack_properties: dict, core_version: str,
          workflow_id: str, extra: dict | None = None) -> dict:
    """The UI-format JSON for `nodes`. `pack_properties` ({"cnr_id", "ver"}) is stamped on this pack's nodes (ids
    starting with TDM) so ComfyUI-Manager can resolve them when missing; core nodes get comfy-core."""
    ids = {node.key: i + 1 for i, node in enumerate(nodes)}
    links: list[list] = []
    ui_nodes = []
    outputs_by_key: dict[str, list] = {}
    for order, node in enumerate(nodes):
        if node.type in ("Note", "MarkdownNote"):
            ui_nodes.append({
                "id": ids[node.key], "type": node.type, "pos": list(node.pos), "size": list(node.size or (420, 260)),
                "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [node.widgets["text"]], "color": "#432", "bgcolor": "#653",
                **({"title": node.title} if node.title else {}),
            })
            continue
        info = object_info[node.type]
        unknown = set(node.widgets) - {s.name for s in widget_specs(info)}
        if unknown:
            raise KeyError(f"{node.type} has no widgets {sorted(unknown)}")
        # Trailing optional widgets the description leaves unset are not saved (the frontend gives them their
        # defaults): newer ComfyUI versions add such widgets (CreateVideo's bit_depth), and one file must serve all.
        specs = widget_specs(info)
        shown_widgets = sum(spec.saved_values for spec in specs)  # the frontend shows unsaved trailing ones too
        while specs and specs[-1].optional and specs[-1].name not in node.widgets:
            specs.pop()
        widgets_values = []
        for spec in specs:
            widgets_values.append(node.widgets.get(spec.name, _default(spec)))
            if spec.saved_values == 2:
                widgets_values.append("fixed")
        inputs = []
        for section in ("required", "optional"):
            for name in (info.get("input_order") or {}).get(section, list(info["input"].get(section, {}))):
                kind, options, _ = _input_type(info["input"][section][name])
                is_widget = kind in WIDGET_TYPES and not options.get("forceInput")
                if is_widget and name not in node.links:
                    continue
                entry = {"name": name, "type": kind, "link": None}
                if is_widget:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
        ui_node = {
            "id": ids[node.key], "type": node.type, "pos": list(node.pos),
            "size": list(node.size or (NODE_WIDTH, 60 + 26 * (shown_widgets + len(inputs))
                                       + (REPORT_HEIGHT if node.type in REPORTING_NODES else 0))),
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "links": [],
                         "slot_index": slot}
                        for slot, (kind, name) in enumerate(zip(info["output"], info["output_name"], strict=True))],
            "properties": {"Node name for S&R": node.type,
                           **(pack_properties if node.type.startswith("TDM") else {"cnr_id": "comfy-core",
                                                                                     "ver": core_version}),
                           **node.properties},
            "widgets_values": widgets_values,
        }
        if node.title:
            ui_node["title"] = node.title
        ui_nodes.append(ui_node)
        outputs_by_key[node.key] = ui_node["outputs"]

    _stack_columns(ui_nodes)
    clashes = overlaps(ui_nodes)
    if clashes:
        raise ValueError(f"workflow nodes overlap (ids): {clashes}; move them apart in the description")
    by_key = {node.key: ui for node, ui in zip(nodes, ui_nodes, strict=True)}
    for node in nodes:
        target = by_key[node.key]
        for input_name, (source_key, slot) in node.links.items():
            link_id = len(links) + 1
            target_slot = next(i for i, entry in enumerate(target["inputs"]) if entry["name"] == input_name)
            link_type = outputs_by_key[source_key][slot]["type"]
            links.append([link_id, ids[source_key], slot, ids[node.key], target_slot, link_type])
            target["inputs"][target_slot]["link"] = link_id
            outputs_by_key[source_key][slot]["links"].append(link_id)
    # Newer ComfyUI gave core savers (SaveImage, SaveVideo) pass-through outputs that 0.3.75's lack; their unlinked
    # trailing outputs are left out so one file serves both (the frontend restores slots from the schema).
    for node in nodes:
        if node.type in ("Note", "MarkdownNote") or node.type.startswith("TDM") \
                or not object_info[node.type].get("output_node"):
            continue
        outputs = by_key[node.key]["outputs"]
        while outputs and not outputs[-1]["links"]:
            outputs.pop()
    return {
        # The frontend's schema wants a string id (a uuid); a stable one keeps generated files reproducible.
        "id": workflow_id, "revision": 0, "last_node_id": len(nodes), "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": fit_view(ui_nodes), **(extra or {})}, "version": 0.4,
    }
