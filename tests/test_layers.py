"""The package's imports run one way (flow -> leaves -> spaces -> sampler -> config, trainer -> recipe -> cli): a
module may import modules of its own floor or below, never above, and there is no circle. Lazy imports inside
functions count too: they are still arrows of the design."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vgf_llm"

FLOORS = [
    ["vgf_llm.flow", "vgf_llm.adapters", "vgf_llm.ridge", "vgf_llm.rollout.config", "vgf_llm.checks"],
    ["vgf_llm.models", "vgf_llm.tasks", "vgf_llm.rewards", "vgf_llm.hub", "vgf_llm.value", "vgf_llm.distill",
     "vgf_llm.rollout", "vgf_llm.rollout.hf", "vgf_llm.rollout.vllm_engine", "vgf_llm.rollout.vllm_client",
     "vgf_llm.prefix_value", "vgf_llm.prompt_files"],
    ["vgf_llm.value_fit", "vgf_llm.evaluation", "vgf_llm.likelihood", "vgf_llm.proxy_reward",
     "vgf_llm.rollout.vllm_backend", "vgf_llm.spaces", "vgf_llm.spaces.base", "vgf_llm.spaces.reference",
     "vgf_llm.spaces.regenerate", "vgf_llm.spaces.token_edits", "vgf_llm.spaces.prefix_steering"],
    ["vgf_llm.sampler", "vgf_llm.config"],
    ["vgf_llm.serve"],
    ["vgf_llm.trainer"],
    ["vgf_llm.recipe"],
    ["vgf_llm", "vgf_llm.cli", "vgf_llm.cli.__main__", "vgf_llm.cli.common", "vgf_llm.cli.train",
     "vgf_llm.cli.generate", "vgf_llm.cli.fit_value", "vgf_llm.cli.models", "vgf_llm.cli.env", "vgf_llm.cli.demo",
     "vgf_llm.cli.serve"],
]
FLOOR = {module: i for i, names in enumerate(FLOORS) for module in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The vgf_llm modules a file imports (``from vgf_llm.x import y`` counts as importing vgf_llm.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vgf_llm"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vgf_llm"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_floor():
    assert set(graph()) == set(FLOOR), "add new modules to FLOORS (and keep their imports downward)"


def test_no_module_imports_a_module_above_it():
    upward = [(src, dst) for src, targets in graph().items() for dst in targets if FLOOR[dst] > FLOOR[src]]
    assert not upward, upward


def test_nothing_outside_the_cli_imports_it():
    offenders = [src for src, targets in graph().items()
                 if not src.startswith("vgf_llm.cli") and any(t.startswith("vgf_llm.cli") for t in targets)]
    assert not offenders, offenders


def test_there_is_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != 1, f"import circle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: a leaf importing the sampler is an upward arrow."""
    bad = tmp_path / "leaf.py"
    bad.write_text("def f():\n    from vgf_llm.sampler import VGFSampler\n")
    assert imports(bad) == {"vgf_llm.sampler"} and FLOOR["vgf_llm.sampler"] > FLOOR["vgf_llm.rewards"]
