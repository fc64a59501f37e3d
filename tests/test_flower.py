"""fedprompt as a Flower app (fedprompt.flower): the same rows and prompts as ``fedprompt fit --federation.parallel_clients
1``, through Flower's in-process message path, its simulation engine and its deployment runtime (a SuperLink and two
SuperNodes on 127.0.0.1); bad nodes, resume after restarting every node, SecAgg+ within its quantisation error."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is not installed (pip install -e \".[flower]\")")

from fedprompt.flower.local import run_local  # noqa: E402 - after the skip

# Ray's simulation engine and the SuperLink + SuperNodes deployment take minutes on 2 CPU cores (about 3 and 7 under
# load): opt-in, so that `pip install -e ".[dev]" && python -m pytest -q` stays within the suite's time budget.
SLOW = bool(os.environ.get("FEDPROMPT_FLOWER_SLOW") or os.environ.get("FEDPROMPT_FLOWER_ALL"))
slow = pytest.mark.skipif(not SLOW, reason="takes minutes (Flower's Ray simulation engine / a SuperLink with two "
                          "SuperNodes): FEDPROMPT_FLOWER_SLOW=1 runs it")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
COMMON = "--federation.rounds 3 --federation.fraction 0.75 --log.progress false --log.logger none"
TWO = "--data.init_args.partition.init_args.num_clients 2 --log.progress false --log.logger none"
METHODS = {
    "PromptFL": "--method PromptFL",
    "FedOTP": "--method FedOTP --method.n_ctx 4 --method.lr 0.5",
    "FedPGP": "--method FedPGP --method.n_ctx 4 --method.bottleneck 2 --method.lr 0.5",
    # the aggregators the issue names: FedMGP's group selection (client-side apply), FedTPG's reduce-path mean
    "FedMGP": "--method FedMGP --method.n_ctx 2 --method.lr 0.01",
    "FedTPG": "--method FedTPG --method.lr 0.01",
    # clients of different local prompt lengths (FedPHA); the instance-level PromptFormer, reduce path (FedMVP)
    "FedPHA": "--method FedPHA --method.n_ctx_global 4 --method.local_lengths [2,4,3,4] --method.lr 0.5",
    "FedMVP": f"--method FedMVP --method.attributes {ROOT / 'tests' / 'data' / 'synthetic_attributes.json'} "
              "--method.lr 0.05",
    # a per-client domain index in the state (FedAPT); kept multipliers and the server's OT calibration (FOCoOp)
    "FedAPT": "--method FedAPT --method.n_ctx 2 --method.domain_of client --method.lr 0.5",
    "FOCoOp": f"--method FOCoOp --method.n_ctx 2 --method.num_negatives 4 --method.negative_words "
              f"{ROOT / 'tests' / 'data' / 'negative_words'} --method.lr 0.05",
    # OOD detection in the evaluation (eval.ood): every client's AUROC / FPR95 travel as metric records
    "PromptFL-ood": "--method PromptFL --data.subsample_classes base --data.num_classes 6 --eval.ood [novel] "
                    "--eval.ood_scores [msp,energy,mcm,neglabel] --eval.ood_negative_count 8 --eval.ood_negatives "
                    f"{ROOT / 'tests' / 'data' / 'negative_words'}",
}


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def same(a, b, key: str = "") -> bool:
    """Row values equal (losses within 1e-6 relative, NaN equals NaN)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b if "loss" not in key else abs(a - b) <= 1e-6 * abs(b)
    return a == b


def assert_rows_equal(got: list[dict], expected: list[dict], skip: tuple = ()) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert set(g) - set(skip) == set(e) - set(skip), (g, e)
        for key in e:
            if key not in skip:
                assert same(g[key], e[key], key), (g["round"], key, g[key], e[key])


def fit(args: str, out_dir: Path) -> Path:
    from fedprompt.__main__ import main

    main(["fit", "--config", SMOKE, *args.split(), "--federation.parallel_clients", "1", "--out_dir", str(out_dir)])
    return out_dir


