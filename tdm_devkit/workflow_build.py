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


# LiteGraph's slot geometry (both frontends): slot rows are NODE_SLOT_HEIGHT apart, a slot's centre 0.7 of a row
# below the row's top and half a row in from the node's edge; widgets are WIDGET_ROW apart below the slot rows.
SLOT_HEIGHT = 20
WIDGET_ROW = 24
LINK_CLEARANCE = 4  # a link passing this close to a node's box counts as under it
GROUP_PADDING = 12  # free space between a group's frame and the nodes in it
GROUP_TITLE_HEIGHT = 40  # the group's title bar (font 24) above its nodes


def slot_position(ui_node: dict, is_input: bool, slot: int) -> tuple[float, float]:
    """Where a link meets a saved node (canvas units), as LiteGraph places it: socket inputs and outputs in rows
    under the title; an input that feeds a widget sits on that widget's row."""
    x, y = ui_node["pos"]
    width = ui_node["size"][0]
    inputs = ui_node.get("inputs", [])
    socket_inputs = [entry for entry in inputs if "widget" not in entry]
    if is_input and "widget" in inputs[slot]:
        rows = max(len(socket_inputs), len(ui_node.get("outputs", [])))
        widget_index = sum(1 for entry in inputs[:slot] if "widget" in entry)
        return (x + SLOT_HEIGHT / 2, y + rows * SLOT_HEIGHT + 6 + (widget_index + 0.5) * WIDGET_ROW)
    row = socket_inputs.index(inputs[slot]) if is_input else slot
    return (x + SLOT_HEIGHT / 2 if is_input else x + width - SLOT_HEIGHT / 2, y + (row + 0.7) * SLOT_HEIGHT)


