"""ragqa: grounded, cited question answering over local documents on a CPU."""

import os

# Nothing may reach a model hub at run time: every weight comes from ragqa's own model cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

__version__ = "0.1.0"
