"""``textrnn inspect``'s cost: seconds and peak memory (RSS) for a text, per model size.

Each model runs in a fresh process (so that its peak memory is its own): the one stateful forward
pass, the gallery's correlations and the page, for the first CHARS characters of tiny Shakespeare.
The weights are freshly initialised: the cost does not depend on their values.

    python bench/inspect_cost.py                       # 100,000 characters; the default 2x256 and a 2x512 LSTM
    python bench/inspect_cost.py --chars 20000 --models 1x128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def measure(data: Path, chars: int, layers: int, hidden: int) -> dict:
    """One model's costs, in this process."""
    import torch

    from textrnn.config import ModelConfig
    from textrnn.inspect import inspect_text, report_html
    from textrnn.model import RNNLanguageModel
    from textrnn.tokenizers import CharTokenizer

    text = data.read_text(encoding="utf-8")[:chars]
    tokenizer = CharTokenizer(text)
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(num_layers=layers, hidden_size=hidden, embedding_dim=128,
                                         vocab_size=tokenizer.vocab_size)).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = inspect_text(model, tokenizer, text)
    forward = time.perf_counter() - started
    page = report_html(result, "bench")
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"model": f"lstm {layers}x{hidden}", "chars": len(text), "units": len(result.units),
            "inspect_s": round(forward, 2), "total_s": round(total, 2), "chars_per_s": round(len(text) / total),
            "peak_rss_mib": round(peak / 1024), "rss_before_mib": round(before / 1024),
            "page_mib": round(len(page.encode()) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--models", nargs="+", default=["2x256", "2x512"], help="LAYERSxHIDDEN, LSTM")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        layers, hidden = map(int, args.one.split("x"))
        print(json.dumps(measure(args.data, args.chars, layers, hidden)))
        return
    print(machine())
    for model in args.models:
        out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--chars", str(args.chars),
                              "--one", model], capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
