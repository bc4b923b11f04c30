"""Every jobs/ command in infra/, the docs and jobs/ parses with the job's own parser and
names files that exist; the nightly CronJob creates one RayJob per day."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rstar_batch import cli, nightly
from tests.infra_files import (CRONJOB, RAYJOB, SCRIPTS, commands, load_yaml, rayjob, repo_path,
                               split)


@pytest.mark.parametrize("source,command", commands(), ids=lambda v: v[:60])
def test_every_job_command_parses_and_names_files_that_exist(source, command):
    script, path, argv = split(command)
    assert repo_path(path).is_file(), f"{source}: {path}"
    args = SCRIPTS[script](argv)  # argparse exits on anything it does not know
    if args.config:
        args.config = str(repo_path(args.config))
        assert Path(args.config).is_file(), f"{source}: {args.config}"
        if script == "jobs/nightly_rerank.py":
            nightly.config_from_args(args)  # the YAML loads and names {date} where it must
        elif script == "jobs/score_corpus.py":
            config, _ = nightly.config_from_args(args, "score-corpus")
            config.validate_for_corpus()
        else:
            cli.config_from_args(args)


def test_the_commands_found_include_the_documented_ones():
    sources = {source for source, _ in commands()}
    assert {"rayjob entrypoint", "README.md", "docs/operations.md"} <= sources
    scripts = {split(command)[0] for _, command in commands()}
    assert set(SCRIPTS) <= scripts  # every entrypoint is shown somewhere


# -- the head pod's preStop hook --------------------------------------------------------------

FAKE_DRIVER = """
import signal, sys, time
def drain(*_):
    time.sleep(1)  # commits what it scored
    sys.exit(75)
signal.signal(signal.SIGTERM, drain)
print("ready", flush=True)
time.sleep(120)
"""


def test_the_prestop_hook_sigterms_the_driver_and_waits_until_it_drained(tmp_path):
    script = tmp_path / "nightly_rerank.py"   # named as the entrypoint the hook looks for
    script.write_text(FAKE_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), "--config", "x.yaml"],
                              stdout=subprocess.PIPE)
    try:
        assert driver.stdout.readline() == b"ready\n"
        began = time.monotonic()
        hook = subprocess.run([sys.executable, str(repo_path("jobs/stop_drivers.py")),
                               "--wait", "20"], capture_output=True, text=True, timeout=60)
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert f"SIGTERM sent to 1 driver(s) [{driver.pid}]" in hook.stdout
        assert 1 <= time.monotonic() - began < 15   # it waited for the drain
        assert driver.wait(5) == 75
    finally:
        driver.kill()


# -- the nightly CronJob --------------------------------------------------------------------


def _cron() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in load_yaml(CRONJOB)}


def test_the_cronjob_may_only_create_and_list_rayjobs():
    kinds = _cron()
    (rule,) = kinds["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert set(rule["verbs"]) <= {"create", "list", "get"}
    account = kinds["ServiceAccount"]["metadata"]["name"]
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    pod = kinds["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def _run_cron_script(tmp_path: Path, existing: str = "") -> subprocess.CompletedProcess:
    """The CronJob's script with a stub kubectl that records what it would create."""
    pod = _cron()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text('#!/bin/sh\nif [ "$1" = get ]; then printf "%s" "$EXISTING"; exit 0; fi\n'
                       'cat > "$CREATED"\n')
    kubectl.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "RAYJOB_TEMPLATE": str(RAYJOB), "CREATED": str(tmp_path / "created.yaml"),
           "EXISTING": existing}
    assert {"name": "RAYJOB_TEMPLATE", "value": "/manifests/rayjob.yaml"} in container["env"]
    return subprocess.run([*container["command"], *container["args"]], env=env,
                          capture_output=True, text=True, timeout=30)


def test_the_cronjob_creates_a_rayjob_for_today(tmp_path):
    before = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    proc = _run_cron_script(tmp_path)
    after = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert proc.returncode == 0, proc.stderr
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    day = created["metadata"]["labels"]["rstar-batch/date"]
    assert day in {before, after}
    script, _, argv = split(created["spec"]["entrypoint"])
    assert script == "jobs/nightly_rerank.py"
    assert nightly.build_parser().parse_args(argv).date == day
    assert {k: v for k, v in created["spec"].items() if k != "entrypoint"} == \
        {k: v for k, v in rayjob()["spec"].items() if k != "entrypoint"}


def test_the_cronjob_creates_nothing_when_the_day_has_a_rayjob(tmp_path):
    proc = _run_cron_script(tmp_path, existing="rayjob.ray.io/rstar-nightly-x7k2p")
    assert proc.returncode == 0 and "exists already" in proc.stdout
    assert not (tmp_path / "created.yaml").exists()
