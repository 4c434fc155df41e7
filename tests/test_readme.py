"""Every command and snippet in README.md runs: each fenced `bash` block's lines and each `python`
block, in a copy of the repository's tracked files (so outputs such as out.jsonl and run folders
land there). A block preceded by `<!-- not run on CI: REASON -->` is skipped with its reason; those
are few (hardware, network, Docker, the CI command itself).

Substitutions, only where the command as written cannot run here, each with its reason:
- the quick start's `pip install` steps are dropped: the tests run inside the environment they
  set up (installing into a shared interpreter from a test would change it for everything else);
- `invoke bench --suite smoke` runs one of its twelve cases, to keep the suite short (the whole
  smoke suite takes about a minute on 2 cores; the runner's tests cover every case kind).
The README is also checked to be a guide of at most about 15 KB, its test command to be what .ci/run
runs, and its relative links to resolve.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_BYTES = 15_500
INSTALL = re.compile(r"^(python3 -m pip install [^&]+&& )+")
SUBSTITUTIONS = {
    "invoke bench --suite smoke": "invoke bench --suite smoke --cases wcpu-overlap-1",
}
# Commands of features that land with the text job and the model families (LLM, invoke generate,
# SmolLM2 weights); enabled at integration.


def _text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def _blocks() -> list[tuple[str, str, str | None]]:
    """(language, body, skip reason or None) of every fenced block."""
    pattern = re.compile(r"(?:<!-- not run on CI: (?P<why>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```",
                         re.S)
    return [(m["lang"], m["body"], m["why"]) for m in pattern.finditer(_text())]


def _commands() -> list[tuple[str, str, str | None]]:
    """(kind, commands or snippet, skip reason) per block: a bash block's commands one per line
    (continuation lines joined, comments dropped), run in order in one shell; a python block whole."""
    out = []
    for lang, body, why in _blocks():
        assert lang in ("bash", "python"), f"a README block without a runnable language: {body[:60]!r}"
        if lang == "bash":
            lines = re.sub(r"\\\n\s*", " ", body).splitlines()
            body = "\n".join(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
        out.append((lang, body, why))
    return out


def _indented_commands() -> list[str]:
    """Indented (4-space) command lines outside fences: the README keeps every command fenced."""
    outside = re.sub(r"```.*?```", "", _text(), flags=re.S)
    return [ln for ln in outside.splitlines() if re.match(r"^    (invoke|python3?|\$) ", ln)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the tracked files, where the README's commands run."""
    dest = tmp_path_factory.mktemp("readme")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    for rel in filter(None, files.stdout.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return str(dest)


def _env(workdir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [workdir, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    env["HOME"] = os.path.join(workdir, "home")  # weight folders, caches and offload dirs stay here
    os.makedirs(env["HOME"], exist_ok=True)
    return env


COMMANDS = _commands()


@pytest.mark.parametrize("kind,command,why", COMMANDS, ids=[f"{i}-{c[1][:30]}" for i, c in enumerate(COMMANDS)])
def test_readme_block_runs(workdir, kind, command, why):
    if why:
        pytest.skip(f"not run on CI: {why}")
    if kind == "bash":
        lines = [INSTALL.sub("", ln) for ln in command.splitlines()]
        command = "\n".join(SUBSTITUTIONS.get(ln, ln) for ln in lines)
    argv = [sys.executable, "-c", command] if kind == "python" else ["bash", "-euo", "pipefail", "-c", command]
    env = _env(workdir)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_readme_is_a_guide_of_about_15_kb_with_every_command_fenced():
    assert len(_text().encode()) <= MAX_BYTES
    assert _indented_commands() == []
    skipped = [c for c in COMMANDS if c[2]]
    assert len(skipped) <= 4, "hardware-only blocks are few; show the rest with --dry-run"


def test_readme_test_command_is_what_ci_runs():
    lines = [ln for k, c, _ in COMMANDS for ln in c.splitlines()]
    tests = [c for c in lines if c.endswith("python3 -m pytest -q -n 2")]
    assert len(tests) == 1
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == tests[0]
    main_job = [c for c in lines if c.endswith("invoke generate --input examples/prompts.jsonl --output out.jsonl")]
    assert len(main_job) == 1 and main_job[0].startswith(
        "python3 -m pip install torch==2.13.0 && python3 -m pip install --require-hashes -r requirements.lock")
    assert "requirements-dev.lock" not in main_job[0]  # the main job needs no test tools


def _links() -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#]+)\)", _text()) if "://" not in t]


OTHERS_DOCS = ("docs/architecture.md", "docs/tuning.md", "docs/weights.md")


def test_readme_links_resolve():
    missing = [t for t in _links() if t not in OTHERS_DOCS and not os.path.exists(os.path.join(ROOT, t))]
    assert missing == []


def test_readme_links_to_the_architecture_tuning_and_weights_docs_resolve():
    assert all(os.path.exists(os.path.join(ROOT, t)) for t in OTHERS_DOCS)
