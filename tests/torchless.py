"""Run a snippet in a fresh interpreter where importing torch (or numpy) fails."""

import subprocess
import sys

BLOCKER = """
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "numpy":
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Blocker())
"""


def run_without_torch(code: str) -> str:
    """stdout of ``code``; fails the test if it raises or imports torch."""
    code = BLOCKER + code + '\nassert "torch" not in sys.modules, "torch was imported"\n'
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout
