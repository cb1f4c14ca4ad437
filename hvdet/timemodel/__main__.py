"""``python -m hvdet.timemodel ...`` = ``hvdet project ...``."""
import sys

from hvdet.timemodel.cli import main

sys.exit(main(prog="python -m hvdet.timemodel"))
