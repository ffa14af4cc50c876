"""The ``textrnn`` command line: each command parses, calls one library function, and prints.

This is the only module that writes to the terminal or exits: ``TextRNNError`` becomes one line,
``error: <what>: <problem>``, and exit code 2 (1 for a failed run, 130 after Ctrl-C).
"""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import (DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig, count_parameters, format_duration,
                     parse_duration, preset)
from .errors import ConfigError, InputError, TextRNNError

try:  # typer ships its own copy of click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer that depends on click
    from click.exceptions import ClickException as _ClickException


class _App(typer.Typer):
    """A Typer app whose usage errors are one line (``error: ...``, exit 2), like our own errors."""

    def __call__(self, *args, **kwargs):
        command = typer.main.get_command(self)
        try:
            result = command.main(*args, standalone_mode=False, **kwargs)
        except _ClickException as exc:
            _fail(exc.format_message().replace("Value error, ", ""), exc.exit_code)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            print("\naborted", file=sys.stderr)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


app = _App(help="Character-level RNN language models: preprocess text, train, generate, evaluate.",
           context_settings={"help_option_names": ["-h", "--help"]}, add_completion=False,
           pretty_exceptions_enable=False, rich_markup_mode=None, no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _warn(message: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except Exception:  # noqa: BLE001 - a broken stderr must not stop training
        pass


def _run(function, *args, **kwargs):
    """Call into the library; turn its errors into one line and an exit code."""
    try:
        return function(*args, **kwargs)
    except TextRNNError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except MemoryError:
        _fail("out of memory; try a smaller model, --batch-size or input", 1)
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):  # torch's CPU allocator says so instead of MemoryError
            raise
        _fail("out of memory; try a smaller model, --batch-size or input", 1)


class Tokenizer(str, Enum):
    char = "char"
    byte = "byte"
    bpe = "bpe"
    unigram = "unigram"


class Cell(str, Enum):
    lstm = "lstm"
    gru = "gru"
    rnn = "rnn"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class SamplePrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"


class Errors(str, Enum):
    strict = "strict"
    replace = "replace"


class Unknown(str, Enum):
    error = "error"
    skip = "skip"


def _preset_help() -> str:
    sizes = ", ".join(f"{name} {count_parameters(preset(name), 65) / 1e6:.2f}M" for name in PRESETS)
    return f"Model size preset (parameters at a 65-symbol vocabulary: {sizes}). Default {DEFAULT_PRESET}."


# ---------------------------------------------------------------- preprocess

@app.command()
def preprocess(
    inputs: Annotated[list[Path], typer.Argument(help="Text files, or directories of them.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    tokenizer: Annotated[Tokenizer, typer.Option(help="Tokenizer kind.")] = Tokenizer.char,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size for bpe/unigram.", min=1)] = None,
    val_fraction: Annotated[float, typer.Option(help="Last fraction of the text kept for validation.")] = 0.1,
    errors: Annotated[Errors, typer.Option(help="strict: invalid UTF-8 is an error; replace: U+FFFD.")] = Errors.strict,
    keep_crlf: Annotated[bool, typer.Option("--keep-crlf", help="Keep CRLF line endings instead of LF.")] = False,
) -> None:
    """Tokenize text into train.bin/val.bin, the tokenizer files and meta.json."""
    from .data import load_dataset
    from .data import preprocess as run_preprocess

    out_dir = _run(run_preprocess, inputs, out, tokenizer=tokenizer.value, vocab_size=vocab_size,
                   val_fraction=val_fraction, errors=errors.value, newline="keep" if keep_crlf else "lf",
                   progress=sys.stderr.isatty(), warn=_warn)
    dataset = _run(load_dataset, out_dir)
    splits = dataset.meta["splits"]
    print(f"{out_dir}: {dataset.tokenizer.kind} tokenizer, vocab {dataset.tokenizer.vocab_size}, "
          f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens ({dataset.meta['dtype']})")


# ---------------------------------------------------------------- train

_MODEL_KEYS = {"cell", "num_layers", "hidden_size", "embedding_dim", "dropout", "tie_weights"}
_DATA_KEYS = {"tokenizer", "vocab_size", "val_fraction", "errors", "preset"}
_DATA_TYPES = {"tokenizer": str, "vocab_size": int, "val_fraction": (int, float), "errors": str, "preset": str}


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML ({exc})") from None
    except UnicodeDecodeError as exc:  # tomllib reads UTF-8 only
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    flat: dict = {}
    for key, value in data.items():
        if key in ("model", "train", "data") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    train_keys = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(flat) - _MODEL_KEYS - _DATA_KEYS - train_keys)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if "max_time" in flat:
        try:
            flat["max_time"] = parse_duration(flat["max_time"])
        except ConfigError as exc:
            raise ConfigError(f"{path}: max_time: {exc}") from None
    return flat


def _build_configs(file_settings: dict, flags: dict, source: str) -> tuple[ModelConfig, TrainConfig, dict]:
    """Preset, then the config file, then command-line flags (flags win)."""
    settings = {**file_settings, **{k: v for k, v in flags.items() if v is not None}}
    for key, kinds in _DATA_TYPES.items():  # not dataclass fields, so from_dict does not check them
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ConfigError(f"{source}: {key} has the wrong type ({type(value).__name__}: {value!r})")
    name = settings.pop("preset", DEFAULT_PRESET)
    if not isinstance(name, str):
        raise ConfigError(f"{source}: preset must be a name")
    base = preset(name)
    model = {**base.to_dict(), **{k: v for k, v in settings.items() if k in _MODEL_KEYS}}
    data = {k: settings[k] for k in _DATA_KEYS - {"preset"} if k in settings}
    train = {k: v for k, v in settings.items() if k not in _MODEL_KEYS and k not in _DATA_KEYS}
    return (ModelConfig.from_dict(model, source), TrainConfig.from_dict(train, source), data)


@app.command(help=f"""Train a model on text files, a directory of them, or a preprocessed directory.

Stops at --max-steps, --epochs or --max-time, whichever comes first (10 minutes if none is given).
Ctrl-C saves the run; continue it with --resume RUN_DIR. Presets: {", ".join(PRESETS)}.""")
def train(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Text files, directories, or a preprocess directory.",
                                                           show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/NAME-TIME).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings; flags override it.")] = None,
    preset_name: Annotated[Optional[str], typer.Option("--preset", help=_preset_help())] = None,
    cell: Annotated[Optional[Cell], typer.Option(help="Recurrent cell (default gru).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Recurrent layers.")] = None,
    hidden: Annotated[Optional[int], typer.Option(help="Hidden units per layer.")] = None,
    embed: Annotated[Optional[int], typer.Option(help="Embedding size.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout between layers and on input/output.")] = None,
    tie: Annotated[Optional[bool], typer.Option("--tie/--no-tie", help="Tie embedding and output weights.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="BPTT window length.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams per step (per process).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay.")] = None,
    clip: Annotated[Optional[float], typer.Option(help="Gradient clipping global norm (0 = off).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N steps in all.")] = None,
    max_time: Annotated[Optional[str], typer.Option(help="Stop after a time budget: 90s, 10m, 1h30m.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Stop after N passes over the data.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Steps between evaluations.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    device: Annotated[Optional[Device], typer.Option(help="Device.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="auto: bf16 where the hardware has it.")] = None,
    compile_model: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile.")] = None,
    tokenizer: Annotated[Optional[Tokenizer], typer.Option(help="Tokenizer for raw text input.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size for bpe/unigram.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Validation fraction for raw text.")] = None,
    errors: Annotated[Optional[Errors], typer.Option(help="Invalid UTF-8: strict or replace.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory.")] = None,
) -> None:
    from .training import train as run_training

    flags = {
        "cell": cell.value if cell else None, "num_layers": layers, "hidden_size": hidden, "embedding_dim": embed,
        "dropout": dropout, "tie_weights": tie, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
        "warmup_steps": warmup, "weight_decay": weight_decay, "grad_clip": clip, "max_steps": max_steps,
        "max_time": _run(parse_duration, max_time) if max_time is not None else None, "epochs": epochs,
        "eval_every": eval_every, "seed": seed, "device": device.value if device else None,
        "precision": precision.value if precision else None, "compile": compile_model,
        "tokenizer": tokenizer.value if tokenizer else None, "vocab_size": vocab_size, "val_fraction": val_fraction,
        "errors": errors.value if errors else None, "preset": preset_name,
    }
    progress = sys.stderr.isatty() or bool(os.environ.get("TEXTRNN_PROGRESS"))
    if resume is not None:
        if inputs:
            _fail("give either INPUT or --resume RUN_DIR, not both")
        allowed = {"max_steps", "max_time", "epochs", "eval_every", "device"}
        ignored = sorted(k for k, v in flags.items() if v is not None and k not in allowed)
        if ignored:
            _fail(f"--resume continues a run with its own settings; only --max-steps, --max-time, --epochs, "
                  f"--eval-every and --device may change (got {', '.join(ignored)})")
        result = _run(run_training, resume=resume, resume_overrides={k: flags[k] for k in allowed},
                      progress=progress, log=_warn)
    else:
        if not inputs:
            _fail("missing INPUT: give text files, a directory, or a preprocess directory (or --resume RUN_DIR)")
        file_settings = _run(_read_toml, config) if config else {}
        model_config, train_config, data = _run(_build_configs, file_settings, flags, str(config or "options"))
        result = _run(run_training, inputs, out, model_config, train_config, tokenizer=data.get("tokenizer", "char"),
                      vocab_size=data.get("vocab_size"), val_fraction=data.get("val_fraction", 0.1),
                      errors=data.get("errors", "strict"), progress=progress, log=_warn)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    best = f"{result.best_val_bpc:.4f}" if result.best_val_bpc is not None else "-"
    print(f"done: best val bpc {best} (loss {result.best_val_loss:.4f}) after {result.step} steps in "
          f"{format_duration(result.elapsed)} ({result.stop_reason}); run saved in {result.run_dir}", file=sys.stderr)


# ---------------------------------------------------------------- generate

def _newest_run(root: Path = Path("runs")) -> Path:
    runs = [p.parent for p in root.glob("*/config.json")] if root.is_dir() else []
    if not runs:
        raise InputError(f"{root}: no runs found; train one first or pass --checkpoint RUN_DIR")
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime)


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise InputError("give --prompt or --prompt-file, not both")
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise InputError(f"<stdin>: invalid UTF-8 at byte {exc.start}") from None
    if prompt_file is not None:
        from .data import read_chunks

        return "".join(read_chunks(prompt_file))
    return prompt or ""


class _Output:
    """Writes text to stdout as it comes; a closed pipe (``| head``) ends the command quietly."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, text: str) -> None:
        if self.closed:
            return
        if sys.stdout is None:  # started with file descriptor 1 closed (``textrnn generate >&-``)
            _fail("standard output is closed; nothing can be written", 1)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            self._silence()
        except OSError as exc:  # a full disk or device (``> /dev/full``): say so, no traceback
            self._silence()
            _fail(f"standard output: cannot write ({exc.strerror or exc})", 1)

    @staticmethod
    def _silence() -> None:
        """Point stdout at /dev/null, so that the interpreter's final flush of leftover text cannot fail again."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (tests capture it)
            pass


@app.command()
def generate(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Run directory (default: newest under ./runs).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue; '-' reads stdin.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from a file.")] = None,
    length: Annotated[int, typer.Option("--length", "-n", help="Tokens to generate (characters for char models).")] = 500,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy; higher = more random.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1.0 = off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1.0 = off).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed: the same seed gives the same text.")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated as one batch.")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option(help="End a sample after this text (kept); repeatable.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is sampled.")] = True,
    unknown: Annotated[Unknown, typer.Option(help="Prompt characters outside the vocabulary: error or skip.")] = Unknown.error,
    device: Annotated[Device, typer.Option(help="Device.")] = Device.auto,
    precision: Annotated[SamplePrecision, typer.Option(
        help="Sampling weights: auto is fp16 on x86 CPUs for models of 2M+ parameters (faster, logits "
             "within ~1e-3), fp32 otherwise.")
    ] = SamplePrecision.auto,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Prompt loop: type a prompt, get text.")] = False,
) -> None:
    """Generate text from a trained run, streamed to stdout."""
    from .sampling import Sampler

    run_dir = checkpoint if checkpoint is not None else _run(_newest_run)
    for name, value in (("length", length), ("num-samples", num_samples)):
        if value < (0 if name == "length" else 1):
            _fail(f"--{name} must be {'>= 0' if name == 'length' else '>= 1'}, got {value}")
    from .sampling import _check_sampling_args

    _run(_check_sampling_args, temperature, top_k, top_p, repetition_penalty)
    text = _run(_read_prompt, prompt, prompt_file)
    sampler = _run(Sampler.from_checkpoint, run_dir, device.value, precision.value)
    if unknown == Unknown.skip and sampler.tokenizer.kind == "char":
        missing = sampler.tokenizer.unknown_chars(text)
        if missing:
            from .tokenizers import describe_chars

            _warn(f"warning: prompt: dropped {len(missing)} character(s) not in the vocabulary: {describe_chars(missing)}")
    options = dict(length=length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                   repetition_penalty=repetition_penalty, unknown=unknown.value)
    out = _Output()
    if interactive:
        _interactive(sampler, options, out)
        return
    _emit(sampler, text, options, num_samples, stream, out)


