"""The ``textrnn`` command line: each command parses, calls one library function, and prints.

This is the only module that writes to the terminal or exits: ``TextRNNError`` becomes one line,
``error: <what>: <problem>``, and exit code 2 (1 for a failed run, 130 after Ctrl-C).
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import (AUTO_WIDE, AUTO_WIDE_FROM, AUTO_WIDE_TEXT, CELLS, DEVICES, PRECISIONS, PRESETS,
                     RESUME_OVERRIDES, TOKENIZERS, ModelConfig, TrainConfig, build_configs, count_parameters,
                     format_duration, help_text, parse_duration, preset, read_toml_settings)
from .errors import InputError, TextRNNError

try:  # typer ships its own copy of click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer that depends on click
    from click.exceptions import ClickException as _ClickException


class _App(typer.Typer):
    """A Typer app whose usage errors are one line (``error: ...``, exit 2), like our own errors."""

    def __call__(self, *args, **kwargs):
        import warnings

        command = typer.main.get_command(self)
        try:
            with warnings.catch_warnings():  # a library warning is one line on stderr, like every other message
                warnings.showwarning = lambda message, *rest, **more: print(f"note: {message}", file=sys.stderr)
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
           context_settings={"help_option_names": ["-h", "--help"]}, add_completion=True,
           pretty_exceptions_enable=False, rich_markup_mode=None, no_args_is_help=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"textrnn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Character-level RNN language models: preprocess text, train, generate, evaluate, export."""


_PROCESS_START: float | None = None  # set by main(): the app run as its own process, not called in-process


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
        if exc.exit_code == 130:  # stopped on request, with what it had saved: news, not an error
            print(str(exc), file=sys.stderr, flush=True)
            sys.exit(130)
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except MemoryError:
        _fail("out of memory; try a smaller model, --batch-size or input", 1)
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):  # torch's CPU allocator says so instead of MemoryError
            raise
        _fail("out of memory; try a smaller model, --batch-size or input", 1)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice type from one of config.py's tuples of valid values."""
    return Enum(name, {value: value for value in values}, type=str)


Tokenizer = _choices("Tokenizer", TOKENIZERS)
Cell = _choices("Cell", CELLS)
Device = _choices("Device", DEVICES)
Precision = _choices("Precision", PRECISIONS)


class SamplePrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Engine(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"


class Weights(str, Enum):
    best = "best"
    last = "last"


class ExportFormat(str, Enum):
    onnx = "onnx"
    web = "web"


class ExportPrecision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


class WebRuntime(str, Enum):
    bundled = "bundled"
    cdn = "cdn"


class Errors(str, Enum):
    strict = "strict"
    replace = "replace"


class Unknown(str, Enum):
    error = "error"
    skip = "skip"


def _preset_help() -> str:
    sizes = ", ".join(f"{name} {count_parameters(preset(name), 65) / 1e6:.2f}M" for name in PRESETS)
    wide = count_parameters(preset("auto", AUTO_WIDE_FROM), 65) / 1e6
    return (f"Model size preset (parameters at a 65-symbol vocabulary: {sizes}). Default auto: small, or, for a "
            f"--max-time of {format_duration(AUTO_WIDE_FROM)} or more, a wider 2x{AUTO_WIDE['hidden_size']} "
            f"({wide:.2f}M, dropout {AUTO_WIDE['dropout']}), which a corpus of {AUTO_WIDE_TEXT[1] / 1e6:g}M training "
            f"tokens or more gets from {format_duration(AUTO_WIDE_TEXT[0])}; once the plan is known, auto raises the "
            f"dropout (and turns on weight drop) for a corpus small enough to memorise, unless they are given.")


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

def _model_help(name: str) -> str:
    return help_text(ModelConfig, name)


def _train_help(name: str) -> str:
    return help_text(TrainConfig, name)


@app.command(help=f"""Train a model on text files, a directory of them, or a preprocessed directory.

Stops at --max-steps, --epochs or --max-time, whichever comes first (a 10-minute budget if none
is given). A time budget is wall time for the whole run, final evaluation and save included
(preprocessing raw text is reported apart): after a short calibration it becomes a planned
number of steps, which the learning-rate schedule and the evaluations follow. Ctrl-C saves the
run; continue it with --resume RUN_DIR, or train a finished one again with --replay RUN_DIR.
Presets: auto (the default: sized for the budget, its dropout fitted to the corpus),
{", ".join(PRESETS)}.""")
def train(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Text files, directories, or a preprocess directory.",
                                                           show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory [default: runs/NAME-TIME].")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of settings; flags override it.")] = None,
    preset_name: Annotated[Optional[str], typer.Option("--preset", help=_preset_help())] = None,
    cell: Annotated[Optional[Cell], typer.Option(help=_model_help("cell"))] = None,
    layers: Annotated[Optional[int], typer.Option(help=_model_help("num_layers"))] = None,
    hidden: Annotated[Optional[int], typer.Option(help=_model_help("hidden_size"))] = None,
    embed: Annotated[Optional[int], typer.Option(help=_model_help("embedding_dim"))] = None,
    dropout: Annotated[Optional[float], typer.Option(help=_model_help("dropout"))] = None,
    weight_drop: Annotated[Optional[float], typer.Option(help=_model_help("weight_drop"))] = None,
    tie: Annotated[Optional[bool], typer.Option("--tie/--no-tie", help=_model_help("tie_weights"))] = None,
    seq_len: Annotated[Optional[int], typer.Option(help=_train_help("seq_len"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_train_help("batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_train_help("lr"))] = None,
    warmup: Annotated[Optional[int], typer.Option(help=_train_help("warmup_steps"))] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=_train_help("weight_decay"))] = None,
    clip: Annotated[Optional[float], typer.Option(help=_train_help("grad_clip"))] = None,
    ema: Annotated[Optional[float], typer.Option(help=_train_help("ema"))] = None,
    max_steps: Annotated[Optional[int], typer.Option(help=_train_help("max_steps"))] = None,
    max_time: Annotated[Optional[str], typer.Option(help=_train_help("max_time"))] = None,
    epochs: Annotated[Optional[float], typer.Option(help=_train_help("epochs"))] = None,
    eval_every: Annotated[Optional[int], typer.Option(help=_train_help("eval_every"))] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help=_train_help("eval_tokens"))] = None,
    sample_length: Annotated[Optional[int], typer.Option(help=_train_help("sample_length"))] = None,
    sample_prompt: Annotated[Optional[str], typer.Option(help=_train_help("sample_prompt"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_train_help("seed"))] = None,
    threads: Annotated[Optional[int], typer.Option(help=_train_help("threads"))] = None,
    device: Annotated[Optional[Device], typer.Option(help=_train_help("device"))] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=_train_help("precision"))] = None,
    compile_model: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help=_train_help("compile"))] = None,
    tokenizer: Annotated[Optional[Tokenizer], typer.Option(help="Tokenizer for raw text input [default: char].")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size for bpe/unigram.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Validation fraction for raw text [default: 0.1].")] = None,
    errors: Annotated[Optional[Errors], typer.Option(help="Invalid UTF-8: strict or replace [default: strict].")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Fine-tune: a new run on INPUT that starts from this run's best weights, model and tokenizer "
             "(a char vocabulary grows by the new text's characters).")] = None,
    replay: Annotated[Optional[Path], typer.Option(
        help="Train this finished run again, bit for bit on the same machine and threads: its data, settings "
             "and recorded plans (a time budget's replans included), into --out [default: RUN_DIR-replay].")] = None,
) -> None:
    started = _PROCESS_START if _PROCESS_START is not None else time.perf_counter()  # when the budget began
    flags = {
        "cell": _value(cell), "num_layers": layers, "hidden_size": hidden, "embedding_dim": embed,
        "dropout": dropout, "weight_drop": weight_drop, "tie_weights": tie, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
        "warmup_steps": warmup, "weight_decay": weight_decay, "grad_clip": clip, "ema": ema, "max_steps": max_steps,
        "max_time": _run(parse_duration, max_time) if max_time is not None else None, "epochs": epochs,
        "eval_every": eval_every, "eval_tokens": eval_tokens, "sample_length": sample_length,
        "sample_prompt": sample_prompt, "seed": seed, "threads": threads,
        "device": _value(device), "precision": _value(precision), "compile": compile_model,
        "tokenizer": _value(tokenizer), "vocab_size": vocab_size, "val_fraction": val_fraction,
        "errors": _value(errors), "preset": preset_name,
    }
    progress = sys.stderr.isatty() or bool(os.environ.get("TEXTRNN_PROGRESS"))
    if replay is not None:
        given = sorted(k for k, v in flags.items() if v is not None)
        if inputs or resume is not None or init_from is not None or config is not None or given:
            _fail("--replay trains a run again with its own data and settings; give it alone (with --out)")
        from .training import train as run_training

        result = _run(run_training, out_dir=out, replay=replay, progress=progress, log=_warn, started=started)
    elif resume is not None:
        if init_from is not None:
            _fail("--init-from starts a new run from a trained one and --resume continues a run; give one")
        if inputs:
            _fail("give either INPUT or --resume RUN_DIR, not both")
        result = _resume_run(resume, flags, progress, started)
    else:
        if not inputs:
            _fail("missing INPUT: give text files, a directory, or a preprocess directory (or --resume RUN_DIR)")
        result = _new_run(inputs, out, config, init_from, flags, progress, started)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _report_run(result)