def checkpoint(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)


def assert_states_equal(got: dict, expected: dict, atol: float = 0.0) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol)


@pytest.mark.parametrize("method", list(METHODS))
def test_flower_app_equals_fit(method, tmp_path):
    """Flower's message path (every message serialised as on the wire), 4 nodes: the metrics rows and every
    client's final prompts of fit --federation.parallel_clients 1, bit for bit."""
    args = f"{COMMON} {METHODS[method]}"
    run_local(SMOKE, f"{args} --out_dir {tmp_path / 'flower'}", report_states=True)
    reference = fit(args, tmp_path / "fit")
    assert_rows_equal(rows(tmp_path / "flower"), rows(reference))
    got, expected = checkpoint(tmp_path / "flower"), checkpoint(reference)
    assert got["round"] == expected["round"] == 3
    assert_states_equal(got["global"], expected["global"])
    for cid, state in expected["clients"].items():
        assert_states_equal(got["clients"][cid], state)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["local_acc"] == json.loads((reference / "summary.json").read_text())["local_acc"]


@slow
@pytest.mark.parametrize("method", list(METHODS))
def test_simulation_engine_equals_fit(method, tmp_path):
    """Flower's simulation engine (Ray backend, one virtual SuperNode per client): the rows and prompts, local
    prompts included, equal fit's. FedOTP with FEDPROMPT_FLOWER_SLOW=1 (about 3 minutes on 2 busy cores); every
    method with FEDPROMPT_FLOWER_ALL=1."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (pip install \"flwr[simulation]\")")
    if method != "FedOTP" and not os.environ.get("FEDPROMPT_FLOWER_ALL"):
        pytest.skip("one method through Ray by default (every method runs through Flower's in-process message "
                    "path above); FEDPROMPT_FLOWER_ALL=1 runs them all through Ray")
    from fedprompt.flower.simulation import simulate

    args = f"{COMMON} {METHODS[method]}"
    simulate(SMOKE, f"{args} --out_dir {tmp_path / 'sim'}", report_states=True)
    reference = fit(args, tmp_path / "fit")
    assert_rows_equal(rows(tmp_path / "sim"), rows(reference))
    got, expected = checkpoint(tmp_path / "sim"), checkpoint(reference)
    for cid, state in expected["clients"].items():  # other processes: equal here, allowed float rounding elsewhere
        assert_states_equal(got["clients"][cid], state, atol=1e-6)


def test_bad_nodes_are_left_out(tmp_path, capfd):
    """A node without a partition id, one beyond the config's clients and one whose config differs: one line each on
    the side that finds it; the round goes on with the good node, the unserved client is a failed client."""
    nodes = [{"partition-id": 0}, {}, {"partition-id": 7}, {"partition-id": 1, "args": "--method.n_ctx 8"}]
    run_local(SMOKE, f"{TWO} --federation.rounds 1 --out_dir {tmp_path / 'run'}", node_configs=nodes)
    err = capfd.readouterr().err
    assert err.count("this node has no partition-id") == 1
    assert err.count("node-config partition-id=7: this config makes 2 clients") == 1
    assert err.count("its config differs from the server's in hparams (n_ctx: 4 vs 8); shapes") == 1
    (row,) = rows(tmp_path / "run")
    assert row["clients"] == [0, 1] and row["failed_clients"] == {"1": "no node holds this client"}
    run_local(SMOKE, f"{TWO} --federation.rounds 1 --out_dir {tmp_path / 'alone'}", node_configs=nodes[:1])
    assert_rows_equal([row], rows(tmp_path / "alone"))  # as if only the good node had joined
    assert row["client_acc"][1] is None and row["bytes_up"] == row["bytes_down"] // 2  # NaN: null in strict JSON
    assert (tmp_path / "run" / "summary.json").is_file()


def test_resume_with_restarted_nodes(tmp_path):
    """Two rounds, then every node restarted (fresh contexts: the clients' states come from their state files) and
    the server resumed from checkpoints/last.ckpt: the rows and FedOTP's local prompts of an uninterrupted run."""
    args = f"{TWO} {METHODS['FedOTP']} --federation.rounds 3"
    nodes = [{"partition-id": i, "state-dir": str(tmp_path / f"node{i}")} for i in range(2)]
    straight = [{"partition-id": i, "state-dir": str(tmp_path / f"straight{i}")} for i in range(2)]
    run_local(SMOKE, f"{args} --out_dir {tmp_path / 'straight'}", node_configs=straight)
    run_local(SMOKE, f"{args} --federation.rounds 2 --out_dir {tmp_path / 'run'}", node_configs=nodes)
    assert len(rows(tmp_path / "run")) == 2
    resume = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_local(SMOKE, f"{args} --resume {resume} --out_dir {tmp_path / 'run'}", node_configs=nodes)
    assert_rows_equal(rows(tmp_path / "run"), rows(tmp_path / "straight"))
    assert checkpoint(tmp_path / "run")["clients"] == {}  # local prompts never left the nodes
    for i in range(2):
        got = torch.load(tmp_path / f"node{i}" / f"client-{i}.pt", weights_only=True)["versions"][3]
        expected = torch.load(tmp_path / f"straight{i}" / f"client-{i}.pt", weights_only=True)["versions"][3]
        assert_states_equal(got, expected)


def test_secure_aggregation_within_quantisation_error(tmp_path, capfd):
    """SecAgg+ (Flower's workflow and client mod) gives the plain weighted mean of FedOTP's global prompts within the
    stated bound; the clients' metrics are the plain run's. FedMGP's selection cannot be a secure sum: one line."""
    from fedprompt.flower.secure import error_bound

    args = f"{COMMON} {METHODS['FedOTP']} --federation.rounds 1"
    run_local(SMOKE, f"{args} --out_dir {tmp_path / 'plain'}")
    run_local(SMOKE, f"{args} --out_dir {tmp_path / 'secure'}", secure_aggregation=True)
    plain, secure = checkpoint(tmp_path / "plain")["global"], checkpoint(tmp_path / "secure")["global"]
    bound = error_bound([15, 19, 14, 16], 8.0, 2 ** 22)  # the smoke split's train sizes
    diff = (plain["global_prompt.ctx"] - secure["global_prompt.ctx"]).abs().max().item()
    assert 0 < diff <= bound < 1e-5
    # accuracies are the plain run's; the calibration error follows the confidences, moved by the quantisation error
    calibration = ("ece", "client_ece", "calibration")
    got, expected = rows(tmp_path / "secure"), rows(tmp_path / "plain")
    assert_rows_equal(got, expected, skip=calibration)
    for g, e in zip(got, expected):
        assert g["ece"] == pytest.approx(e["ece"], abs=1e-5) and g["client_ece"] == pytest.approx(e["client_ece"],
                                                                                              abs=1e-5)
    assert checkpoint(tmp_path / "secure")["flower"]["secure_aggregation"] is True
    capfd.readouterr()
    from fedprompt.errors import FedPromptError

    with pytest.raises(FedPromptError):
        run_local(SMOKE, f"{args} --method FedMGP --method.n_ctx 2 --out_dir {tmp_path / 'mgp'}",
                  secure_aggregation=True)
    assert "secure-aggregation: FedMGP's aggregator (FedMGPAggregator) needs every client's upload" in \
        capfd.readouterr().err


def test_app_options_bad_key():
    from fedprompt.errors import FedPromptError
    from fedprompt.flower.options import AppOptions

    with pytest.raises(FedPromptError, match="unknown key\\(s\\) rounds; the fedprompt app takes"):
        AppOptions.from_config({"config": SMOKE, "rounds": 3})
    with pytest.raises(FedPromptError, match="secure-aggregation='maybe' is not a bool"):
        AppOptions.from_config({"config": SMOKE, "secure-aggregation": "maybe"})
    assert AppOptions.from_config({"config": SMOKE, "timeout": 5}).timeout == 5.0


# --------------------------------------------------------------------------------------------- deployment
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, deadline: float, what: str, procs=()) -> None:
    while not predicate():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[0]} exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _started_by_us(ports: list[int]) -> list[int]:
    """The processes whose command line names one of our ports (the SuperExec and app processes that Flower starts
    in sessions of their own, so they are not in our process groups)."""
    marks = [f"127.0.0.1:{port}" for port in ports]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(mark in cmdline for mark in marks):
                found.append(int(entry.name))
    return found


