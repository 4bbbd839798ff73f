"""The layout rules the example workflows are held to (tdm_devkit.workflow_build): links drawn under nodes, group frames
that cut through nodes or overlap, and the column spreading that keeps steep links between their columns. Each rule
is shown to flag the layouts the workflows once had."""

from __future__ import annotations

from tdm_devkit.workflow_build import _spread_columns, group_bounding, group_problems, links_under_nodes


def _node(node_id, x, y, w=340, h=120, inputs=1, outputs=1):
    return {"id": node_id, "type": f"N{node_id}", "pos": [x, y], "size": [w, h],
            "inputs": [{"name": f"in{i}", "type": "X", "link": None} for i in range(inputs)],
            "outputs": [{"name": f"out{i}", "type": "X", "links": []} for i in range(outputs)]}


def _workflow(nodes, links, groups=()):
    return {"nodes": nodes, "links": [[i + 1, *link, "X"] for i, link in enumerate(links)], "groups": list(groups)}


def test_a_link_across_a_node_between_its_ends_is_flagged():
    # source left, target two columns right, a third node in between at the link's height
    nodes = [_node(1, 0, 0), _node(2, 400, 0), _node(3, 800, 0)]
    assert links_under_nodes(_workflow(nodes, [(1, 0, 3, 0)])) == [
        "link 1 (N1 → N3) runs under node 2 N2"]
    nodes[1]["pos"] = [400, 300]  # moved out of the lane
    assert links_under_nodes(_workflow(nodes, [(1, 0, 3, 0)])) == []


def test_a_link_to_the_node_below_loops_under_both_ends():
    # what decode-below-the-sampler looked like: the spline leaves rightwards and comes back to enter from the left
    nodes = [_node(1, 0, 0), _node(2, 0, 200)]
    found = links_under_nodes(_workflow(nodes, [(1, 0, 2, 0)]))
    assert found == ["link 1 (N1 → N2) runs under node 1 N1", "link 1 (N1 → N2) runs under node 2 N2"]


def test_spreading_the_columns_gives_a_steep_link_room_between_them():
    # a long drop between neighbouring columns 20 units apart bulges under the nodes beside its ends
    nodes = [_node(1, 0, 0), _node(2, 0, 200), _node(3, 360, 600), _node(4, 360, 0)]
    links = [[1, 1, 0, 3, 0, "X"]]
    assert links_under_nodes({"nodes": nodes, "links": links})
    _spread_columns(nodes, links)
    assert links_under_nodes({"nodes": nodes, "links": links}) == []
    assert nodes[2]["pos"][0] == nodes[3]["pos"][0] >= 400  # the column moved as one, at least the minimum gap


def test_group_frames_must_hold_whole_nodes_and_not_overlap():
    a, b, c = _node(1, 0, 0), _node(2, 0, 200), _node(3, 400, 0)
    whole = {"title": "1 A", "bounding": group_bounding([a, b])}
    assert group_problems(_workflow([a, b, c], [], [whole])) == []
    half = {"title": "1 A", "bounding": group_bounding([a])}
    half["bounding"][3] += 150  # reaches into b's title bar
    assert group_problems(_workflow([a, b, c], [], [half])) == ["group '1 A' cuts through node 2 N2"]
    other = {"title": "2 C", "bounding": group_bounding([c])}
    other["bounding"][0] -= 80  # over the first frame
    assert "groups '1 A' and '2 C' overlap" in group_problems(_workflow([a, b, c], [], [whole, other]))