def _resume_run(resume: Path, flags: dict, progress: bool, started: float):
    """``train --resume``: the run's own settings, less the few a resumed run may change."""
    from .training import train as run_training

    ignored = sorted(k for k, v in flags.items() if v is not None and k not in RESUME_OVERRIDES)
    if ignored:
        _fail(f"--resume continues a run with its own settings; only "
              f"{', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_OVERRIDES))} may change "
              f"(got {', '.join(ignored)})")
    return _run(run_training, resume=resume, resume_overrides={k: flags[k] for k in RESUME_OVERRIDES},
                progress=progress, log=_warn, started=started)


def _new_run(inputs: list[Path], out: Optional[Path], config: Optional[Path], init_from: Optional[Path], flags: dict,
             progress: bool, started: float):
    """A new run (or a fine-tune): settings from the TOML file, then the flags over them."""
    from .training import train as run_training

    file_settings = _run(read_toml_settings, config) if config else {}
    model_config, train_config, data = _run(build_configs, file_settings, flags, str(config or "options"))
    tokenizer_kind = data["tokenizer"]
    init_from = init_from or data["init_from"]
    if init_from is not None:  # the model and tokenizer are the base's, unless given (then they must agree)
        given = {**file_settings, **{k: v for k, v in flags.items() if v is not None}}
        model_config = _run(_finetune_model, Path(init_from), given)
        tokenizer_kind = given.get("tokenizer")
    return _run(run_training, inputs, out, model_config, train_config, init_from=init_from,
                tokenizer=tokenizer_kind, vocab_size=data["vocab_size"], val_fraction=data["val_fraction"],
                errors=data["errors"], progress=progress, log=_warn, started=started, fit=data["fit"])


def _report_run(result) -> None:
    best = f"{result.best_val_bpc:.4f}" if result.best_val_bpc is not None else "-"
    preprocessing = f", preprocessing {format_duration(result.preprocess_time)} apart" if result.preprocess_time >= 0.5 else ""
    print(f"done: best val bpc {best} (loss {result.best_val_loss:.4f}) after {result.step} steps in "
          f"{format_duration(result.wall_time)}{preprocessing} ({result.stop_reason}); run saved in {result.run_dir}",
          file=sys.stderr)