def link_curve(start: tuple[float, float], end: tuple[float, float], points: int = 48) -> list[tuple[float, float]]:
    """Points along the spline LiteGraph draws from an output to an input: a cubic Bézier whose control points
    leave the output rightwards and enter the input from the left, a quarter of the distance out."""
    reach = 0.25 * ((end[0] - start[0]) ** 2 + (end[1] - start[1]) ** 2) ** 0.5
    c1, c2 = (start[0] + reach, start[1]), (end[0] - reach, end[1])
    curve = []
    for i in range(points + 1):
        t = i / points
        u = 1 - t
        curve.append((u ** 3 * start[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t ** 3 * end[0],
                      u ** 3 * start[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t ** 3 * end[1]))
    return curve


def links_under_nodes(workflow: dict) -> list[str]:
    """Links of a saved workflow drawn across a node's box (its own ends excepted near their slots): a link there is
    hidden by the node and reads as wired to it."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    found = []
    for link_id, source, source_slot, target, target_slot, _kind in workflow["links"]:
        start = slot_position(nodes[source], False, source_slot)
        end = slot_position(nodes[target], True, target_slot)
        curve = link_curve(start, end)
        for node in workflow["nodes"]:
            left, top, right, bottom = bounding_box(node)
            # a link leaves its source at the right edge and enters its target at the left: only the slot's strip
            # of its own nodes is its to cross (a link that loops back behind either end is flagged)
            if node["id"] == source:
                right -= SLOT_HEIGHT
            if node["id"] == target:
                left += SLOT_HEIGHT
            for px, py in curve:
                if left - LINK_CLEARANCE < px < right + LINK_CLEARANCE and \
                        top - LINK_CLEARANCE < py < bottom + LINK_CLEARANCE:
                    found.append(f"link {link_id} ({nodes[source]['type']} → {nodes[target]['type']}) runs under "
                                 f"node {node['id']} {node['type']}")
                    break
    return found


def group_bounding(members: list[dict]) -> list[float]:
    """A group frame around `members` (LiteGraph's [x, y, width, height], its title bar included)."""
    boxes = [bounding_box(n) for n in members]
    left = min(b[0] for b in boxes) - GROUP_PADDING
    top = min(b[1] for b in boxes) - GROUP_PADDING - GROUP_TITLE_HEIGHT
    right = max(b[2] for b in boxes) + GROUP_PADDING
    bottom = max(b[3] for b in boxes) + GROUP_PADDING
    return [left, top, right - left, bottom - top]


def group_members(workflow: dict) -> dict[str, list[int]]:
    """Group title → ids of the nodes whose boxes lie wholly inside its frame (what LiteGraph moves with it)."""
    members = {}
    for group in workflow.get("groups", []):
        gx, gy, gw, gh = group["bounding"]
        members[group["title"]] = [n["id"] for n in workflow["nodes"]
                                   if gx <= bounding_box(n)[0] and bounding_box(n)[2] <= gx + gw
                                   and gy <= bounding_box(n)[1] and bounding_box(n)[3] <= gy + gh]
    return members


def group_problems(workflow: dict) -> list[str]:
    """Group frames that overlap each other, or cut through a node (part in, part out: LiteGraph moves only nodes
    wholly inside a frame with it, so a half-covered node is left behind and looks like it belongs)."""
    problems = []
    frames = [(g["title"], g["bounding"]) for g in workflow.get("groups", [])]
    inside = group_members(workflow)
    for i, (title_a, (ax, ay, aw, ah)) in enumerate(frames):
        for title_b, (bx, by, bw, bh) in frames[i + 1:]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                problems.append(f"groups {title_a!r} and {title_b!r} overlap")
        for node in workflow["nodes"]:
            left, top, right, bottom = bounding_box(node)
            touches = left < ax + aw and ax < right and top < ay + ah and ay < bottom
            if touches and node["id"] not in inside[title_a]:
                problems.append(f"group {title_a!r} cuts through node {node['id']} {node['type']}")
    return problems


def fit_view(ui_nodes: list[dict], groups: list[dict] = ()) -> dict:
    """`extra.ds` for VIEW (see there): LiteGraph draws canvas point p at (p + offset) · scale. The whole graph (group
    frames included) when it fits at MIN_READABLE_ZOOM or more, else MIN_READABLE_ZOOM anchored at the graph's
    top-left corner."""
    boxes = [bounding_box(n) for n in ui_nodes] + [
        (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2], g["bounding"][1] + g["bounding"][3])
        for g in groups]
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
class Group:
    """A titled frame around some nodes of the description, as core's templates number their steps."""
    title: str
    keys: list[str]
    color: str = "#3f789e"  # LiteGraph's blue group colour, which core's templates use


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


MIN_COLUMN_GAP = 60
GAP_STEP = 20


def _spread_columns(ui_nodes: list[dict], links: list[list]) -> None:
    """Widens the gap after each column (nodes sharing an x), left to right, until no link between it and the next
    column runs under a node: LiteGraph's spline leaves and enters horizontally, a quarter of its length out, so a
    link that climbs or falls steeply between close columns bulges under the nodes beside its ends. Links that skip
    a column are the description's to route (a free lane at their height)."""
    by_id = {n["id"]: n for n in ui_nodes}
    for index in range(len({n["pos"][0] for n in ui_nodes}) - 1):
        left_x, next_x = sorted({n["pos"][0] for n in ui_nodes})[index:index + 2]
        right_edge = max(n["pos"][0] + n["size"][0] for n in ui_nodes if n["pos"][0] == left_x)
        shift = max(0, right_edge + MIN_COLUMN_GAP - next_x)
        between = [link for link in links
                   if by_id[link[1]]["pos"][0] == left_x and by_id[link[3]]["pos"][0] == next_x]
        while True:
            moved = [dict(n, pos=[n["pos"][0] + shift, n["pos"][1]]) if n["pos"][0] >= next_x else n
                     for n in ui_nodes]
            if not links_under_nodes({"nodes": moved, "links": between}) or shift > 4000:
                break
            shift += GAP_STEP
        for n in ui_nodes:
            if n["pos"][0] >= next_x:
                n["pos"] = [n["pos"][0] + shift, n["pos"][1]]


def _default(spec) -> object:
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return spec.choices[0] if spec.choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec.type]


def build(nodes: list[Node], object_info: dict, pack_properties: dict, core_version: str,
          workflow_id: str, extra: dict | None = None, groups: list[Group] = ()) -> dict:
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
        # The rows the frontend shows: every widget (unsaved trailing ones too), except that the pack's nodes open
        # with their advanced inputs folded under one toggle row (web/tdm_advanced.js), and are saved folded.
        folds = node.type.startswith("TDM") and any(spec.options.get("advanced") for spec in specs)
        shown_widgets = sum(spec.saved_values for spec in specs
                            if not (folds and spec.options.get("advanced"))) + (1 if folds else 0)
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
        if folds:
            ui_node["showAdvanced"] = False  # LiteGraph's own field: the extension keeps the saved, folded size
        ui_nodes.append(ui_node)
        outputs_by_key[node.key] = ui_node["outputs"]

    _stack_columns(ui_nodes)
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
    _spread_columns(ui_nodes, links)
    clashes = overlaps(ui_nodes)
    if clashes:
        raise ValueError(f"workflow nodes overlap (ids): {clashes}; move them apart in the description")
    # Newer ComfyUI gave core savers (SaveImage, SaveVideo) pass-through outputs that 0.3.75's lack; their unlinked
    # trailing outputs are left out so one file serves both (the frontend restores slots from the schema).
    for node in nodes:
        if node.type in ("Note", "MarkdownNote") or node.type.startswith("TDM") \
                or not object_info[node.type].get("output_node"):
            continue
        outputs = by_key[node.key]["outputs"]
        while outputs and not outputs[-1]["links"]:
            outputs.pop()
    ui_groups = [{"id": number, "title": group.title, "bounding": group_bounding([by_key[k] for k in group.keys]),
                  "color": group.color, "font_size": 24, "flags": {}}
                 for number, group in enumerate(groups, start=1)]
    workflow = {
        # The frontend's schema wants a string id (a uuid); a stable one keeps generated files reproducible.
        "id": workflow_id, "revision": 0, "last_node_id": len(nodes), "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": ui_groups, "config": {},
        "extra": {"ds": fit_view(ui_nodes, ui_groups), **(extra or {})}, "version": 0.4,
    }
    problems = group_problems(workflow) + links_under_nodes(workflow)
    for group in groups:
        meant = sorted(ids[k] for k in group.keys)
        if sorted(group_members(workflow)[group.title]) != meant:
            problems.append(f"group {group.title!r} holds nodes {sorted(group_members(workflow)[group.title])}, "
                            f"meant {meant}")
    if problems:
        raise ValueError("workflow layout: " + "; ".join(problems) + " (move nodes in the description)")
    return workflow
