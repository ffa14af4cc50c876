"""Sample text from a `textrnn export` directory with numpy and onnxruntime only (no torch, no textrnn).

    textrnn export runs/shakespeare --format onnx --out shakespeare-onnx
    python examples/sample_onnx.py shakespeare-onnx --prompt "ROMEO:" --length 300 \
        --temperature 0.8 --top-k 40 --top-p 0.95 --seed 7

The directory holds model.onnx (one token step: inputs ids [B], h [layers, B, hidden] and c for an
LSTM; outputs logits [B, vocab], h_out and c_out), tokenizer.json and config.json. Char and byte
vocabularies are read here; SentencePiece ones need the sentencepiece package (not used here).
The text differs from `textrnn generate`'s for the same seed: the random numbers come from numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def load(directory: Path):
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get("format") != "textrnn-onnx":
        sys.exit(f"error: {directory}: not a textrnn ONNX export (config.json format {config.get('format')!r})")
    tokenizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one stream: a matrix-vector product gains little from more
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return config, tokenizer, session


def codec(tokenizer: dict):
    """encode(text) -> ids, decode(id) -> text piece, and the ids never to sample."""
    if tokenizer["kind"] == "char":
        chars = tokenizer["chars"]
        index = {c: i for i, c in enumerate(chars)}

        def encode(text: str) -> list[int]:
            unknown = sorted({c for c in text if c not in index})
            if unknown:
                sys.exit(f"error: prompt: {len(unknown)} character(s) not in the vocabulary: {''.join(unknown)!r}")
            return [index[c] for c in text]

        return encode, (lambda i: chars[i]), [len(chars)]  # the unknown id is last
    if tokenizer["kind"] == "byte":
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return (lambda text: list(text.encode("utf-8"))), (lambda i: decoder.decode(bytes([i]))), []
    sys.exit(f"error: {tokenizer['kind']} tokenizers need the sentencepiece package; this example reads char and byte")


def pick(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One id from logits [V]: greedy at temperature 0, else softmax(logits / T) over the top-k, then top-p."""
    if temperature == 0:
        return int(np.argmax(logits))
    order = np.argsort(-logits, kind="stable")  # most likely first
    if 0 < top_k < len(order):
        order = order[:top_k]
    scaled = (logits[order] - logits[order[0]]) / temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        above = np.cumsum(probs) - probs  # keep a token while the ones above it hold less than top_p
        keep = max(1, int((above < top_p).sum()))
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="a `textrnn export` output directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--length", type=int, default=300, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    args = parser.parse_args()

    config, tokenizer, session = load(args.directory)
    model = config["model"]
    lstm = model["cell"] == "lstm"
    encode, decode, never = codec(tokenizer)
    rng = np.random.default_rng(args.seed)
    state = {name: np.zeros((model["num_layers"], 1, model["hidden_size"]), np.float32)
             for name in (["h", "c"] if lstm else ["h"])}

    def step(token: int) -> np.ndarray:
        outputs = session.run(None, {"ids": np.array([token], np.int64), **state})
        state["h"] = outputs[1]
        if lstm:
            state["c"] = outputs[2]
        return outputs[0][0]  # (V,)

    # an empty prompt starts after a newline where the vocabulary has one, as textrnn does
    start = args.prompt or ("\n" if tokenizer["kind"] != "char" or "\n" in tokenizer["chars"] else "")
    logits = np.zeros(tokenizer["vocab_size"], np.float32)  # uniform, when there is nothing to read
    for token in encode(start):  # one step per prompt token, state carried
        logits = step(token)
    sys.stdout.write(args.prompt)
    for n in range(args.length):
        logits[never] = -np.inf
        token = pick(logits, args.temperature, args.top_k, args.top_p, rng)
        sys.stdout.write(decode(token))
        if n + 1 < args.length:
            logits = step(token)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
