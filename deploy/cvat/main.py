"""nuclio entry point (`handler: main:handler` in function.yaml); the code is backend/cvat/nuclio.py."""

from backend.cvat.nuclio import handler, init_context

__all__ = ["handler", "init_context"]
