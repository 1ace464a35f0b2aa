"""The package layout, as CI checks it:

- pyproject.toml's explicit package list names every source folder, and the three top-level
  folders (model/, kernels/, rag_service/) have no `__init__.py`;
- from outside the repository the `dsa_rag.*` packages import, a bare `import kernels` is Hugging
  Face's package (transformers needs it) and the `dsa-rag` script runs; from the repository root
  too, HF's `kernels` wins over the folder;
- no import cycle among the project's modules (imports inside functions count), and the layering
  rules below;
- a wheel built from the tree installs on its own and serves, with the dsa-tiny weights inside.

    .venv/bin/python -m pytest -q tests/test_layout.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.import_graph import PACKAGE_DIRS, ROOT, find_cycles, format_cycle, import_graph

# What dsa_rag.rag_service may import from dsa_rag.model: the engine's protocol and factory,
# sampling parameters and the tokenizer. Everything else of the model stays behind the factory.
RAG_SERVICE_MAY_IMPORT_FROM_MODEL = frozenset({
    "dsa_rag.model.engine.protocol",
    "dsa_rag.model.engine.factory",
    "dsa_rag.model.engine.sampling",
    "dsa_rag.model.tokenizer",
    # `dsa-rag plan` (rag_service/cli.py): the replica memory planner, a pure function of a config.
    "dsa_rag.model.plan",
    # `dsa-rag engine-server` (rag_service/cli.py): the engine served alone as an OpenAI-compatible
    # upstream (issue 28); the CLI only parses its flags and runs it, the service never calls it.
    "dsa_rag.model.engine.server",
})

BIN = Path(sys.executable).parent  # the venv running the tests (.venv, or `make lock`'s)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _in_project(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --- packaging metadata -------------------------------------------------------------------------

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_folder_is_a_listed_package():
    setup = _pyproject()["tool"]["setuptools"]
    listed = set(setup["packages"])
    assert setup["package-dir"] == PACKAGE_DIRS
    on_disk = set()
    for pkg, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for d in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            on_disk.add(".".join([pkg, *d.relative_to(base).parts]))
    missing = sorted(on_disk - listed)
    assert not missing, f"source folders missing from [tool.setuptools] packages: {missing}"
    stale = sorted(p for p in listed - on_disk)
    assert not stale, f"[tool.setuptools] packages names folders without .py files: {stale}"


def test_top_level_folders_have_no_init():
    for folder in PACKAGE_DIRS.values():
        assert not (ROOT / folder / "__init__.py").exists(), (
            f"{folder}/__init__.py would make `import {folder}` pick the repository's folder")


# --- imports as a user sees them ----------------------------------------------------------------

def _run(args, cwd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, **kw)


def _assert_hugging_face_kernels(path: Path) -> None:
    assert "site-packages" in path.parts and not path.is_relative_to(ROOT / "kernels"), (
        f"`import kernels` gave {path}, not Hugging Face's package")


def test_imports_from_outside_the_repository():
    code = ("import dsa_rag.model, dsa_rag.kernels, dsa_rag.rag_service, transformers.activations, kernels;"
            "print(kernels.__file__)")
    r = _run([sys.executable, "-c", code], cwd="/", env=_clean_env())
    assert r.returncode == 0, r.stderr
    _assert_hugging_face_kernels(Path(r.stdout.strip().splitlines()[-1]))


def test_bare_kernels_is_hugging_face_even_from_the_repo_root():
    # `python -c` puts the current directory first on sys.path: the repo's kernels/ is a candidate
    r = _run([sys.executable, "-c", "import kernels, transformers.activations; print(kernels.__file__)"],
             cwd=ROOT, env=_clean_env())
    assert r.returncode == 0, r.stderr
    _assert_hugging_face_kernels(Path(r.stdout.strip().splitlines()[-1]))


def test_console_script_runs():
    r = _run([str(BIN / "dsa-rag"), "--help"], cwd="/", env=_clean_env())
    assert r.returncode == 0, r.stderr
    assert "serve" in r.stdout


# --- the import graph ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(
        format_cycle(c) for c in cycles)


def _edges(graph, src_prefix: str, dst_prefix: str) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() if _in_project(a, src_prefix)
                  for b in targets if _in_project(b, dst_prefix))


def test_training_never_imports_evals(graph):
    bad = _edges(graph, "dsa_rag.model.training", "dsa_rag.model.evals")
    assert not bad, "\n".join(bad)


def test_model_and_kernels_never_import_the_service(graph):
    bad = _edges(graph, "dsa_rag.model", "dsa_rag.rag_service") + _edges(graph, "dsa_rag.kernels", "dsa_rag.rag_service")
    assert not bad, "\n".join(bad)


def test_kernels_never_import_the_model(graph):
    bad = _edges(graph, "dsa_rag.kernels", "dsa_rag.model")
    assert not bad, "\n".join(bad)


def test_service_imports_only_the_models_public_modules(graph):
    bad = [e for e in _edges(graph, "dsa_rag.rag_service", "dsa_rag.model")
           if e.split(" -> ")[1] not in RAG_SERVICE_MAY_IMPORT_FROM_MODEL]
    assert not bad, ("dsa_rag.rag_service may import from dsa_rag.model only "
                     f"{sorted(RAG_SERVICE_MAY_IMPORT_FROM_MODEL)}:\n" + "\n".join(bad))


def test_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    from tests.import_graph import module_imports

    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from dsa_rag.model import load\n"
                   "def f():\n    from dsa_rag.model.engine import sampling\n    import dsa_rag.kernels.dispatch\n"
                   "from . import chunk\nfrom ..errors import NoDocuments\n")
    mods = dict.fromkeys(["dsa_rag.model.load", "dsa_rag.model.engine.sampling", "dsa_rag.kernels.dispatch",
                          "dsa_rag.rag_service.parsing.chunk", "dsa_rag.rag_service.errors",
                          "dsa_rag.rag_service.parsing.m"], src)
    assert module_imports("dsa_rag.rag_service.parsing.m", src, mods) == {
        "dsa_rag.model.engine.sampling", "dsa_rag.kernels.dispatch", "dsa_rag.rag_service.parsing.chunk",
        "dsa_rag.rag_service.errors"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


# --- a wheel installs on its own and serves -----------------------------------------------------

@pytest.mark.slow
def test_wheel_installs_and_serves(tmp_path):
    # build from a copy of the sources: an in-tree build would leave build/ in the repository,
    # and stale files there end up in later wheels
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    r = _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
              "-w", str(wheels)], cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = wheels.glob("dsa_rag-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for f in ("model.safetensors", "config.json", "tokenizer_config.json"):
        assert f"dsa_rag/model/weights/dsa-tiny/{f}" in names, f
    assert "dsa_rag/rag_service/cli.py" in names and "dsa_rag/kernels/dispatch.py" in names
    for f in ("index.html", "app.js", "style.css"):  # the web UI ships as package data
        assert f"dsa_rag/rag_service/web/{f}" in names, f
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dsa_rag"}, top  # no top-level model/, kernels/ (that would shadow HF's kernels)
    r = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
             cwd=tmp_path, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr

    env = _clean_env(PYTHONPATH=str(site), DSA_RAG_TORCH_THREADS="1")
    env.pop("DSA_RAG_REDIS_URL", None)
    # the modules that run are the wheel's, and so are the weights they load (the namespace
    # packages' __path__ also lists the editable install of this venv, after the wheel's)
    probe = ("import sys, dsa_rag.rag_service.cli, dsa_rag.rag_service.serve.app, dsa_rag.model.load as l;"
             "print(dsa_rag.model.__path__[0], dsa_rag.kernels.__path__[0], dsa_rag.rag_service.__path__[0], sep='\\n');"
             "print(*sorted(m.__file__ for n, m in sys.modules.items() if n.startswith('dsa_rag.') and getattr(m, '__file__', None)), sep='\\n');"
             "print(l.WEIGHTS_DIR)")
    r = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert len(paths) > 5 and all(p.resolve().is_relative_to(site.resolve()) for p in paths), r.stdout
    assert (paths[-1] / "dsa-tiny" / "model.safetensors").is_file()

    proc = subprocess.Popen([sys.executable, "-m", "dsa_rag.rag_service.cli", "serve", "--no-ray", "--port", "0",
                             "--data-dir", str(tmp_path / "data")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        url, deadline = None, time.time() + 90
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("serve exited:\n" + "".join(seen))
            seen.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(seen)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        ready = None
        while time.time() < deadline:
            ready = httpx.get(f"{url}/readyz", timeout=10)
            if ready.status_code == 200 and ready.json().get("status") == "ok":
                break
            time.sleep(1)
        assert ready is not None and ready.json().get("status") == "ok", ready.text if ready else "no answer"
        page = httpx.get(f"{url}/", timeout=10)  # the web UI, from the wheel's files
        assert page.status_code == 200 and '<script src="/ui/app.js"' in page.text
        assert httpx.get(f"{url}/ui/app.js", timeout=10).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        seen.append(proc.stdout.read())
    assert "no trained weights shipped" not in "".join(seen), "".join(seen)  # it loaded the wheel's weights
