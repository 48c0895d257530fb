"""walk: find every permutable channel group of a graph (DESIGN.md, the channel-flow model).

graph.py reads the graph (shapes, constants, topological order); channels.py is the vocabulary
(elements, labels); registry.py holds one declaration per op, its rule and the properties other
stages read; rules/ the rules by family; walker.py propagates labels and forms the groups.
"""

from .walker import Group, GroupSlot, PinnedReason, WalkResult, slot_part, walk  # noqa: F401
