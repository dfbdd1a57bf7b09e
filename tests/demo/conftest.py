"""The demo tests load the committed demo model (models/demo/): a fresh clone has it, so they never skip."""
