"""The deployment files under infra/ and the commands in them and in the docs, for the
infra tests: where they are, parsed, and the jobs/ commands they hold, split for parsing."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import yaml

from rstar_batch import cli, nightly

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
CRONJOB = INFRA / "kuberay" / "cronjob.yaml"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
NIGHTLY_CONFIG = REPO / "jobs" / "configs" / "nightly.yaml"
YAML_FILES = sorted(INFRA.rglob("*.yaml")) + sorted((REPO / "jobs" / "configs").glob("*.yaml"))
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), INFRA / "README.md"]


def load_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file."""
    return list(yaml.safe_load_all(path.read_text()))


def rayjob() -> dict:
    (job,) = load_yaml(RAYJOB)
    return job


def walk(node: Any) -> Iterator[dict]:
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from walk(item)


def app_dir() -> str:
    """Where the Dockerfile puts the repository's jobs/ (its last WORKDIR)."""
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]


# jobs/ entrypoints and the parser each runs its arguments through.
SCRIPTS = {"jobs/nightly_rerank.py": lambda argv: nightly.build_parser().parse_args(argv),
           "jobs/score_corpus.py":
               lambda argv: nightly.build_parser("score-corpus").parse_args(argv),
           "jobs/rerank.py": lambda argv: cli.build_parser().parse_args(["rerank", *argv])}
COMMAND = re.compile(r"^(\w+=\S*\s+)*(python|ray|rstar-batch)\s")


def shell_lines(text: str) -> Iterator[str]:
    """Commands running a jobs/ script in `text` (shell; comments of YAML files and the
    Dockerfile; docstrings of jobs/), backslash continuations joined."""
    joined = re.sub(r"\\+\n\s*#?", " ", text)
    for line in joined.splitlines():
        line = line.strip().lstrip("#").strip()
        if COMMAND.match(line) and any(script in line for script in SCRIPTS):
            yield line


def code_blocks(markdown: str) -> Iterator[str]:
    """The bodies of fenced shell blocks (bash, sh, shell or none)."""
    body: list[str] = []
    language = None
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if language is None:
                language, body = line.strip()[3:].strip(), []
            else:
                if language in ("", "bash", "sh", "shell"):
                    yield "\n".join(body)
                language = None
        elif language is not None:
            body.append(line)


def commands() -> list[tuple[str, str]]:
    """(where, command) of every jobs/ command in the repository's deployment files and docs."""
    found = [("rayjob entrypoint", rayjob()["spec"]["entrypoint"])]
    for path in YAML_FILES + [DOCKERFILE, *sorted((REPO / "jobs").glob("*.py"))]:
        found += [(str(path.relative_to(REPO)), c) for c in shell_lines(path.read_text())]
    for path in DOC_FILES:
        found += [(str(path.relative_to(REPO)), c)
                  for block in code_blocks(path.read_text()) for c in shell_lines(block)]
    return found


def repo_path(path: str) -> Path:
    """A path of the image (under its app dir) or of the repository, in the repository."""
    prefix = app_dir().rstrip("/") + "/"
    local = path[len(prefix):] if path.startswith(prefix) else path
    assert not os.path.isabs(local), f"{path} is neither in the image's {prefix} nor relative"
    return REPO / local


def split(command: str) -> tuple[str, str, list[str]]:
    """(which of SCRIPTS, the script's path as written, its arguments)."""
    tokens = shlex.split(command)
    (at,) = [i for i, t in enumerate(tokens) if any(t.endswith(s) for s in SCRIPTS)]
    script = next(s for s in SCRIPTS if tokens[at].endswith(s))
    return script, tokens[at], tokens[at + 1:]
