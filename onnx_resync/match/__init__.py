"""match: recover the permutation of every group of a suspect against its reference (pure numpy/scipy).

matcher.py: features, the assignment sweep and its statistics; wide.py: slots too wide to copy;
rescale.py: exact neutral rescales; sampling.py: spread samples of an axis.
"""

from .matcher import AGREE, INFORMATIVE, GroupMatch, MatchResult, assign, match  # noqa: F401
