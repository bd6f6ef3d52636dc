"""The planning layer, the simulator and the synthetic data need only the standard library."""

import subprocess
import sys

BLOCK_TORCH = """
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "numpy":
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _Blocker())
import chunkflow, chunkflow.plan, chunkflow.plan.pipeline, chunkflow.sim, chunkflow.sim.search
import chunkflow.train.synthetic
plan = chunkflow.plan.build_chunks([5, 17, 3], chunk_size=8)
chunkflow.plan.validate_schedule(chunkflow.plan.schedule(plan, k=1), plan, k=1)
stages = chunkflow.plan.pipeline.state_aware_1f1b(plan, 2, k=1)
chunkflow.plan.pipeline.validate_pipeline(stages, plan, k=1)
chunkflow.sim.simulate(stages, duration=lambda s, a: 1.0)
assert "torch" not in sys.modules
try:
    chunkflow.ChunkFlowEngine
except ImportError as e:
    assert "blocked" in str(e)
else:
    raise AssertionError("the engine should need torch")
print("ok")
"""


def test_plan_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
