"""Left/right landmark pairs from naming conventions (for the left/right swap check and flips).

A pair is two names that are identical except for one side token: a whole word `left`/`right`,
`lh`/`rh` or `L`/`R` anywhere (`left X`, `X_left`, `lh.X`, `X_L`, `L_X`, `L0`), or a prefix glued to
the rest (`La`, `LeftEye`) or a `Left`/`Right` suffix (`EyeLeft`). Side tokens are case-insensitive;
the rest must match exactly. Each name is paired at most once.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

_SIDES = {"left": "L", "right": "R", "lh": "L", "rh": "R", "l": "L", "r": "R"}
# Most specific first: a name's earlier keys win when it could pair in several ways.
_PATTERNS = [
    re.compile(r"(?<![a-z0-9])(left|right|lh|rh|l|r)(?![a-z])", re.IGNORECASE),  # delimited token
    re.compile(r"^(left|right)(?=.)", re.IGNORECASE),                            # LeftEye
    re.compile(r"(?<=.)(left|right)$", re.IGNORECASE),                           # EyeLeft
    re.compile(r"^(l|r)(?=.)", re.IGNORECASE),                                   # La, L0
]


def _side_keys(name: str) -> List[Tuple[str, str]]:
    """[(side 'L'|'R', name with the side token replaced by a placeholder), ...] in priority order."""
    keys = []
    for kind, pattern in enumerate(_PATTERNS):
        for m in pattern.finditer(name):
            key = f"{kind}:{name[:m.start()]}\0{name[m.end():]}"
            if key not in (k for _, k in keys):
                keys.append((_SIDES[m.group(1).lower()], key))
    return keys


def find_lr_pairs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """(left, right) name pairs, in the order the left names appear."""
    names = [str(n) for n in names]
    right_by_key: Dict[str, List[str]] = {}
    for n in names:
        for side, key in _side_keys(n):
            if side == "R":
                right_by_key.setdefault(key, []).append(n)
    used, pairs = set(), []
    for n in names:
        if n in used:
            continue
        for side, key in _side_keys(n):
            if side != "L":
                continue
            partner = next((r for r in right_by_key.get(key, []) if r not in used and r != n), None)
            if partner is not None:
                pairs.append((n, partner))
                used.update((n, partner))
                break
    return pairs