@slow
def test_deployment_superlink_two_supernodes(tmp_path):
    """`flwr run` against a SuperLink and two SuperNodes (separate processes, 127.0.0.1, insecure, free ports): round
    1 equals Flower's in-process run of the same app; the SuperNode of client 1 is killed during round 2, which
    completes with client 0 (client 1 in failed_clients, as an in-process run whose node 2 stops answering); every
    file written stays readable, and every process is stopped."""
    bindir = Path(sys.executable).parent
    tools = {name: shutil.which(name, path=str(bindir)) or shutil.which(name)
             for name in ("flower-superlink", "flower-supernode", "flwr")}
    if not all(tools.values()):
        pytest.skip(f"Flower's command-line tools are not installed ({', '.join(k for k, v in tools.items() if not v)})")
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")]),
        "FLWR_DISABLE_UPDATE_CHECK": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    logs = []

    def start(*cmd, log):
        logs.append(open(tmp_path / log, "w"))  # noqa: SIM115 - closed at the end of the test
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=tmp_path, start_new_session=True,
                                stdout=logs[-1], stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def stop(proc):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the node and the processes it started (SuperExec, ClientApp)
            proc.wait(timeout=30)

    args = f"{TWO} {METHODS['FedOTP']} --federation.rounds 2 --out_dir {out}"
    deadline = time.monotonic() + 900
    try:
        link = start(tools["flower-superlink"], "--insecure", "--host", "127.0.0.1", "--port", link_port,
                     "--disable-runtime-dependency-installation", log="superlink.log")
        _wait(lambda: socket.socket().connect_ex(("127.0.0.1", link_port)) == 0, deadline, "the SuperLink", [link])
        node_ports = [_free_port(), _free_port()]
        nodes = [start(tools["flower-supernode"], "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--host",
                       "127.0.0.1", "--port", node_ports[i], "--node-config",
                       f"partition-id={i} state-dir='{tmp_path / f'state{i}'}'", log=f"supernode{i}.log")
                 for i in range(2)]
        time.sleep(3)
        submitted = subprocess.run([tools["flwr"], "run", str(ROOT / "flower"), "test", "--run-config",
                                    f"config='{SMOKE}' args='{args}' timeout=300.0"], env=env, cwd=tmp_path,
                                   capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        metrics = out / "metrics.jsonl"
        _wait(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, deadline, "round 1", [link])
        time.sleep(1.0)  # round 2's train messages are out: its ClientApp is starting or training
        stop(nodes[1])
        _wait(lambda: (out / "summary.json").is_file(), deadline, "the end of the run", [link])
    finally:
        for proc in procs:
            stop(proc)
        ports = [link_port, *locals().get("node_ports", [])]
        for pid in _started_by_us(ports):  # what Flower started beside them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for handle in logs:
            handle.close()
    assert all(proc.poll() is not None for proc in procs)
    time.sleep(1)
    assert not _started_by_us(ports)
    got = rows(out)
    reference = tmp_path / "reference"
    run_local(SMOKE, args.replace(str(out), str(reference)), down_from={2: 2})
    expected = rows(reference)
    assert_rows_equal(got, expected, skip=("failed_clients",))
    assert "failed_clients" not in got[0] and set(got[1]["failed_clients"]) == {"1"}
    assert checkpoint(out)["round"] == 2
    killed = torch.load(tmp_path / "state1" / "client-1.pt", weights_only=True)  # what the killed node wrote
    assert 1 in killed["versions"]
