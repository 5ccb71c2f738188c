"""Nothing is written to the system's temporary folder: every temporary file or folder the code makes is placed
in a folder it names (`dir=`), inside the data folder or a run's output, and a profiling launch's folder goes when
the launch is done."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from api.commands.profile import ProfileRunError, ProfileRunStopped, launch_folder
from executor import launch

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("planner", "profiler", "executor", "api")
MAKERS = {"mkdtemp", "mkstemp", "TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"}


def _tempfile_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of `tempfile.<name>(...)` and of names imported from tempfile."""
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "tempfile"
        for alias in node.names
    }
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            if function.value.id == "tempfile":
                calls.append(node)
        elif isinstance(function, ast.Name) and function.id in imported:
            calls.append(node)
    return calls


def _name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id  # type: ignore[attr-defined]


def test_no_code_makes_temporary_files_in_the_system_temporary_folder():
    offences = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for call in _tempfile_calls(ast.parse(path.read_text(), filename=str(path))):
                name = _name(call)
                where = f"{path.relative_to(REPO_ROOT)}:{call.lineno} tempfile.{name}"
                if name in ("gettempdir", "gettempdirb"):
                    offences.append(f"{where}: the system's temporary folder itself")
                elif name in MAKERS and not any(keyword.arg == "dir" for keyword in call.keywords):
                    offences.append(f"{where} without dir=: lands in the system's temporary folder")
    assert offences == []


def test_a_launch_folder_is_made_in_the_work_folder_and_removed_when_done(tmp_path):
    with launch_folder(tmp_path / "work", "comm") as folder:
        assert folder.parent == tmp_path / "work" and folder.name.startswith("comm-launch-")
        (folder / "logs").mkdir()
        (folder / "logs" / "launcher.log").write_text("done\n")
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("error", [ProfileRunStopped("stopped"), KeyboardInterrupt(), OSError("disk full")])
def test_a_launch_folder_is_removed_when_the_launch_is_stopped_or_breaks(tmp_path, error):
    with pytest.raises(type(error)), launch_folder(tmp_path, "layers-on-ranks") as folder:
        (folder / "sweep.json").write_text("{}")
        raise error
    assert list(tmp_path.iterdir()) == []


def test_a_failed_launch_keeps_its_logs_for_the_error_that_names_them(tmp_path):
    with pytest.raises(ProfileRunError), launch_folder(tmp_path, "comm") as folder:
        (folder / "launcher.log").write_text("rank 1 failed\n")
        raise ProfileRunError(f"the collective sweep failed (logs: {folder})")
    assert (folder / "launcher.log").read_text() == "rank 1 failed\n"


def test_a_launch_without_a_log_folder_is_refused_rather_than_given_a_temporary_one():
    spec = launch.LaunchSpec(nproc_per_node=1, module="nothing")
    with pytest.raises(launch.LaunchError, match="log_dir"):
        launch.run(spec, cancel=threading.Event())


def test_torchs_compiler_cache_goes_in_the_launchs_folder_unless_one_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(launch.TORCH_CACHE_ENV, raising=False)
    assert launch.torch_cache_env(tmp_path) == {launch.TORCH_CACHE_ENV: str(tmp_path / "torchinductor")}
    assert launch.torch_cache_env(None) == {}
    monkeypatch.setenv(launch.TORCH_CACHE_ENV, "/somewhere/chosen")
    assert launch.torch_cache_env(tmp_path) == {}
