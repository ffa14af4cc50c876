"""``python -m textrnn`` (and so ``torchrun -m textrnn train ...``)."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="textrnn")