def _emit(sampler, prompt: str, options: dict, num_samples: int, stream: bool, out: _Output) -> None:
    if num_samples == 1 and stream:
        pieces = _run(sampler.stream, prompt, **options)  # checks the prompt and settings, before any output
        first = _run(next, pieces, "")
        out.write(prompt + first)
        for piece in pieces:
            out.write(piece)
            if out.closed:
                return
        out.write("\n")
        return
    samples = _run(sampler.generate, prompt, num_samples=num_samples, **options)
    samples = [samples] if isinstance(samples, str) else samples
    for index, sample in enumerate(samples):
        if num_samples > 1:
            out.write(f"{'-' * 20} sample {index + 1} of {num_samples} {'-' * 20}\n")
        out.write(prompt + sample + "\n")


def _interactive(sampler, options: dict, out: _Output) -> None:
    print("type a prompt and press Enter (an empty line samples from scratch); Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)  # stdout holds only generated text
            line = input()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        try:
            for piece in sampler.stream(line, **options):
                out.write(piece)
        except TextRNNError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            pass
        out.write("\n")


# ---------------------------------------------------------------- evaluate, info, download

@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    file: Annotated[Path, typer.Argument(help="Text file to score.", show_default=False)],
    device: Annotated[Device, typer.Option(help="Device.")] = Device.auto,
    errors: Annotated[Errors, typer.Option(help="Invalid UTF-8: strict or replace.")] = Errors.strict,
) -> None:
    """Loss per token, bits per character and perplexity of a text file under a run's best weights.

    Characters outside a char model's vocabulary are read as its unknown id (the state runs on)
    but not scored; their count is reported.
    """
    from .evaluation import evaluate_file

    result = _run(evaluate_file, run_dir, file, device=device.value, errors=errors.value, progress=sys.stderr.isatty())
    print(f"{file}: loss {result.loss:.4f} nats/token, {result.bpc:.4f} bits/char, perplexity "
          f"{result.perplexity:.3f} ({result.tokens:,} tokens scored)")
    if result.unknown:
        print(f"{file}: {result.unknown:,} character(s) outside the vocabulary were not scored", file=sys.stderr)


