"""ONNX export of the one-token step, checked with onnxruntime, and the onnxruntime step engine.

The graph is written node by node from the weights (no tracing): the same layout as
``RNNLanguageModel._prepared`` (layer 0's input projection as a table, one Gemm per layer,
the tied head's projection folded in), so ONNX Runtime runs a dozen small ops per layer.
Its names are a contract (DESIGN.md): inputs ``ids`` int64 [B], ``h`` float32
[layers, B, hidden] (+ ``c`` for an LSTM); outputs ``logits`` [B, vocab], ``h_out`` (+ ``c_out``).
``onnx`` and ``onnxruntime`` are optional (``pip install 'textrnn[onnx]'``) and imported here only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CONFIG_FILE, check_format, read_json, run_config, staging_directory, write_json
from .errors import ConfigError, InputError, TextRNNError

EXPORT_FORMAT = "textrnn-onnx"
EXPORT_VERSION = 1
ONNX_FILE = "model.onnx"
FORMATS = ("onnx", "web")
PRECISIONS = ("fp32", "int8")
OPSET = 17
TOLERANCE = 1e-4  # the largest logit difference from PyTorch an export may have
QUANTIZE_PER_CHANNEL = True  # int8 weights: a scale per output row (BENCHMARKS.md)
CACHE_DIR = "onnx"  # the sampling engine's export, beside the run's weights
EXPORT_FILES = {ONNX_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer.model", "textrnn.js", "index.html", "package.json", "ort"}
INT8_DISTANCE = 0.01  # int8 export: the mean total variation from fp32's next-token distribution, at most
INT8_LOSS_GAP = 0.01  # ... and its loss on the model's own text within this of fp32's (nats/token)


class ExportError(TextRNNError):
    """An export that cannot be made or does not match PyTorch (exit code 1)."""

    exit_code = 1


def onnx_available() -> bool:
    """Whether ``onnx`` and ``onnxruntime`` can be imported (the ``textrnn[onnx]`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _require_onnx() -> None:
    if not onnx_available():
        raise ConfigError("ONNX export needs the onnx extra: pip install 'textrnn[onnx]'")


# ---------------------------------------------------------------- the graph

class _Graph:
    """A small builder: initializers from arrays, nodes with generated output names."""

    def __init__(self):
        from onnx import helper

        self.helper, self.nodes, self.initializers, self._count = helper, [], [], 0

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        array = array.detach().float().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, name: str | None = None, **attributes) -> str | list[str]:
        self._count += 1
        names = [name] if name else [f"{kind.lower()}_{self._count}_{n}" for n in range(outputs)]
        self.nodes.append(self.helper.make_node(kind, list(inputs), names, name=names[0], **attributes))
        return names[0] if outputs == 1 else names


def step_graph(model: nn.Module) -> bytes:
    """The serialized ONNX model of one token step of ``model`` (fp32, any batch size)."""
    _require_onnx()
    from onnx import TensorProto, helper

    config = model.config
    cell, layers = config.cell, config.num_layers
    g = _Graph()
    zero = g.const("axis0", np.array([0], dtype=np.int64))
    outputs_h, outputs_c = [], []
    x = None  # the output of the layer below, (B, H)
    with torch.no_grad():
        for k in range(layers):
            h = g.op("Gather", "h", g.const(f"layer{k}", np.array(k, dtype=np.int64)), axis=0)  # (B, H)
            if cell == "gru":
                x = _gru_layer(g, model, k, x, h)
            else:
                x, c = _gated_layer(g, model, k, x, h)
                if c is not None:
                    outputs_c.append(g.op("Unsqueeze", c, zero))
            outputs_h.append(g.op("Unsqueeze", x, zero))
        head_w = model.head.weight
        if not isinstance(model.projection, nn.Identity):
            head_w = head_w @ model.projection.weight  # fold the projection: (V, H)
        g.op("Gemm", x, g.const("head_w", head_w), g.const("head_b", model.head.bias), transB=1, name="logits")
    g.op("Concat", *outputs_h, axis=0, name="h_out")
    if cell == "lstm":
        g.op("Concat", *outputs_c, axis=0, name="c_out")

    state_shape = [layers, "batch", config.hidden_size]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info("h", TensorProto.FLOAT, state_shape)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", config.vocab_size]),
               helper.make_tensor_value_info("h_out", TensorProto.FLOAT, state_shape)]
    if cell == "lstm":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, state_shape))
        outputs.append(helper.make_tensor_value_info("c_out", TensorProto.FLOAT, state_shape))
    graph = helper.make_graph(g.nodes, f"textrnn_{cell}_step", inputs, outputs, g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="textrnn")
    onnx_model.ir_version = min(onnx_model.ir_version, 8)  # readable by older runtimes too
    return onnx_model.SerializeToString()


def _layer_weights(model: nn.Module, k: int) -> tuple[torch.Tensor, ...]:
    rnn = model.rnn
    return tuple(getattr(rnn, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def _gru_layer(g: _Graph, model: nn.Module, k: int, x: str | None, h: str) -> str:
    """Layer ``k`` of a GRU step: the new state (B, H). Layer 0 reads its input gates from a table
    of the embedding already multiplied in, gathered by id."""
    hidden = model.config.hidden_size
    w_ih, w_hh, b_ih, b_hh = _layer_weights(model, k)
    rz, n = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
    if k == 0:
        table = torch.nn.functional.linear(model.embedding.weight, w_ih, b_ih)  # (V, 3H)
        below_rz = g.op("Gather", g.const("table0_rz", table[:, rz] + b_hh[rz]), "ids", axis=0)
        gates_rz = g.op("Gemm", h, g.const("w_hh0_rz", w_hh[rz]), below_rz, transB=1)
        n_below = g.op("Gather", g.const("table0_n", table[:, n]), "ids", axis=0)
    else:
        both = g.op("Concat", x, h, axis=1)
        gates_rz = g.op("Gemm", both, g.const(f"w{k}_rz", torch.cat([w_ih[rz], w_hh[rz]], 1)),
                        g.const(f"b{k}_rz", b_ih[rz] + b_hh[rz]), transB=1)
        n_below = g.op("Gemm", x, g.const(f"w_ih{k}_n", w_ih[n]), g.const(f"b_ih{k}_n", b_ih[n]), transB=1)
    r, z = g.op("Split", g.op("Sigmoid", gates_rz), axis=1, outputs=2)
    h_n = g.op("Gemm", h, g.const(f"w_hh{k}_n", w_hh[n]), g.const(f"b_hh{k}_n", b_hh[n]), transB=1)
    new = g.op("Tanh", g.op("Add", n_below, g.op("Mul", r, h_n)))
    return g.op("Add", new, g.op("Mul", z, g.op("Sub", h, new)))  # (1 - z) * n + z * h


def _gated_layer(g: _Graph, model: nn.Module, k: int, x: str | None, h: str) -> tuple[str, str | None]:
    """Layer ``k`` of an LSTM or tanh-RNN step: the new h (B, H) and, for an LSTM, the new c."""
    cell, hidden = model.config.cell, model.config.hidden_size
    w_ih, w_hh, b_ih, b_hh = _layer_weights(model, k)

    def reorder(rows: torch.Tensor) -> torch.Tensor:  # LSTM gates (i, f, g, o) -> (i, f, o, g)
        if cell != "lstm":
            return rows
        i, f, gg, o = rows.split(hidden, dim=0)
        return torch.cat([i, f, o, gg])

    if k == 0:
        table = reorder(torch.nn.functional.linear(model.embedding.weight, w_ih, b_ih + b_hh).t()).t()
        below = g.op("Gather", g.const("table0", table), "ids", axis=0)  # (B, gates*H)
        gates = g.op("Gemm", h, g.const("w_hh0", reorder(w_hh)), below, transB=1)
    else:
        both = g.op("Concat", x, h, axis=1)
        gates = g.op("Gemm", both, g.const(f"w{k}", reorder(torch.cat([w_ih, w_hh], 1))),
                     g.const(f"b{k}", reorder(b_ih + b_hh)), transB=1)
    if cell != "lstm":
        return g.op("Tanh", gates), None
    c = g.op("Gather", "c", g.const(f"layer{k}_c", np.array(k, dtype=np.int64)), axis=0)
    sizes = g.const(f"sizes{k}", np.array([3 * hidden, hidden], dtype=np.int64))
    ifo, cand = g.op("Split", gates, sizes, axis=1, outputs=2)
    i, f, o = g.op("Split", g.op("Sigmoid", ifo), axis=1, outputs=3)
    c = g.op("Add", g.op("Mul", f, c), g.op("Mul", i, g.op("Tanh", cand)))
    return g.op("Mul", o, g.op("Tanh", c)), c


def quantized_graph(onnx_model: bytes | os.PathLike) -> bytes:
    """The step graph with int8 recurrent weights: onnxruntime's dynamic quantization.

    Each layer's matrix becomes int8 (one scale per output row) and its input is quantized to
    uint8 at run time, so a token reads a quarter of the fp32 bytes. Layer 0's table (a lookup)
    and the output head stay fp32. Logits move (by up to 0.24 on a trained 2x512 LSTM fed random
    ids; its validation loss by 1e-4, BENCHMARKS.md), so the same seed gives different text than
    fp32: it is an explicit choice, never a default.
    """
    _require_onnx()
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load_from_string(onnx_model) if isinstance(onnx_model, bytes) else onnx.load(str(onnx_model))
    head = ["logits", "logits_MatMul"]  # the head's Gemm, before and after the quantizer splits it
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # it advises pre-processing, which a step graph does not need
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["Gemm", "MatMul"], nodes_to_exclude=head,
                             per_channel=QUANTIZE_PER_CHANNEL, weight_type=QuantType.QInt8)
            return out.read_bytes()
    finally:
        logging.getLogger().setLevel(quiet)


# ---------------------------------------------------------------- running it

def session(onnx_model: bytes | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session for a step graph, tuned for many tiny calls."""
    _require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxStepper:
    """``model.step``'s signature over an onnxruntime session: ids [B] -> logits [B, V], new state.

    The state may come in as torch tensors or as the numpy arrays this returns. ``loop()`` gives
    a faster step for one loop of many calls (a sampler's). Batches run on ``threads`` threads
    (default: torch's count). Batch 1 runs on ``batch_1_threads``; by default, the cores no other
    process keeps busy when its first call comes (``runtime.choose_threads``, at most
    ``threads``): an int8 step ran up to 1.9x faster on two idle cores than on one, while a
    thread that shares its core with a busy process stalls every step (BENCHMARKS.md).
    """

    def __init__(self, onnx_model: bytes | os.PathLike, lstm: bool, threads: int | None = None,
                 batch_1_threads: int | None = None):
        self.onnx_model, self.lstm = onnx_model, lstm
        self.threads = threads or torch.get_num_threads()
        self.batch_1_threads = batch_1_threads
        self._sessions: dict[int, object] = {}

    def _session(self, batch: int):
        threads = self.threads
        if batch == 1:
            if self.batch_1_threads is None:
                from .runtime import choose_threads

                self.batch_1_threads = min(self.threads, choose_threads(None, look=0.1)[0])
            threads = self.batch_1_threads
        if threads not in self._sessions:
            self._sessions[threads] = session(self.onnx_model, threads)
        return self._sessions[threads]

    def __call__(self, ids, state):
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        feeds = {"ids": ids, "h": _array(state[0])}
        if self.lstm:
            feeds["c"] = _array(state[1])
        outputs = self._session(ids.shape[0]).run(None, feeds)
        return torch.from_numpy(outputs[0]), tuple(outputs[1:])

    def loop(self) -> Callable:
        """A step with the signature of ``__call__`` for one loop, on buffers of its own (see ``_Bindings``)."""
        bound: dict[tuple, _Bindings] = {}

        def step(ids, state):
            shape = tuple(state[0].shape)  # (layers, B, hidden)
            if shape not in bound:
                bound[shape] = _Bindings(self._session(shape[1]), shape, self.lstm)
            return bound[shape].run(ids, state)

        return step


class _Bindings:
    """Two IO bindings of one session whose state buffers swap roles: set k in, set 1 - k out.

    Bound once, a step allocates and copies nothing. A state that is not the one the previous
    step returned (priming's, a caller's) is copied in. What a step returns is overwritten by
    the step after (the logits) or the one after that (the state): use it before then.
    """

    def __init__(self, sess, shape: tuple, lstm: bool):
        import onnxruntime as ort

        names = ["h", "c"] if lstm else ["h"]
        vocab = sess.get_outputs()[0].shape[1]
        self.sess, self.ids = sess, np.zeros(shape[1], np.int64)
        self.ids_view = torch.from_numpy(self.ids)
        self.logits = torch.from_numpy(np.zeros((shape[1], vocab), np.float32))
        self.states = [tuple(np.zeros(shape, np.float32) for _ in names) for _ in range(2)]
        self._values = []  # the OrtValues wrap these arrays; they must live as long as the bindings
        self.bindings = []
        for k in range(2):
            binding = sess.io_binding()
            binding.bind_cpu_input("ids", self.ids)
            for name, array_in, array_out in zip(names, self.states[k], self.states[1 - k]):
                binding.bind_cpu_input(name, array_in)
                value = ort.OrtValue.ortvalue_from_numpy(array_out)
                binding.bind_ortvalue_output(name + "_out", value)
                self._values.append(value)
            value = ort.OrtValue.ortvalue_from_numpy(self.logits.numpy())
            binding.bind_ortvalue_output("logits", value)
            self._values.append(value)
            self.bindings.append(binding)

    def run(self, ids, state) -> tuple[torch.Tensor, tuple]:
        if state is self.states[0]:
            k = 0
        elif state is self.states[1]:
            k = 1
        else:  # a state from elsewhere (priming, a caller): copy it into set 0
            k = 0
            for target, value in zip(self.states[0], state):
                target[...] = _array(value)
        if isinstance(ids, np.ndarray):
            self.ids[...] = ids
        else:
            self.ids_view.copy_(ids)
        self.sess.run_with_iobinding(self.bindings[k])
        return self.logits, self.states[1 - k]


def _array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().contiguous().numpy()
    return np.asarray(value, dtype=np.float32)


def check_export(model: nn.Module, onnx_model: bytes | os.PathLike, steps: int = 8, batch: int = 3,
                 seed: int = 0) -> float:
    """The largest logit difference between onnxruntime and PyTorch over a random id sequence, state carried."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, steps), generator=generator)
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            expected, _ = model(ids)  # (B, T, V), the fused RNN over the whole sequence
    finally:
        if was_training:
            model.train()
    stepper = OnnxStepper(onnx_model, model.config.cell == "lstm", threads=1)
    state = tuple(s.numpy() for s in model.init_state(batch, "cpu"))
    worst = 0.0
    for t in range(steps):
        logits, state = stepper(ids[:, t], state)
        worst = max(worst, float((logits - expected[:, t].float().cpu()).abs().max()))
    return worst


def _checked_graph(model: nn.Module) -> bytes:
    graph = step_graph(model)
    worst = check_export(model, graph)
    if not worst <= TOLERANCE:  # NaN fails too
        raise ExportError(f"the ONNX step's logits differ from PyTorch's by {worst:.3g} (more than {TOLERANCE:g})")
    return graph


def check_quantized(model: nn.Module, onnx_model: bytes | os.PathLike, steps: int = 256, batch: int = 4,
                    seed: int = 0) -> tuple[float, float]:
    """How far an int8 step is from the model, on text the model itself writes: (the mean total
    variation distance between the two next-token distributions, the int8 step's loss on that
    text minus the model's, nats/token).

    ``batch`` samples of ``steps`` tokens are drawn from the fp32 model (temperature 1, seeded),
    so the states are those of real text, not of random ids; then both score them. Logits are the
    wrong yardstick for int8 (they move by tenths where the distribution barely moves), and so is
    the largest distance at one position (0.02 on a trained model whose loss moves by 1e-4)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            state = model.init_state(batch, "cpu")
            ids = torch.zeros(batch, 1, dtype=torch.int64)  # id 0 first: the smallest code point (a newline, often)
            probs = []
            for _ in range(steps):
                logits, state = model(ids[:, -1:], state)
                probs.append(torch.softmax(logits[:, -1].float(), -1))  # (B, V)
                ids = torch.cat([ids, torch.multinomial(probs[-1], 1, generator=generator)], 1)
    finally:
        model.train(was_training)
    stepper = OnnxStepper(onnx_model, model.config.cell == "lstm", threads=1)
    state = tuple(s.numpy() for s in model.init_state(batch, "cpu"))
    distance = loss_gap = 0.0
    for t in range(steps):
        logits, state = stepper(ids[:, t], state)
        q, p, target = torch.softmax(logits.float(), -1), probs[t], ids[:, t + 1:t + 2]
        distance += float(0.5 * (q - p).abs().sum(-1).mean())
        loss_gap += float((p.gather(1, target).log() - q.gather(1, target).log()).mean())
    return distance / steps, loss_gap / steps


def _export_graph(model: nn.Module, precision: str) -> bytes:
    graph = _checked_graph(model)
    if precision == "fp32":
        return graph
    graph = quantized_graph(graph)
    distance, loss_gap = check_quantized(model, graph)
    if not (distance <= INT8_DISTANCE and abs(loss_gap) <= INT8_LOSS_GAP):
        raise ExportError(f"the int8 step is too far from fp32 on the model's own text (mean total variation "
                          f"{distance:.3g}, loss {loss_gap:+.3g} nats/token; the limits are {INT8_DISTANCE:g} and "
                          f"{INT8_LOSS_GAP:g}); export this model in fp32")
    return graph


# ---------------------------------------------------------------- export a run

def _export_metadata(model: nn.Module, tokenizer, weights_sha256: str | None) -> dict:
    cell = model.config.cell
    data = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(), "unk_id": getattr(tokenizer, "unk_id", None),
            "inputs": ["ids", "h"] + (["c"] if cell == "lstm" else []),
            "outputs": ["logits", "h_out"] + (["c_out"] if cell == "lstm" else [])}
    if weights_sha256:
        data["weights_sha256"] = weights_sha256
    return data


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "onnx", precision: str = "fp32",
               runtime: str = "bundled") -> Path:
    """Export a run's best weights to ``out``: model.onnx, the tokenizer files and config.json.

    ``format="web"`` adds textrnn.js, index.html and (``runtime="bundled"``) the onnxruntime-web
    files (``textrnn/web``): a folder any static file server can serve. ``precision="int8"``
    quantizes the step's recurrent weights (``quantized_graph``). The export is checked against
    PyTorch with onnxruntime before ``out`` appears; on any failure nothing is left behind.
    ``out`` may be new, empty, or a previous export.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown export precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    run_dir, out = Path(run_dir), Path(out)
    config = run_config(run_dir)  # not a run: a clear error before anything else
    _check_out(out)
    web = None
    if format == "web":
        from . import web as web_files

        web_files.check_tokenizer(config["tokenizer"].get("kind"))
        web = web_files.web_metadata(runtime)
        if runtime == "bundled":
            web_files.find_runtime()  # the download, if any, before the work
    _require_onnx()
    from .checkpoint import load_run, weights_file
    from .fileio import file_sha256

    run = load_run(run_dir, "cpu")
    graph = _export_graph(run.model, precision)
    with staging_directory(out) as tmp:
        _write_export(tmp, graph, run.model, run.tokenizer, file_sha256(weights_file(run_dir)), precision, web)
        if web is not None:
            web_files.write_page(tmp, runtime)
    return out


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise InputError(f"{out}: holds other files ({', '.join(others[:3])}); give a new or empty directory")


def _write_export(directory: Path, graph: bytes, model: nn.Module, tokenizer, weights_sha256: str | None,
                  precision: str = "fp32", web: dict | None = None) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(directory / ONNX_FILE, graph)
    tokenizer.save(directory)
    metadata = _export_metadata(model, tokenizer, weights_sha256)
    metadata["precision"] = precision
    if web is not None:
        metadata["web"] = web
    write_json(directory / CONFIG_FILE, metadata)


def cached_step_graph(run_dir: str | os.PathLike, model: nn.Module, tokenizer) -> bytes | Path:
    """The checked ONNX step of a run's best weights, from ``RUN_DIR/onnx/`` while the weights are unchanged.

    A missing or stale cache is rebuilt; a run directory that cannot be written gets the graph
    in memory instead (no error: the cache only saves time).
    """
    from .checkpoint import weights_file
    from .fileio import file_sha256

    run_dir = Path(run_dir)
    cache = run_dir / CACHE_DIR
    sha = file_sha256(weights_file(run_dir))
    try:
        meta = read_json(cache / CONFIG_FILE, "ONNX export")
        check_format(meta, EXPORT_FORMAT, cache / CONFIG_FILE)
        if meta.get("weights_sha256") == sha and (cache / ONNX_FILE).is_file():
            return cache / ONNX_FILE
    except TextRNNError:
        pass
    graph = _checked_graph(model)
    try:
        with staging_directory(cache) as tmp:
            _write_export(tmp, graph, model, tokenizer, sha)
    except TextRNNError:
        return graph
    return cache / ONNX_FILE


def time_steps(step, state, batch: int, steps: int = 24) -> float:
    """Seconds per call of ``step`` (the best of three short timings) at ``batch``, from ``state``."""
    ids = torch.zeros(batch, dtype=torch.int64)
    best = float("inf")
    with torch.inference_mode():
        step(ids, state)  # warm up
        for _ in range(3):
            start, current = time.perf_counter(), state
            for _ in range(steps // 3):
                _, current = step(ids, current)
            best = min(best, (time.perf_counter() - start) / (steps // 3))
    return best
