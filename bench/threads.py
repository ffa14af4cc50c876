"""Training speed on a shared CPU: solo, and beside a busy competitor (``yes > /dev/null``).

Each setting runs in a fresh process (OpenMP reads its environment once, at start), trains the
default model for a fixed number of steps and reports chars/s. Then the same settings run again
while one ``yes`` process keeps a core busy. The ratio busy/solo is what a competing process
costs training; the old behaviour (all cores, OpenMP's defaults) is measured in the same run.

    python bench/threads.py                 # the default model, 40 timed steps per setting
    python bench/threads.py --steps 20 --cell gru
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name, environment, --threads (None: the trainer's default choice)
SETTINGS = [
    ("old: all cores, OpenMP defaults", {}, "all"),
    ("all cores, OMP_WAIT_POLICY=passive", {"OMP_WAIT_POLICY": "PASSIVE"}, "all"),
    ("idle cores at start", {}, None),
    ("idle cores at start, passive", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
    ("all cores, GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}, "all"),
    ("one thread", {}, 1),
]

CHILD = r"""
import json, sys, time
import torch
from textrnn.config import TrainConfig, preset
from textrnn.model import RNNLanguageModel
from textrnn.runtime import autocast, choose_threads, resolve_precision
from textrnn.training import _optimizer

args = json.loads(sys.argv[1])
threads = args["threads"]
if threads == "all":
    threads = len(__import__("os").sched_getaffinity(0))
threads, why = choose_threads(threads)
torch.set_num_threads(threads)
config = TrainConfig()
model_config = preset(args["preset"], **({"cell": args["cell"]} if args["cell"] else {}))
model_config.vocab_size = 65
torch.manual_seed(0)
model = RNNLanguageModel(model_config)
optimizer = _optimizer(model, config, fused_ok=True)
device = torch.device("cpu")
precision = resolve_precision(args["precision"], device)
x = torch.randint(0, 65, (config.batch_size, config.seq_len))
hidden = model.init_state(config.batch_size)

def step():
    global hidden
    with autocast(device, precision):
        logits, new = model(x, hidden)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 65), x.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    hidden = tuple(h.detach() for h in new)

for _ in range(5):
    step()
start = time.perf_counter()
for _ in range(args["steps"]):
    step()
seconds = time.perf_counter() - start
print(json.dumps({"chars_per_sec": args["steps"] * config.batch_size * config.seq_len / seconds,
                  "threads": threads, "why": why, "precision": precision}))
"""


def measure(env_extra: dict, threads, args) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "TEXTRNN_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT)
    payload = json.dumps({"threads": threads, "steps": args.steps, "preset": args.preset, "cell": args.cell,
                          "precision": args.precision})
    done = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--cell", default=None)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.common import machine

    print(f"machine: {machine()}, {len(os.sched_getaffinity(0))} usable cores; load average "
          f"{os.getloadavg()[0]:.2f}")
    solo = {name: measure(env, threads, args) for name, env, threads in SETTINGS}
    competitor = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        busy = {name: measure(env, threads, args) for name, env, threads in SETTINGS}
    finally:
        competitor.kill()
    reference = solo[SETTINGS[0][0]]["chars_per_sec"]
    print(f"\npreset {args.preset}{' ' + args.cell if args.cell else ''}, batch 64 x 64, "
          f"{solo[SETTINGS[0][0]]['precision']}, {args.steps} timed steps each\n")
    print("| setting | threads solo / busy | solo chars/s | beside `yes` | busy / solo | busy / old solo |")
    print("|---|---|---|---|---|---|")
    for name, _, _ in SETTINGS:
        a, b = solo[name], busy[name]
        print(f"| {name} | {a['threads']} / {b['threads']} | {a['chars_per_sec']:,.0f} | {b['chars_per_sec']:,.0f} "
              f"| {b['chars_per_sec'] / a['chars_per_sec']:.2f} | {b['chars_per_sec'] / reference:.2f} |")


if __name__ == "__main__":
    main()
