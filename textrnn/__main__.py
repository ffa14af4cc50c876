"""``python -m textrnn`` (and so ``torchrun -m textrnn train ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
