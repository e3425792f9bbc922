"""Where the ground truth lives: `../shared/` beside the project root, or $DSV4_SHARED.

A plain module (not conftest.py) so that test folders can import it by name without shadowing each other's
conftest modules.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DSV4_SHARED", ROOT.parent / "shared"))
