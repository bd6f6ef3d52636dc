"""The private torch APIs data parallelism relies on exist in this torch (a release that renames
one fails here, by name, rather than deep inside a step); each is used through one function."""

import ast
from pathlib import Path

import torch

from chunkflow.parallel.internals import missing_internals

PACKAGE = Path(__file__).parents[2] / "chunkflow"


def test_the_installed_torch_has_every_private_name_we_use():
    assert missing_internals() == [], f"torch {torch.__version__}"


def test_private_torch_names_are_used_only_in_their_one_module():
    """No other module reaches into DDP's reducer or FSDP2's state."""
    private = {"prepare_for_backward", "_fsdp_param_groups", "_fsdp_param_group",
               "_root_post_backward_final_callback", "_state_ctx"}
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        if file.name == "internals.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{file.relative_to(PACKAGE)}:{node.lineno} {node.attr}")
    assert offenders == []
