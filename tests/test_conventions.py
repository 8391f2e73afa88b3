"""Conventions the code keeps, checked rather than hoped for: the trainer's functions stay short
(at most 60 lines and 7 parameters: ``self``/``cls`` and an autograd Function's ``ctx`` not
counted; a Triton kernel's pointer and stride arguments are its calling convention, exempt), and
docs/metrics.md names every metric the trainer writes through the name table."""

import ast
from pathlib import Path

from ampo_train.metrics import Name

REPO = Path(__file__).resolve().parents[1]
MAX_LINES, MAX_PARAMS = 60, 7


def _is_kernel(node: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def test_trainer_functions_are_short():
    too_long = []
    for path in sorted((REPO / "ampo_train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_kernel(node):
                continue
            args = node.args
            params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls", "ctx")]
            params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES or len(params) > MAX_PARAMS:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters")
    assert not too_long, "\n".join(too_long)


def test_every_named_metric_is_documented():
    docs = (REPO / "docs" / "metrics.md").read_text()
    names = [value for key, value in vars(Name).items() if key.isupper()]
    assert names and not [n for n in names if f"`{n}`" not in docs]