def _finetune_model(base_dir: Path, given: dict) -> ModelConfig:
    """The base run's model, with the regularisation of ``given``; shape settings that contradict it are refused."""
    from . import checkpoint as ckpt
    from .config import finetune_model_config

    base = ckpt.run_config(base_dir)
    return finetune_model_config(ModelConfig.from_dict(base["model"], str(base_dir / ckpt.CONFIG_FILE)), given,
                                 str(base_dir))


def _value(choice: Optional[Enum]) -> Optional[str]:
    return choice.value if choice is not None else None


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
    weights: Annotated[Weights, typer.Option(help="best: the weights with the lowest validation loss; last: "
                                                  "those of last/, where training stopped.")] = Weights.best,
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
             "within ~1e-3), fp32 otherwise; int8 runs on onnxruntime, fastest for large models at the "
             "cost of text that differs from fp32's for a seed (see README).")
    ] = SamplePrecision.auto,
    engine: Annotated[Engine, typer.Option(
        help="Per-token step: torch, onnxruntime (pip install 'textrnn[onnx]'), or auto: onnxruntime where "
             "installed and faster here for this model and batch.")] = Engine.auto,
    interactive: Annotated[bool, typer.Option(
        "--interactive", "-i", help="Prompt loop: type a prompt, get one sample (not with --prompt, "
                                    "--prompt-file or --num-samples).")] = False,
    adapt: Annotated[Optional[Path], typer.Option(
        help="Adapt a copy of the weights to this text file first (dynamic evaluation's update), so that "
             "samples follow its style; the run's files never change.")] = None,
) -> None:
    """Generate text from a trained run, streamed to stdout.

    The output is the prompt followed by its continuation; a sample that ends at a --stop string
    ends with it, and other samples end with a newline.
    """
    from .sampling import Sampler, UnknownCharactersError

    if interactive:  # the prompts come from the terminal, one sample each
        given = [flag for flag, used in (("--prompt", prompt is not None), ("--prompt-file", prompt_file is not None),
                                         ("--num-samples", num_samples != 1)) if used]
        if given:
            _fail(f"--interactive reads each prompt from standard input and prints one sample; "
                  f"it does not take {' or '.join(given)}")
    run_dir = checkpoint if checkpoint is not None else _run(_newest_run)
    for name, value in (("length", length), ("num-samples", num_samples)):
        if value < (0 if name == "length" else 1):
            _fail(f"--{name} must be {'>= 0' if name == 'length' else '>= 1'}, got {value}")
    from .sampling import _check_sampling_args

    _run(_check_sampling_args, temperature, top_k, top_p, repetition_penalty)
    text = _run(_read_prompt, prompt, prompt_file)
    sampler = _run(Sampler.from_checkpoint, run_dir, device.value, precision.value, engine.value, weights.value)
    if adapt is not None:
        from .dynamic import adapt_to_file

        sampler = _run(adapt_to_file, sampler, adapt, run_dir)
    try:
        sampler.encode_prompt(text, unknown.value)
    except UnknownCharactersError as exc:
        _fail(f"prompt: {exc.detail}; pass --unknown skip to drop them")
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


def _ending(text: str, stops: list[str] | None) -> str:
    """The newline after a sample, unless it ended at a stop string (kept as it is, and no more)."""
    return "" if any(text.endswith(s) for s in stops or ()) else "\n"


def _emit(sampler, prompt: str, options: dict, num_samples: int, stream: bool, out: _Output) -> None:
    stops = options.get("stop")
    if num_samples == 1 and stream:
        pieces = _run(sampler.stream, prompt, **options)  # checks the prompt and settings, before any output
        first = _run(next, pieces, "")
        out.write(prompt + first)
        tail = first[-64:]
        for piece in pieces:
            out.write(piece)
            tail = (tail + piece)[-max([64] + [len(s) for s in stops or ()]):]
            if out.closed:
                return
        out.write(_ending(tail, stops))
        return
    samples = _run(sampler.generate, prompt, num_samples=num_samples, **options)
    samples = [samples] if isinstance(samples, str) else samples
    for index, sample in enumerate(samples):
        if num_samples > 1:
            out.write(f"{'-' * 20} sample {index + 1} of {num_samples} {'-' * 20}\n")
        out.write(prompt + sample + _ending(sample, stops))


