"""``textrnn generate`` and ``textrnn evaluate``: every option, every bad value, pipes, and
agreement of ``evaluate`` with the trainer's own validation numbers.

One tiny run is trained once per session. Most commands run in-process through the real entry
point (``textrnn.cli.app``, so errors are formatted exactly as for a user); the few that need
a real process (a closed pipe, standard input of a subprocess) go through ``run_cli``.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from textrnn.checkpoint import read_metrics
from textrnn.cli import app
from textrnn.config import ModelConfig, TrainConfig
from textrnn.evaluation import evaluate_file

LINES = ["to be or not to be, that is the question.", "a rose by any other name would smell as sweet.",
         "all the world is a stage.", "the lady doth protest too much, methinks."]
VAL_FRACTION = 0.1


def corpus_text() -> str:
    return "".join(f"{LINES[(n * 7) % 4]} {n % 10}\n" for n in range(400))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A tiny char-level run (1x32 LSTM, 30 steps), trained once for the whole session."""
    from textrnn.training import train

    root = tmp_path_factory.mktemp("generate-run")
    (root / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    result = train([root / "corpus.txt"], root / "runs" / "tiny", ModelConfig(num_layers=1, hidden_size=32,
                                                                              embedding_dim=16),
                   TrainConfig(max_steps=30, batch_size=8, seq_len=32, eval_every=30, lr=1e-2, warmup_steps=3, precision="fp32",
                               device="cpu"), val_fraction=VAL_FRACTION)
    return result.run_dir


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``textrnn ARGS`` in this process through the real entry point; returns exit code and output."""

    def invoke(*args, stdin: str | None = None, cwd: Path | None = None) -> Result:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode("utf-8")), "utf-8"))
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            app([str(a) for a in args])
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return Result(0 if code is None else code, out, err)

    return invoke


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------- generate: options

def test_generate_streams_the_prompt_and_its_continuation(cli, run_dir):
    result = cli("generate", "-c", run_dir, "--prompt", "to be", "--length", 50, "--seed", 1)
    assert result.code == 0 and "Traceback" not in result.err
    assert result.out.startswith("to be") and result.out.endswith("\n")
    assert len(result.out) == len("to be") + 50 + 1
    assert cli("generate", "-c", run_dir, "-p", "to be", "-n", 50, "--seed", 1).out == result.out
    assert cli("generate", "-c", run_dir, "-p", "to be", "-n", 50, "--seed", 2).out != result.out


def test_generate_matches_the_python_api(cli, run_dir):
    from textrnn import Sampler

    options = dict(length=40, temperature=0.7, top_k=5, top_p=0.9, seed=3, repetition_penalty=1.2)
    text = Sampler.from_checkpoint(run_dir, device="cpu").generate("a rose", **options)
    result = cli("generate", "-c", run_dir, "-p", "a rose", "-n", 40, "-t", 0.7, "--top-k", 5, "--top-p", 0.9,
                 "--seed", 3, "--repetition-penalty", 1.2, "--device", "cpu")
    assert result.code == 0 and result.out == "a rose" + text + "\n"


def test_temperature_zero_is_greedy_without_a_seed(cli, run_dir):
    first = cli("generate", "-c", run_dir, "-p", "all", "-n", 30, "--temperature", 0)
    assert first.code == 0 and cli("generate", "-c", run_dir, "-p", "all", "-n", 30, "-t", 0).out == first.out


def test_no_stream_prints_the_same_text(cli, run_dir):
    streamed = cli("generate", "-c", run_dir, "-p", "the", "-n", 40, "--seed", 5, "--stream")
    whole = cli("generate", "-c", run_dir, "-p", "the", "-n", 40, "--seed", 5, "--no-stream")
    assert whole.code == 0 and whole.out == streamed.out


def test_num_samples_prints_separated_samples(cli, run_dir):
    result = cli("generate", "-c", run_dir, "-p", "the", "-n", 30, "-t", 1.0, "--seed", 4, "--num-samples", 3)
    assert result.code == 0
    lines = result.out.splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if line.startswith("-" * 20)]
    assert [lines[i].strip("- \n") for i in headers] == [f"sample {k} of 3" for k in (1, 2, 3)]
    from textrnn import Sampler

    texts = Sampler.from_checkpoint(run_dir, device="cpu").generate("the", length=30, seed=4, num_samples=3)
    for k, header in enumerate(headers):
        end = headers[k + 1] if k + 1 < len(headers) else len(lines)
        assert "".join(lines[header + 1:end]) == "the" + texts[k] + "\n"
    assert len(set(texts)) == 3


def test_stop_ends_the_sample_with_the_stop_string(cli, run_dir):
    result = cli("generate", "-c", run_dir, "-p", "to", "-n", 500, "--seed", 1, "--stop", "e", "--stop", "o")
    assert result.code == 0
    text = result.out[len("to"):]  # after the prompt; no newline after the stop string
    assert text[-1] in "eo" and "e" not in text[:-1] and "o" not in text[:-1]


def test_prompt_file_and_prompt_from_stdin(cli, run_dir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the lady", encoding="utf-8")
    from_file = cli("generate", "-c", run_dir, "--prompt-file", prompt_file, "-n", 20, "--seed", 1)
    from_stdin = cli("generate", "-c", run_dir, "--prompt", "-", "-n", 20, "--seed", 1, stdin="the lady")
    from_flag = cli("generate", "-c", run_dir, "--prompt", "the lady", "-n", 20, "--seed", 1)
    assert from_file.code == from_stdin.code == 0
    assert from_file.out == from_stdin.out == from_flag.out and from_flag.out.startswith("the lady")


def test_unknown_skip_warns_and_drops(cli, run_dir):
    result = cli("generate", "-c", run_dir, "-p", "the QZ lady", "-n", 20, "--seed", 1, "--unknown", "skip")
    assert result.code == 0 and "Traceback" not in result.err
    assert "warning" in result.err and "'Q', 'Z'" in result.err
    clean = cli("generate", "-c", run_dir, "-p", "the  lady", "-n", 20, "--seed", 1)
    assert result.out[len("the QZ lady"):] == clean.out[len("the  lady"):]


def test_default_checkpoint_is_the_newest_run_under_runs(cli, run_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "old")
    shutil.copytree(run_dir, runs / "new")
    (runs / "old" / "model.safetensors").write_bytes(b"broken")
    past = time.time() - 3600
    os.utime(runs / "old" / "config.json", (past, past))
    assert cli("generate", "-n", 10, "--seed", 1, cwd=tmp_path).code == 0  # "new" works; "old" would fail
    os.utime(runs / "old" / "config.json", (past + 7200, past + 7200))  # now "old" is the newest
    assert_one_line_error(cli("generate", "-n", 10, cwd=tmp_path), str(Path("runs") / "old"))


def test_no_runs_and_no_checkpoint(cli, tmp_path):
    assert_one_line_error(cli("generate", "-n", 10, cwd=tmp_path), "no runs found", "--checkpoint")


def test_interactive_reads_prompts_line_by_line(cli, run_dir):
    result = cli("generate", "-c", run_dir, "--interactive", "-n", 15, "--seed", 1, stdin="to be\n\nthe QZ\nall\n")
    assert result.code == 0 and "Traceback" not in result.err
    assert len(result.out) == 3 * (15 + 1)  # a 15-character continuation and a newline per good prompt
    assert "error: prompt: 2 character(s) not in the vocabulary: 'Q', 'Z'" in result.err  # and the loop goes on
    assert "> " not in result.out  # the prompt marker goes to stderr, so stdout holds only text


def test_help_lists_every_option(cli):
    result = cli("generate", "--help")
    assert result.code == 0
    for option in ("--checkpoint", "--prompt", "--prompt-file", "--length", "--temperature", "--top-k", "--top-p",
                   "--seed", "--num-samples", "--stop", "--stream", "--no-stream", "--unknown", "--interactive",
                   "--repetition-penalty", "--device"):
        assert option in result.out


# ---------------------------------------------------------------- generate: bad values

@pytest.mark.parametrize("args,fragments", [
    (["--length", "-1"], ["length"]),
    (["--length", str(10**9)], ["length", "limit"]),
    (["--top-p", "0"], ["top_p", "(0, 1]"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--temperature", "nan"], ["temperature"]),
    (["--temperature", "inf"], ["temperature"]),
    (["--top-k", "-1"], ["top_k"]),
    (["--top-k", "many"], ["top-k"]),
    (["--num-samples", "0"], ["num-samples"]),
    (["--repetition-penalty", "0"], ["repetition_penalty"]),
    (["--prompt", "QQ"], ["prompt", "'Q'", "--unknown skip"]),
    (["--stop", ""], ["stop"]),
    (["--seed", "-1"], ["seed"]),
    (["--seed", str(2**64)], ["seed"]),
    (["--unknown", "maybe"], ["--unknown"]),
    (["--no-such-option"], ["no-such-option"]),
])
def test_bad_values_exit_2_with_one_line(cli, run_dir, args, fragments):
    assert_one_line_error(cli("generate", "-c", run_dir, "-n", 5, *args), *fragments)


def test_bad_checkpoints_and_prompt_sources(cli, run_dir, tmp_path):
    assert_one_line_error(cli("generate", "-c", tmp_path / "missing"), "missing", "no such run directory")
    assert_one_line_error(cli("generate", "-c", tmp_path), "not a textrnn run")
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("x")
    assert_one_line_error(cli("generate", "-c", run_dir, "-p", "x", "--prompt-file", prompt_file), "not both")
    assert_one_line_error(cli("generate", "-c", run_dir, "--prompt-file", tmp_path / "nope.txt"), "nope.txt")


# ---------------------------------------------------------------- generate: real processes

def test_closed_pipe_ends_quietly(run_dir):
    command = (f"set -o pipefail; {sys.executable} -m textrnn generate -c '{run_dir}' -p 'to be' "
               f"--length 200000 --seed 1 | head -c 10")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-c", command], capture_output=True, env=env, timeout=300)
    assert done.stdout.startswith(b"to be") and len(done.stdout) == 10
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr


def test_real_process_reads_the_prompt_from_stdin(run_dir):
    done = run_cli("generate", "-c", run_dir, "--prompt", "-", "-n", 20, "--seed", 1, input="all the")
    assert done.returncode == 0 and done.stdout.startswith("all the") and len(done.stdout) == len("all the") + 21
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- evaluate

def validation_text() -> str:
    """The last val_fraction of the corpus's characters: exactly what preprocess held out."""
    text = corpus_text()
    return text[len(text) - int(len(text) * VAL_FRACTION):]


def test_evaluate_agrees_with_the_trainers_val_bpc(cli, run_dir, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text(validation_text(), encoding="utf-8")
    last_eval = [row for row in read_metrics(run_dir) if row["kind"] == "eval"][-1]
    result = evaluate_file(run_dir, val, device="cpu")
    assert result.bpc == pytest.approx(last_eval["val_bpc"], abs=1e-4)
    assert result.loss == pytest.approx(last_eval["val_loss"], abs=1e-4)
    assert result.tokens == len(validation_text()) - 1 and result.unknown == 0
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    printed = cli("evaluate", run_dir, val, "--device", "cpu")
    assert printed.code == 0 and "Traceback" not in printed.err
    assert f"{last_eval['val_bpc']:.4f} bits/char" in printed.out
    assert f"loss {last_eval['val_loss']:.4f} nats/token" in printed.out and "perplexity" in printed.out


def test_evaluate_scores_a_bf16_run_as_its_trainer_did(tmp_path):
    from textrnn.runtime import _cpu_bf16_rnn_works, cpu_has_fast_bf16
    from textrnn.training import train

    if not (cpu_has_fast_bf16() and _cpu_bf16_rnn_works()):
        pytest.skip("no bf16 matrix units on this CPU: the trainer evaluates in fp32 here")
    (tmp_path / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    result = train([tmp_path / "corpus.txt"], tmp_path / "run", ModelConfig(num_layers=1, hidden_size=32, embedding_dim=16),
                   TrainConfig(max_steps=20, batch_size=8, eval_batches=5, seq_len=32, eval_every=20, lr=1e-2,
                               warmup_steps=3, device="cpu"), val_fraction=VAL_FRACTION)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["evaluation"] == {"streams": 5, "precision": "bf16"}
    val = tmp_path / "val.txt"
    val.write_text(validation_text(), encoding="utf-8")
    assert evaluate_file(result.run_dir, val, device="cpu").loss == pytest.approx(result.best_val_loss, abs=1e-6)


def test_evaluate_counts_unknown_characters(cli, run_dir, tmp_path):
    text = validation_text()
    odd = tmp_path / "odd.txt"
    odd.write_text(text[:200] + "\u00e9\u00e9QZ" + text[200:], encoding="utf-8")
    result = evaluate_file(run_dir, odd, device="cpu")
    assert result.unknown == 4
    assert result.tokens == len(text) + 4 - 1 - 4  # the unknown characters are read but not scored
    printed = cli("evaluate", run_dir, odd)
    assert printed.code == 0 and "4 character(s) outside the vocabulary were not scored" in printed.err


def test_evaluate_bad_input(cli, run_dir, tmp_path):
    assert_one_line_error(cli("evaluate", run_dir, tmp_path / "missing.txt"), "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(cli("evaluate", run_dir, tmp_path / "empty.txt"), "empty")
    (tmp_path / "bad.txt").write_bytes(b"ab\xffcd")
    assert_one_line_error(cli("evaluate", run_dir, tmp_path / "bad.txt"), "invalid UTF-8")
    assert_one_line_error(cli("evaluate", tmp_path / "norun", tmp_path / "bad.txt"), "norun")


def test_metrics_rows_are_what_evaluate_compares_against(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == 30


# ---------------------------------------------------------------- flag conflicts, stop endings, engines, --version

@pytest.mark.parametrize("args, fragments", [
    (["--interactive", "--num-samples", "3"], ["--interactive", "--num-samples"]),
    (["--interactive", "--prompt", "to be"], ["--interactive", "--prompt"]),
    (["--prompt", "-", "--interactive"], ["--interactive", "--prompt"]),
    (["--interactive", "--prompt-file", "p.txt"], ["--interactive", "--prompt-file"]),
])
def test_conflicting_generate_flags_are_refused(cli, run_dir, args, fragments):
    result = cli("generate", "-c", run_dir, "-n", 5, *args, stdin="all\n")
    assert_one_line_error(result, *fragments)
    assert result.out == ""


def test_the_unseen_character_message_speaks_cli(cli, run_dir):
    result = cli("generate", "-c", run_dir, "-p", "QQ", "-n", 5)
    assert_one_line_error(result, "pass --unknown skip to drop them")
    assert "unknown='skip'" not in result.err


def test_a_newline_stop_string_is_kept_and_no_more(cli, run_dir):
    for extra in ([], ["--no-stream"], ["--num-samples", "2"]):
        result = cli("generate", "-c", run_dir, "-p", "to", "-n", 2000, "--seed", 1, "--stop", "\n\n",
                     "--temperature", "1.5", *extra)
        assert result.code == 0
        assert result.out.endswith("\n\n") and not result.out.endswith("\n\n\n"), repr(result.out[-20:])


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_generate_engines_give_the_same_text(cli, run_dir, engine):
    pytest.importorskip("onnxruntime")
    args = ("generate", "-c", run_dir, "-p", "to be", "-n", 60, "--seed", 3, "--precision", "fp32")
    result = cli(*args, "--engine", engine)
    assert result.code == 0, result.err
    assert result.out == cli(*args, "--engine", "auto").out == cli(*args, "--engine", "torch").out


def test_version_and_shell_completion(cli):
    from textrnn import __version__

    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"textrnn {__version__}"
    help_text = cli("--help").out
    assert "--install-completion" in help_text and "--show-completion" in help_text
