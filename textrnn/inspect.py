"""``textrnn inspect``: what a model learned, as one self-contained HTML page for a text.

One stateful forward pass, layer by layer, keeps every position's surprisal, top-5 predictions and
the hidden (and LSTM cell) state of every unit; a gallery finds the units that track simple features.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, InputError

TOP = 5  # predictions kept per position
STATE_CHARS = 5_000  # characters whose every unit is stored in the page (all units: the page's bulk)
MAX_CHARS = 500_000  # characters an inspection reads at most
CHUNK = 2048  # tokens per forward pass
TRACE_CHARS = 240  # characters of a gallery unit's trace
FEATURES = {  # name: what the gallery looks for
    "bracket depth": "how many ( [ { are open",
    "inside quotes": "between a pair of \" (or ' in code)",
    "position in line": "characters since the line began",
    "indentation": "leading spaces of the line",
    "word start": "the first letter of a word",
}


@dataclass
class Inspection:
    """The arrays behind a report, one row per character of ``text`` (a char or byte model)."""

    text: str
    bits: np.ndarray  # (T,) float32 surprisal of each character in bits (0 for the first, NaN outside the vocabulary)
    top_ids: np.ndarray  # (T, TOP) int32: the most likely next tokens before each character
    top_probs: np.ndarray  # (T, TOP) float32 their probabilities
    states: np.ndarray  # (T, U) float16 every unit after each character: per layer h then (LSTM) c
    units: list[tuple[int, str, int]]  # (layer, "h"|"c", index) of each column of ``states``
    vocab: list[str]  # each token id's text
    gallery: list[dict] = field(default_factory=list)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Single-layer copies of the model's recurrent layers, with its weights (eval: no dropout)."""
    rnn = model.rnn
    layers = []
    for k in range(rnn.num_layers):
        layer = type(rnn)(rnn.input_size if k == 0 else rnn.hidden_size, rnn.hidden_size, 1, batch_first=True)
        layer.load_state_dict({name.replace(f"_l{k}", "_l0"): value for name, value in rnn.state_dict().items()
                               if name.endswith(f"_l{k}")})
        layers.append(layer.to(model.embedding.weight.device).eval())
    return layers


