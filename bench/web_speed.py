"""Sampling speed of the web export: chars/s at batch 1 in headless Chromium (textrnn.js over
onnxruntime-web's wasm build, one thread) and in Node.js (onnxruntime-node, one thread), beside the
Python engines on the same weights (``Sampler``: torch fp32, onnxruntime fp32, onnxruntime int8).

Models: the default (LSTM 2x256) and a 2x512 LSTM, random weights (speed does not depend on
training), a 65-symbol char vocabulary; each exported with ``textrnn export --format web`` in fp32
and int8. A cell is the best of ``--repeats`` timings of ``--length`` characters at temperature 1
(seeded), after one warm-up; the machine is shared, so the best is the least disturbed. All rows
run in one process, back to back.

    python bench/web_speed.py                   # the table in BENCHMARKS.md
    python bench/web_speed.py --length 4000 --repeats 5

Needs chromium and chromedriver (Debian), selenium, node, and onnxruntime-node in .cache/node
(``make test`` installs it); a row whose tool is missing says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from textrnn.checkpoint import write_run  # noqa: E402
from textrnn.config import ModelConfig  # noqa: E402
from textrnn.export import export_run  # noqa: E402
from textrnn.model import RNNLanguageModel  # noqa: E402
from textrnn.sampling import Sampler  # noqa: E402
from textrnn.tokenizers import CharTokenizer  # noqa: E402
from textrnn.web import static_server  # noqa: E402

CHARS = string.ascii_letters + string.digits[:1] + " \n.,;:!?'-"  # 64 characters + the unknown id: 65
MODELS = {"default (LSTM 2x256)": 256, "LSTM 2x512": 512}
ORT_NODE = REPO / ".cache" / "node"
PROMPT = "The "

TIMING = """
const [length, repeats, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
import("./textrnn.js").then(async ({ TextRNN }) => {
  const model = await TextRNN.load("./");
  const options = { prompt: "The ", length, temperature: 1, seed: 1 };
  await model.generate({ ...options, length: 50 });
  let best = Infinity;
  for (let i = 0; i < repeats; i++) {
    const start = performance.now();
    await model.generate(options);
    best = Math.min(best, (performance.now() - start) / 1000);
  }
  done({ seconds: best });
}).catch((error) => done({ error: String(error.message || error) }));
"""


def make_run(directory: Path, hidden: int) -> Path:
    torch.manual_seed(0)
    tokenizer = CharTokenizer(CHARS)
    model = RNNLanguageModel(ModelConfig(vocab_size=tokenizer.vocab_size, cell="lstm", num_layers=2,
                                         hidden_size=hidden))
    return write_run(directory, model, tokenizer)


def chromium():
    from selenium import webdriver

    chrome, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if chrome is None or driver is None:
        raise RuntimeError("no chromium/chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    browser.set_script_timeout(600)
    return browser


def in_browser(browser, export: Path, length: int, repeats: int) -> float:
    with static_server(export) as url:
        browser.get(url + "/index.html")
        answer = browser.execute_async_script(TIMING, length, repeats)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return length / answer["seconds"]


def in_node(export: Path, length: int, repeats: int) -> float:
    node = shutil.which("node")
    if node is None or not (ORT_NODE / "node_modules" / "onnxruntime-node").is_dir():
        raise RuntimeError("no node or onnxruntime-node")
    options = {"prompt": PROMPT, "length": length, "temperature": 1, "seed": 1}
    tasks = [{"model": str(export), "generate": {**options, "length": 50}}]
    tasks += [{"model": str(export), "generate": options} for _ in range(repeats)]
    job = {"module": str(export / "textrnn.js"), "ort": str(ORT_NODE), "tasks": tasks}
    done = subprocess.run([node, str(REPO / "tests" / "js" / "driver.mjs")], input=json.dumps(job).encode(),
                          capture_output=True, timeout=600, check=True)
    answers = json.loads(done.stdout)[1:]
    if any("error" in a for a in answers):
        raise RuntimeError(answers[0].get("error"))
    return length / min(a["seconds"] for a in answers)


def in_python(run: Path, engine: str, precision: str, length: int, repeats: int) -> float:
    sampler = Sampler.from_checkpoint(run, "cpu", precision=precision, engine=engine)
    sampler.generate(PROMPT, 50, seed=1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.generate(PROMPT, length, temperature=1.0, seed=1)
        best = min(best, time.perf_counter() - start)
    return length / best


def attempt(function, *args) -> str:
    try:
        return f"{function(*args):,.0f}"
    except Exception as exc:  # a missing tool: say so in the cell
        return f"- ({str(exc).splitlines()[0][:60]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2000, help="characters per timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}; batch 1, {args.length} characters, best of {args.repeats}", flush=True)
    rows = []
    browser = None
    try:
        browser = chromium()
    except Exception as exc:
        print(f"no browser: {exc}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, hidden in MODELS.items():
            run = make_run(Path(tmp) / f"run-{hidden}", hidden)
            cells = {"Python, torch fp32": attempt(in_python, run, "torch", "fp32", args.length, args.repeats),
                     "Python, onnxruntime fp32": attempt(in_python, run, "onnxruntime", "fp32", args.length,
                                                         args.repeats),
                     "Python, onnxruntime int8": attempt(in_python, run, "onnxruntime", "int8", args.length,
                                                         args.repeats)}
            for precision in ("fp32", "int8"):
                export = export_run(run, Path(tmp) / f"web-{hidden}-{precision}", "web", precision)
                size = (export / "model.onnx").stat().st_size / 2**20
                cells[f"Node, onnxruntime-node {precision}"] = attempt(in_node, export, args.length, args.repeats)
                cells[f"Chromium, onnxruntime-web {precision} ({size:.1f} MiB)"] = (
                    attempt(in_browser, browser, export, args.length, args.repeats) if browser else "- (no browser)")
            for path, value in cells.items():
                rows.append((name, path, value))
                print(f"{name:22s} {path:45s} {value}", flush=True)
    if browser is not None:
        browser.quit()
    print("\n| model | engine | chars/s |\n|---|---|---:|")
    for name, path, value in rows:
        print(f"| {name} | {path} | {value} |")


if __name__ == "__main__":
    main()