def _interactive(sampler, options: dict, out: _Output) -> None:
    print("type a prompt and press Enter (an empty line samples from scratch); Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)  # stdout holds only generated text
            line = input()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        text = ""
        try:
            for piece in sampler.stream(line, **options):
                out.write(piece)
                text += piece
        except TextRNNError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            pass
        out.write(_ending(text, options.get("stop")))


# ---------------------------------------------------------------- evaluate, info, download

@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    file: Annotated[Path, typer.Argument(help="Text file to score.", show_default=False)],
    device: Annotated[Device, typer.Option(help="Device.")] = Device.auto,
    errors: Annotated[Errors, typer.Option(help="Invalid UTF-8: strict or replace.")] = Errors.strict,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Also score it with dynamic evaluation: a copy of the "
                                          "weights adapts to the text as it is read (see README).")] = False,
    lr: Annotated[Optional[float], typer.Option(help="--dynamic: step size (a weight moves by lr x its gradient / "
                                                     "its RMS gradient in training) [default: 0.0003].",
                                                show_default=False)] = None,
    decay: Annotated[Optional[float], typer.Option(help="--dynamic: share of the way back to the trained weights "
                                                        "per segment [default: 0.0005].", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="--dynamic: tokens per segment, one step each "
                                                        "[default: 20].", show_default=False)] = None,
) -> None:
    """Loss per token, bits per character and perplexity of a text file under a run's best weights.

    Characters outside a char model's vocabulary are read as its unknown id (the state runs on)
    but not scored; their count is reported. With --dynamic, the static and dynamic numbers side by
    side; the run's files never change.
    """
    from .evaluation import evaluate_file

    progress = sys.stderr.isatty()
    settings = {k: v for k, v in (("lr", lr), ("decay", decay), ("seq_len", seq_len)) if v is not None}
    if dynamic:
        _evaluate_dynamic(run_dir, file, settings, device.value, errors.value, progress)
        return
    if settings:
        _fail(f"{', '.join('--' + k.replace('_', '-') for k in settings)}: only with --dynamic")
    result = _run(evaluate_file, run_dir, file, device=device.value, errors=errors.value, progress=progress)
    print(f"{file}: loss {result.loss:.4f} nats/token, {result.bpc:.4f} bits/char, perplexity "
          f"{result.perplexity:.3f} ({result.tokens:,} tokens scored)")
    if result.unknown:
        print(f"{file}: {result.unknown:,} character(s) outside the vocabulary were not scored", file=sys.stderr)


def _evaluate_dynamic(run_dir: Path, file: Path, settings: dict, device: str, errors: str, progress: bool) -> None:
    from .dynamic import DynamicConfig, evaluate_dynamic

    config = _run(DynamicConfig, **settings)
    result = _run(evaluate_dynamic, run_dir, file, config, device=device, errors=errors, progress=progress)
    for name, row in (("static ", result.static), ("dynamic", result.dynamic)):
        print(f"{file}: {name} loss {row.loss:.4f} nats/token, {row.bpc:.4f} bits/char, perplexity {row.perplexity:.3f}")
    gain = result.static.loss - result.dynamic.loss
    seconds = result.seconds
    print(f"{file}: dynamic {abs(gain):.4f} nats/token {'lower' if gain >= 0 else 'higher'} "
          f"({result.dynamic.tokens:,} tokens scored; lr "
          f"{config.lr:g}, decay {config.decay:g}, {config.seq_len}-token segments; gradient statistics on "
          f"{result.statistics}; {seconds['static']:.1f} s static, {seconds['statistics']:.1f} s statistics, "
          f"{seconds['dynamic']:.1f} s dynamic)")
    if result.static.unknown:
        print(f"{file}: {result.static.unknown:,} character(s) outside the vocabulary were not scored", file=sys.stderr)


