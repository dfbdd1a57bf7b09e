"""Tests that load the shipped demo model run only where it is shipped (models/demo/).

It is not committed yet: the recipe in training/demo_model.py has not reached its targets on this CPU
(issue 9 stays open); `osprey demo-model` builds it. Until then these tests skip, saying so.
"""

from __future__ import annotations

import pytest

from training import demo_model

needs_demo_model = pytest.mark.skipif(
    not (demo_model.SHIPPED_DIR / "osprey_config.json").is_file(),
    reason="the demo model is not shipped in models/demo/ yet (issue 9 open: build it with `osprey demo-model`)",
)