def _cells(layer: torch.nn.LSTM, x: torch.Tensor, h: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """The LSTM cell state [T, H] at every step, from the layer's inputs ``x`` [T, E] and its hidden
    states ``h`` [T + 1, H] (the one before the first step first): c_t = f_t c_{t-1} + i_t g_t."""
    gates = x @ layer.weight_ih_l0.T + h[:-1] @ layer.weight_hh_l0.T + layer.bias_ih_l0 + layer.bias_hh_l0
    i, f, g, _ = gates.chunk(4, -1)
    f, write = torch.sigmoid(f), torch.sigmoid(i) * torch.tanh(g)
    cells = torch.empty_like(f)
    c = c0
    for t in range(len(f)):  # an elementwise scan: cheap beside the matrix products above
        c = torch.addcmul(write[t], f[t], c)
        cells[t] = c
    return cells


@torch.inference_mode()
def forward_states(model: torch.nn.Module, ids: list[int], chunk: int = CHUNK):
    """Per chunk of ids: log-probabilities of the next token [T, V] and the states [T, U] after each
    token; the state carried across chunks. LSTM layers give h and c, GRU and RNN layers h."""
    layers = _layers(model)
    lstm = model.config.cell == "lstm"
    device = model.embedding.weight.device
    state = [tuple(s[k:k + 1] for s in model.init_state(1, device)) for k in range(len(layers))]
    for start in range(0, len(ids), chunk):
        x = model.embedding(torch.tensor([ids[start:start + chunk]], device=device))  # (1, T, E)
        columns = []
        for k, layer in enumerate(layers):
            before = state[k]
            out, after = layer(x, before if lstm else before[0])
            state[k] = tuple(after) if lstm else (after,)
            columns.append(out[0])
            if lstm:
                hidden = torch.cat([before[0][0], out[0]])  # (T + 1, H)
                columns.append(_cells(layer, x[0], hidden, before[1][0, 0]))
            x = out
        logits = model.head(model.projection(x))[0].float()
        yield torch.log_softmax(logits, -1), torch.cat(columns, -1).float()


def _forward(model, ids: list[int], bits: list, top_ids: list, top_probs: list, states: np.ndarray) -> None:
    """Fill the lists, per chunk: surprisal (bits) of each next token, the top predictions; and ``states``
    [T, U] (float16, allocated once: a long text's states are the bulk of the memory)."""
    for log_probs, chunk_states in forward_states(model, ids):
        values, order = torch.topk(log_probs, min(TOP, log_probs.shape[-1]), -1)
        top_ids.append(order.int().numpy())
        top_probs.append(values.exp().numpy())
        start = sum(len(b) for b in bits)
        following = torch.tensor(ids[start + 1:start + 1 + len(log_probs)])
        bits.append((-log_probs[:len(following)].gather(1, following[:, None])[:, 0] / math.log(2)).numpy())
        states[start:start + len(chunk_states)] = chunk_states.half().numpy()


def inspect_text(model: torch.nn.Module, tokenizer, text: str) -> Inspection:
    """Score ``text`` and keep every unit's state at every position (the page holds only the first few thousand)."""
    if tokenizer.kind not in ("char", "byte"):
        raise ConfigError(f"inspect reads char and byte models (one token per character); this run's "
                          f"tokenizer is {tokenizer.kind}")
    if tokenizer.kind == "byte" and not text.isascii():
        text = text.encode("ascii", "replace").decode()  # one byte per character, so positions line up
    ids = list(tokenizer.encode(text, unknown="unk")) if tokenizer.kind == "char" else list(tokenizer.encode(text))
    cell = model.config.cell
    units = [(layer, kind, unit) for layer in range(model.config.num_layers)
             for kind in (("h", "c") if cell == "lstm" else ("h",)) for unit in range(model.config.hidden_size)]
    bits, top_ids, top_probs, states = [], [], [], np.empty((len(ids), len(units)), np.float16)
    threads = torch.get_num_threads()
    # batch 1, one token after another: as a sampling stream, on one thread (a second one gains
    # little, and every tiny op waits long for it when another process holds its core)
    torch.set_num_threads(1)
    try:
        _forward(model, ids, bits, top_ids, top_probs, states)
    finally:
        torch.set_num_threads(threads)
    scored = np.concatenate([np.zeros(1, np.float32)] + bits)[:len(ids)]  # the first character is not scored
    if tokenizer.kind == "char":  # nor, as in `textrnn evaluate`, characters outside the vocabulary
        scored[np.asarray(ids) == tokenizer.unk_id] = np.nan
    # predictions before character t are those made after t - 1: shift by one (none before the first)
    top_ids = np.concatenate([np.full((1, TOP), -1, np.int32)] + top_ids)[:len(ids)]
    top_probs = np.concatenate([np.zeros((1, TOP), np.float32)] + top_probs)[:len(ids)]
    vocab = [tokenizer.decode([i]) if tokenizer.kind == "char" else chr(i) if i < 128 else "\ufffd"
             for i in range(tokenizer.vocab_size)]
    result = Inspection(text, scored.astype(np.float32), top_ids, top_probs, states, units, vocab)
    result.gallery = find_feature_units(text, result.states, units)
    return result


def features(text: str) -> dict[str, np.ndarray]:
    """Each feature's value at every character (after reading it), float32 arrays of len(text)."""
    n = len(text)
    depth, quote, column, indent, start = (np.zeros(n, np.float32) for _ in range(5))
    level, inside, col, lead, leading, previous = 0, False, 0, 0, True, "\n"
    code = "def " in text or "import " in text  # in code, ' quotes strings too
    marks = "\"'" if code else '"'
    for t, ch in enumerate(text):
        if ch in "([{":
            level += 1
        elif ch in ")]}":
            level = max(0, level - 1)
        if ch in marks:
            inside = not inside
        if ch == "\n":
            col, lead, leading = 0, 0, True
            inside = inside and not code  # a string in code ends with its line
        else:
            col += 1
            if leading and ch == " ":
                lead += 1
            else:
                leading = False
        depth[t], quote[t], column[t], indent[t] = level, inside, col, lead
        start[t] = ch.isalpha() and not previous.isalpha()
        previous = ch
    return {"bracket depth": depth, "inside quotes": quote, "position in line": column, "indentation": indent,
            "word start": start}


def _blocks(states: np.ndarray, rows: int = 8192):
    for start in range(0, len(states), rows):
        yield start, states[start:start + rows].astype(np.float32)


def correlations(states: np.ndarray, features: list[np.ndarray]) -> list[np.ndarray]:
    """Pearson correlation of every column of ``states`` [T, U] with each feature [T] (0 where either
    is constant); read in blocks of rows, so a float16 ``states`` is never copied whole."""
    n = len(states)
    total, squares = np.zeros(states.shape[1]), np.zeros(states.shape[1])
    centred = [f.astype(np.float64) - f.mean() for f in features]
    products = [np.zeros(states.shape[1]) for _ in features]
    for start, block in _blocks(states):
        total += block.sum(0, dtype=np.float64)
        squares += (block.astype(np.float64) ** 2).sum(0)
        for f, product in zip(centred, products):
            product += f[start:start + len(block)].astype(np.float32) @ block  # sum(f_c) = 0: no mean needed
    spread = np.sqrt(np.maximum(squares - total ** 2 / n, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return [np.nan_to_num(product / (spread * np.sqrt((f ** 2).sum()))) for f, product in zip(centred, products)]


def find_feature_units(text: str, states: np.ndarray, units: list[tuple[int, str, int]]) -> list[dict]:
    """Per feature that varies in ``text``: the unit whose activation correlates with it most (either sign)."""
    gallery = []
    found = {name: values for name, values in features(text).items() if values.std() > 0 and values.sum() >= 2}
    for (name, values), r in zip(found.items(), correlations(states, list(found.values()))):
        best = int(np.abs(r).argmax())
        gallery.append({"feature": name, "about": FEATURES[name], "column": best, "unit": list(units[best]),
                        "r": round(float(r[best]), 4), "sample": _sample_start(values, len(text))})
    return gallery


def _sample_start(values: np.ndarray, n: int) -> int:
    """Where a trace starts: the window of TRACE_CHARS in which the feature varies most."""
    if n <= TRACE_CHARS:
        return 0
    step = TRACE_CHARS // 2
    starts = range(0, n - TRACE_CHARS + 1, step)
    return max(starts, key=lambda s: float(values[s:s + TRACE_CHARS].std()))


def summary(text: str, bits: np.ndarray, passages: int = 5, width: int = 80) -> dict:
    """Bits per character overall and by class, and the hardest passages (highest mean surprisal)."""
    chars = np.array(list(text)) if text else np.array([], dtype="<U1")
    scored = (np.arange(len(text)) > 0) & ~np.isnan(bits)  # NaN: outside the vocabulary
    classes = {"letters": np.char.isalpha(chars), "spaces": chars == " ", "newlines": chars == "\n",
               "digits": np.char.isdigit(chars)}
    classes["punctuation"] = ~(classes["letters"] | classes["spaces"] | classes["newlines"] | classes["digits"]
                               | (chars == "\t"))
    by_class = {name: {"bpc": float(bits[mask & scored].mean()), "chars": int((mask & scored).sum())}
                for name, mask in classes.items() if (mask & scored).any()}
    hardest = []
    if len(text) > width:
        means = np.convolve(np.nan_to_num(bits), np.ones(width) / width, mode="valid")
        for _ in range(passages):
            at = int(means.argmax())
            if means[at] == -np.inf:
                break
            hardest.append({"start": at, "bpc": float(means[at]), "text": text[at:at + width]})
            means[max(0, at - width):at + width] = -np.inf
    return {"bpc": float(bits[scored].mean()) if scored.any() else 0.0, "chars": len(text),
            "classes": by_class, "hardest": hardest}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _quantized(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes [T, U] and per-unit scales [U] (float32): value ~ code * scale / 127."""
    states = states.astype(np.float32)
    scale = np.maximum(np.abs(states).max(0), 1e-6).astype(np.float32)
    return np.round(states / scale * 127).astype(np.int8), scale


def report_html(result: Inspection, title: str, state_chars: int = STATE_CHARS) -> str:
    """The page: the template with the data inlined as JSON and base64 arrays (float16, int8, int16)."""
    kept = min(len(result.text), state_chars)
    codes, scale = _quantized(result.states[:kept])
    traces = {}
    for item in result.gallery:
        s = item["sample"]
        traces[str(item["column"])] = result.states[s:s + TRACE_CHARS, item["column"]].astype(float).round(3).tolist()
    data = {"title": title, "text": result.text, "vocab": result.vocab, "top": TOP, "units": result.units,
            "bits": _b64(result.bits.astype(np.float16)), "topIds": _b64(result.top_ids.astype(np.int16)),
            "topProbs": _b64(np.round(result.top_probs * 255).astype(np.uint8)),
            "stateChars": kept, "states": _b64(codes), "scales": _b64(scale), "gallery": result.gallery,
            "traces": traces, "traceChars": TRACE_CHARS, "summary": summary(result.text, result.bits)}
    template = (resources.files(__package__) / "inspect.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # never ends the script element
    return template.replace("/*DATA*/null", payload, 1)


def inspect_file(run_dir: str | os.PathLike, file: str | os.PathLike, out: str | os.PathLike | None = None,
                 device: str = "auto", state_chars: int = STATE_CHARS, max_chars: int = MAX_CHARS) -> tuple[Path, dict]:
    """Write the report of ``file`` under a run's best weights; returns its path and the summary."""
    from .checkpoint import load_run
    from .fileio import atomic_write_text
    from .runtime import resolve_device

    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    if len(text) < 2:
        raise InputError(f"{path}: too short to inspect (needs at least two characters)")
    if len(text) > max_chars:
        raise InputError(f"{path}: {len(text):,} characters is over the limit of {max_chars:,}; inspect a part")
    if state_chars < 1:
        raise ConfigError(f"--state-chars must be at least 1, got {state_chars}")
    run = load_run(run_dir, resolve_device(device))
    result = inspect_text(run.model, run.tokenizer, text)
    target = Path(out) if out is not None else path.with_suffix(".inspect.html")
    atomic_write_text(target, report_html(result, f"{Path(run_dir).name} on {path.name}", state_chars))
    return target, summary(result.text, result.bits)
