"""The repository's root on sys.path, so that bench scripts run as files share tests.support
with the tests: one set of Prometheus fixtures and one polling loop for both."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
