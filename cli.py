"""Run the textrnn command line from a checkout: ``python cli.py train corpus.txt``."""
from textrnn.cli import main

main()