@app.command()
def inspect(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    file: Annotated[Path, typer.Argument(help="Text file to inspect (UTF-8).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="The HTML report [default: FILE with .inspect.html].",
                                                show_default=False)] = None,
    state_chars: Annotated[int, typer.Option(help="Characters whose every unit's state the page holds.")] = 5000,
    device: Annotated[Device, typer.Option(help="Device.")] = Device.auto,
) -> None:
    """Write one self-contained HTML page that shows what the model learned on FILE.

    The text coloured by surprisal (top-5 predictions on hover), any unit's hidden or cell state,
    a gallery of the units that best track quotes, brackets, line position, indentation and word
    starts, bits per character by character class, and the hardest passages.
    """
    from .inspect import inspect_file

    target, summary = _run(inspect_file, run_dir, file, out, device=device.value, state_chars=state_chars)
    print(f"{target}: {summary['chars']:,} characters, {summary['bpc']:.4f} bits/char")


@app.command()
def info(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    verify: Annotated[bool, typer.Option("--verify", help="Also check the training data against the full sha256 "
                                                          "kept in its meta.json (reads all of it).")] = False,
) -> None:
    """Config, parameter count, training summary and latest sample of a run."""
    from . import checkpoint as ckpt

    config = _run(ckpt.run_config, run_dir)
    model = _run(ModelConfig.from_dict, config["model"], str(run_dir / ckpt.CONFIG_FILE))
    train = config["train"]
    rows = ckpt.read_metrics(run_dir)
    evals = [r for r in rows if r.get("kind") == "eval"]
    trains = [r for r in rows if r.get("kind") == "train"]
    print(f"run        {run_dir}")
    print(f"model      {model.cell} {model.num_layers}x{model.hidden_size}, embedding {model.embedding_dim}, "
          f"dropout {model.dropout}" + (f", weight drop {model.weight_drop}" if model.weight_drop else "")
          + f", tied {model.tie_weights}")
    auto = config.get("auto")
    if isinstance(auto, dict) and isinstance(auto.get("why"), str):
        print(f"auto       {auto['why'].removeprefix('auto: ')}")
    print(f"parameters {count_parameters(model):,}")
    print(f"tokenizer  {config['tokenizer'].get('kind')} (vocab {config['tokenizer'].get('vocab_size')})")
    base = config.get("init_from")
    if isinstance(base, dict):
        loss = f", val loss {base['val_loss']:.4f}" if isinstance(base.get("val_loss"), (int, float)) else ""
        added = (f"; {len(base['added_chars'])} character(s) added to its vocabulary"
                 if isinstance(base.get("added_chars"), str) else "")
        print(f"base       fine-tuned from {base.get('path')} (step {base.get('step')}{loss}){added}")
    print("training   " + ", ".join(f"{k}={v}" for k, v in train.items() if v is not None))
    state = _last_state(run_dir)
    if state:
        planned = f" of {state['plan']:,} planned" if state.get("plan") else ""
        status = {"finished": f"finished: {state.get('stop_reason', '')}",
                  "interrupted": f"interrupted at step {state['step']}; continue with: textrnn train --resume "
                                 f"{run_dir}"}.get(state.get("status"), "stopped while training (killed)")
        speed = f", {trains[-1]['chars_per_sec']:,.0f} chars/s" if trains and "chars_per_sec" in trains[-1] else ""
        threads = f", {state['threads']} thread{'s' if state['threads'] > 1 else ''}" if state.get("threads") else ""
        print(f"progress   step {state['step']:,}{planned}, {format_duration(state['elapsed'])} trained{speed}{threads}")
        print(f"status     {status}")
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        print(f"best val   {best['val_loss']:.4f} nats/token, {best['val_bpc']:.4f} bpc at step {best['step']}")
    else:
        print("best val   no evaluation yet")
    samples = ckpt.read_metrics(run_dir, ckpt.SAMPLES_FILE)
    if samples and isinstance(samples[-1].get("text"), str):
        latest = samples[-1]
        print(f"sample     at step {latest.get('step')} (temperature {latest.get('temperature')}):")
        print(textwrap.indent(str(latest.get("prompt", "")) + latest["text"], "  | ", lambda line: True))
    if verify:
        print(f"data       {_run(_verify_data, run_dir, config)}")


