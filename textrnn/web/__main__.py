"""``python -m textrnn.web``: fill the onnxruntime-web cache that ``textrnn export --format web`` copies from."""

import sys

from ..errors import TextRNNError
from . import ORT_WEB_VERSION, find_runtime

try:
    print(f"onnxruntime-web {ORT_WEB_VERSION}: {find_runtime()}")
except TextRNNError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
