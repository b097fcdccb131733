"""The transformers backend's tests run offline: the model comes from a PyPI wheel, never the hub."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
