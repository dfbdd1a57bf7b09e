"""Label Studio ML backend and CVAT adapters: tool formats in, Osprey jobs on RQ, tool formats out.

The web process never imports torch at import time; the model lives in worker processes.
"""
