"""Project rules that a reviewer would otherwise have to remember."""
import re
import subprocess

from tests.harness import BIN, ROOT


def test_only_comm_world_imports_horovod():
    pattern = re.compile(r"^\s*(import horovod|from horovod)", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("hvdet/**/*.py"), ROOT / "train.py"]
                 if pattern.search(p.read_text()) and p != ROOT / "hvdet" / "comm" / "world.py"]
    assert offenders == []


def test_ruff_is_clean():
    subprocess.run([str(BIN / "ruff"), "check", "hvdet", "tests", "benchmarks", "launch", "train.py"],
                   cwd=ROOT, check=True)