def _last_state(run_dir: Path) -> dict:
    """``last/state.json`` of a run, or {} when it has none (a run never saved, or damaged)."""
    from . import checkpoint as ckpt

    try:
        return ckpt.read_json(ckpt.last_dir(run_dir) / ckpt.STATE_FILE, "checkpoint")
    except TextRNNError:
        return {}


def _verify_data(run_dir: Path, config: dict) -> str:
    """Check train.bin and val.bin against the sha256 that preprocess kept in meta.json."""
    from . import checkpoint as ckpt
    from .fileio import file_sha256

    data_dir = run_dir / config.get("data", {}).get("path", "data")
    meta = ckpt.read_json(data_dir / "meta.json", "preprocess directory")
    checked = []
    for split, info in meta.get("splits", {}).items():
        if "sha256" not in info:
            raise InputError(f"{data_dir / 'meta.json'}: no sha256 of {split}.bin kept (made by an older textrnn)")
        if file_sha256(data_dir / f"{split}.bin") != info["sha256"]:
            raise InputError(f"{data_dir / (split + '.bin')}: sha256 mismatch; the training data changed")
        checked.append(f"{split}.bin")
    return f"{', '.join(checked)} match the sha256 in {data_dir / 'meta.json'}"


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


# ---------------------------------------------------------------- export

@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (new, empty, or a previous export).")],
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="onnx: the step graph, tokenizer and config; web: those and a page with textrnn.js.")
    ] = ExportFormat.onnx,
    precision: Annotated[ExportPrecision, typer.Option(
        help="int8: int8 recurrent weights, a 3-4x smaller file (checked against fp32's probabilities).")
    ] = ExportPrecision.fp32,
    runtime: Annotated[Optional[WebRuntime], typer.Option(
        help="Web only. bundled: copy onnxruntime-web into the folder (works offline); cdn: load it from jsDelivr.",
        show_default="bundled")] = None,
) -> None:
    """Export a run's one-token step (model.onnx), tokenizer and config, checked against PyTorch.

    --format web also writes textrnn.js and index.html: a page that samples the model in the
    browser, from any static file server (python -m http.server -d DIR).
    """
    from .export import export_run

    if runtime is not None and format != ExportFormat.web:
        _fail("--runtime applies to --format web only", 2)
    runtime = runtime or WebRuntime.bundled
    path = _run(export_run, run_dir, out, format.value, precision.value, runtime.value)
    made = "model.onnx, tokenizer and config.json"
    if format == ExportFormat.web:
        made += ", textrnn.js, index.html" + (" and onnxruntime-web" if runtime == WebRuntime.bundled else "")
    print(f"{path}: {made} ({precision.value}, checked with onnxruntime)")


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
    max_logprobs: Annotated[int, typer.Option(help="Most top tokens a request may ask for (logprobs).", min=0)] = 5,
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

    limits = Limits(max_tokens, max_prompt_chars, max_body_bytes, max_n, max_streams, max_logprobs)
    stopped_by = _run(run_server, run_dirs, host, port, api_key or None, limits, device.value, chunk_ms / 1000,
                      threads or None, log=lambda message: print(message, file=sys.stderr, flush=True))
    print("stopped", file=sys.stderr)
    if stopped_by == signal.SIGINT:
        sys.exit(130)  # after Ctrl-C, as every command


def main() -> None:
    """The ``textrnn`` program: a time budget counts from the start of this process (imports included)."""
    from .runtime import process_age

    global _PROCESS_START
    _PROCESS_START = time.perf_counter() - process_age()
    app(prog_name="textrnn")
