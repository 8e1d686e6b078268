"""Import facts: the scoring side and `export --verify` load no TensorFlow, no `train` and (the job) no `export`;
`export --recalibrate` loads no TensorFlow and of `train` only its TensorFlow-free data module (patients);
first-party modules import each other without cycles."""
from __future__ import annotations

import ast
import gc
import os
import subprocess
import sys

import numpy as np

from batch_job.synthetic import make_tree
from helpers import write_package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("xray_core", "batch_job", "export", "train")
REPORT = ("print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))\n")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_batch_job_run_loads_nothing_of_export_train_or_tensorflow(tmp_path):
    """The whole job, in a fresh interpreter: what `python -m batch_job` imports while it scores."""
    make_tree(str(tmp_path / "in"), per_class=3, size=48, seed=1)
    serving = tmp_path / "serving"
    write_package(str(serving), heatmap_hw=(4, 4))
    forbidden = ("export", "train", "tensorflow", "tf_keras", "keras", "tf2onnx")
    code = ("import sys\nfrom batch_job.cli import main\n"
            f"rc = main(['--input', {str(tmp_path / 'in')!r}, '--model', {str(serving / 'pneumonia')!r}, "
            f"'--output', {str(tmp_path / 'out')!r}])\n"
            "assert rc == 0, rc\n" + REPORT.format(forbidden=forbidden + ("batch_job",)))
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = eval(proc.stdout.strip().splitlines()[-1])  # a list of module names
    assert "batch_job.pipeline" in loaded and "batch_job.stages" in loaded  # the probe sees what was imported
    assert [m for m in loaded if not m.startswith("batch_job")] == []
    assert os.path.exists(tmp_path / "out" / "metrics.json")


def test_export_verify_loads_no_tensorflow_and_no_train(tmp_path):
    vdir = write_package(str(tmp_path / "serving"), heatmap_hw=(4, 4))
    forbidden = ("train", "tensorflow", "tf_keras", "keras", "tf2onnx")
    proc = _run("import sys\nfrom export.__main__ import main\n"
                f"rc = main(['--verify', {vdir!r}])\n" + REPORT.format(forbidden=forbidden) + "sys.exit(rc)\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]" and f"OK: {vdir}" in proc.stdout


def test_export_recalibrate_loads_no_tensorflow(tmp_path):
    images = np.random.default_rng(0).uniform(0.2, 0.8, (60, 32, 32, 1)).astype(np.float32)
    vdir = write_package(str(tmp_path / "serving"), heatmap_hw=(4, 4), reference_images=images)
    make_tree(str(tmp_path / "cal"), per_class=30, size=48, seed=1)
    forbidden = ("train", "tensorflow", "tf_keras", "keras", "tf2onnx")
    proc = _run("import sys\nfrom export.__main__ import main\n"
                f"rc = main(['--recalibrate', {vdir!r}, '--calibrate-dir', {str(tmp_path / 'cal')!r}, "
                f"'--serving-dir', {str(tmp_path / 'serving')!r}])\n" + REPORT.format(forbidden=forbidden)
                + "sys.exit(rc)\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert eval(proc.stdout.strip().splitlines()[-1]) == ["train", "train.data", "train.loading"]  # no TensorFlow
    assert f"published {tmp_path / 'serving' / 'pneumonia' / '2'}" in proc.stdout


def module_imports() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports at module level (imports inside functions run
    later and cannot form an import-time cycle)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for name in os.listdir(os.path.join(REPO, package)):
            if not name.endswith(".py"):
                continue
            module = package + ("" if name == "__init__.py" else "." + name[:-3])
            tree = ast.parse(open(os.path.join(REPO, package, name), encoding="utf-8").read())
            found = set()
            for node in tree.body:
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[module] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_no_import_cycles():
    graph = module_imports()
    assert "xray_core.package" in graph["batch_job.model"]  # the graph sees real imports
    assert find_cycle(graph) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and would see a cycle


def test_the_scoring_side_imports_the_contract_from_xray_core_only():
    graph = module_imports()
    for module, deps in graph.items():
        if module.startswith(("batch_job", "xray_core")):
            assert not {d for d in deps if d.startswith(("export", "train"))}, module


def test_the_command_entry_point_runs_the_job_and_exits_0(tmp_path, monkeypatch, capsys):
    """batch_job/__main__.main as `python -m batch_job` runs it (arguments from sys.argv), in this process."""
    import signal

    from batch_job.__main__ import main

    make_tree(str(tmp_path / "in"), per_class=2, size=48, seed=2)
    serving = tmp_path / "serving"
    write_package(str(serving))
    monkeypatch.setattr(sys, "argv", ["batch_job", "--input", str(tmp_path / "in"), "--model",
                                      str(serving / "pneumonia"), "--output", str(tmp_path / "out"),
                                      "--direct_running_mode=in_memory"])
    from xray_core.interrupts import GATE

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(GATE, "depth", GATE.depth)  # the command holds signals once done: undone after the test
    try:
        assert main() == 0
    finally:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # published: held through the exit
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        gc.unfreeze()  # main() leaves the objects of its process to the exit; this one goes on
    assert "scored 4/4 images" in capsys.readouterr().out
