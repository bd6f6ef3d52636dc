"""The planning layer, the simulator, the synthetic data and the command line's parser need only
the standard library."""

from tests.torchless import run_without_torch

CODE = """
import chunkflow, chunkflow.plan, chunkflow.plan.pipeline, chunkflow.sim, chunkflow.sim.search
import chunkflow.train.data.synthetic, chunkflow.bench.options
import chunkflow.cli
chunkflow.cli.build_parser()  # the parser (bench's options included) needs no torch
plan = chunkflow.plan.build_chunks([5, 17, 3], chunk_size=8)
chunkflow.plan.validate_schedule(chunkflow.plan.schedule(plan, k=1), plan, k=1)
stages = chunkflow.plan.pipeline.state_aware_1f1b(plan, 2, k=1)
chunkflow.plan.pipeline.validate_pipeline(stages, plan, k=1)
chunkflow.sim.simulate(stages, duration=lambda s, a: 1.0)
try:
    chunkflow.ChunkFlowEngine
except ImportError as e:
    assert "blocked" in str(e)
else:
    raise AssertionError("the engine should need torch")
print("ok")
"""


def test_plan_imports_without_torch():
    assert run_without_torch(CODE).strip() == "ok"


def test_only_the_parallel_package_imports_torch_distributed():
    """DESIGN.md: chunkflow.parallel is the one place that talks to torch.distributed."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "chunkflow"
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "parallel":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n.startswith("torch.distributed")]
    assert not offenders, offenders
    assert any((root / "parallel").glob("*.py"))