@app.command()
def info(run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)]) -> None:
    """Config, parameter count and training summary of a run."""
    from . import checkpoint as ckpt

    config = _run(ckpt.run_config, run_dir)
    model = _run(ModelConfig.from_dict, config["model"], str(run_dir / ckpt.CONFIG_FILE))
    train = config["train"]
    rows = ckpt.read_metrics(run_dir)
    evals = [r for r in rows if r.get("kind") == "eval"]
    trains = [r for r in rows if r.get("kind") == "train"]
    print(f"run        {run_dir}")
    print(f"model      {model.cell} {model.num_layers}x{model.hidden_size}, embedding {model.embedding_dim}, "
          f"dropout {model.dropout}, tied {model.tie_weights}")
    print(f"parameters {count_parameters(model):,}")
    print(f"tokenizer  {config['tokenizer'].get('kind')} (vocab {config['tokenizer'].get('vocab_size')})")
    print("training   " + ", ".join(f"{k}={v}" for k, v in train.items() if v is not None))
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        last = trains[-1] if trains else evals[-1]
        speed = f", {last['chars_per_sec']:,.0f} chars/s" if "chars_per_sec" in last else ""
        print(f"progress   step {max(r['step'] for r in rows)}, {format_duration(last['elapsed'])} trained{speed}")
        print(f"best val   {best['val_loss']:.4f} nats/token, {best['val_bpc']:.4f} bpc at step {best['step']}")
    else:
        print("progress   no evaluation yet")


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="Dataset name (see data/README.md).", show_default=False)],
    dir: Annotated[Optional[Path], typer.Option("--dir", help="Where to put it (default: the cache directory).")] = None,
) -> None:
    """Fetch a named dataset and check its sha256."""
    from .datasets import DATASETS, download as fetch

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=DATASETS[name].size if name in DATASETS else None, unit="B", unit_scale=True, desc=name)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    path = _run(fetch, name, dir, progress=progress)
    if bar is not None:
        bar.close()
    print(path)


# ---------------------------------------------------------------- serve

@app.command()
def serve(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories; each is served under its name.",
                                                   show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        help="Require 'Authorization: Bearer KEY' on /v1/* (or set TEXTRNN_API_KEY).",
        envvar="TEXTRNN_API_KEY", show_envvar=False)] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per completion.", min=1)] = 2000,
    max_prompt_chars: Annotated[int, typer.Option(help="Most characters per prompt.", min=0)] = 8000,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (larger: 413).", min=1)] = 65536,
    max_n: Annotated[int, typer.Option(help="Most completions per prompt (n).", min=1)] = 16,
    max_streams: Annotated[int, typer.Option(help="Streams at once, all requests (more: 429).", min=1)] = 64,
    chunk_ms: Annotated[float, typer.Option(help="Send a stream's text at most this often (ms).", min=0)] = 20,
    threads: Annotated[int, typer.Option(help="Torch threads for sampling (0: torch's default).", min=0)] = 1,
    device: Annotated[Device, typer.Option(help="Device.")] = Device.auto,
) -> None:
    """Serve runs over an OpenAI-compatible HTTP API (/v1/completions), with a playground at /.

    Needs the serve extra: pip install 'textrnn[serve]'. Ctrl-C or SIGTERM stops it.
    """
    import signal

    from .serving import serve as run_server
    from .serving.app import Limits

    limits = Limits(max_tokens, max_prompt_chars, max_body_bytes, max_n, max_streams)
    stopped_by = _run(run_server, run_dirs, host, port, api_key or None, limits, device.value, chunk_ms / 1000,
                      threads or None, log=lambda message: print(message, file=sys.stderr, flush=True))
    print("stopped", file=sys.stderr)
    if stopped_by == signal.SIGINT:
        sys.exit(130)  # after Ctrl-C, as every command


def main() -> None:
    app()
