"""walk: find every permutable channel group of a graph (DESIGN.md, the channel-flow model).

graph.py reads the graph (shapes, constants, topological order); channels.py is the vocabulary
(elements, labels); registry.py holds one declaration per op, its rule and the properties other
stages read; rules/ the rules by family; walker.py propagates labels and forms the groups.
"""

from .groups import Group, GroupSlot, PinnedReason, Producer, Reader, WalkResult, slot_part  # noqa: F401
from .walker import walk  # noqa: F401
