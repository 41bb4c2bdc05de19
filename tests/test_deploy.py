"""Deployment: certificates, node keys, the flwr connection entry, and a real TLS +
node-authentication deployment (a SuperLink and SuperNodes on 127.0.0.1, free ports)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import tomli
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedad.data import generate_dataset
from fedad.deploy import (
    DeployError,
    create_ca,
    create_node_key,
    create_server_certificate,
    flower_tool,
    register_node,
    superlink_command,
    supernode_command,
    write_connection,
)
from fedad.simulation import FLWR_ENV, run_status

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_server_certificate_is_signed_by_the_ca_for_every_san(tmp_path):
    ca = create_ca(tmp_path)
    server = create_server_certificate(ca, tmp_path, ["127.0.0.1", "superlink.example.org"])
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)  # raises if the signature or issuer is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.key.stat().st_mode & 0o077 == 0  # private key readable by its owner only
    with pytest.raises(DeployError, match="--san"):
        create_server_certificate(ca, tmp_path, ["not a host"])


def test_node_keys_are_distinct_ecdsa_openssh_pairs(tmp_path):
    keys = [create_node_key(tmp_path, f"site-{i}") for i in range(2)]
    publics = []
    for key in keys:
        private = serialization.load_ssh_private_key(key.private.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(key.public.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert key.private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        publics.append(key.public.read_bytes().split()[1])
    assert publics[0] != publics[1]


def test_connection_entry_is_added_without_losing_others(tmp_path):
    ca = create_ca(tmp_path)
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n'
                                          '[superlink.local]\naddress = ":local:"\n')
    write_connection(tmp_path, "sites", "10.0.0.5:8000", ca.cert)
    config = tomli.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert config["default"] == "local" and config["local"]["address"] == ":local:"
    assert config["sites"] == {"address": "10.0.0.5:8000", "root-certificates": str(ca.cert)}
    with pytest.raises(DeployError, match="HOST:PORT"):
        write_connection(tmp_path, "bad", "10.0.0.5", ca.cert)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Processes:
    """Processes started by a test, each in its own session, stopped by PID (group) at the
    end, whether the test passed or not."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []

    def start(self, command: list[str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed in stop_all)
        proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc, _ in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            log.close()


@pytest.fixture
def processes(tmp_path):
    home = tmp_path / "flwr-home"
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(home),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    procs = _Processes(env, tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@pytest.mark.slow
def test_tls_deployment_with_node_authentication_runs_two_rounds(tmp_path, processes):
    certs, keys_dir = tmp_path / "certs", tmp_path / "keys"
    ca = create_ca(certs)
    server = create_server_certificate(ca, certs, ["127.0.0.1", "localhost"])
    keys = [create_node_key(keys_dir, name) for name in ("site-0", "site-1", "intruder")]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    write_connection(processes.env["FLWR_HOME"], "fedad-test", address, ca.cert, default=True)
    sites = [generate_dataset(tmp_path / f"site-{i}", seed=i + 1, categories=["washer"],
                              num_train=8, num_test_good=2, num_test_per_defect=2)
             for i in range(2)]
    server_data = generate_dataset(tmp_path / "server", seed=0, categories=["washer"],
                                   num_train=4, num_test_good=4, num_test_per_defect=3)

    superlink = processes.start(superlink_command(server, ca.cert, host="127.0.0.1", port=port),
                                "superlink")
    _wait_for_port(port)
    node_ids = {register_node(key.public, "fedad-test", env=processes.env) for key in keys[:2]}
    assert len(node_ids) == 2
    for i, key in enumerate(keys):
        data = sites[i] if i < 2 else sites[0]
        processes.start(supernode_command(address, ca.cert, key.private, partition_id=i,
                                          data_path=data, port=_free_port()), key.private.name)

    results = tmp_path / "results"
    run_config = (f"num-server-rounds=2 local-epochs=1 max-train-batches=2 batch-size=4 "
                  f"image-size=64 backbone='none' val-fraction=0.0 plot-every-round=false "
                  f"category='washer' data-path='{server_data}' results-dir='{results}'")
    run = subprocess.run(
        [flower_tool("flwr"), "run", str(PROJECT_ROOT), "fedad-test", "--run-config",
         run_config, "--stream"],
        env=processes.env, capture_output=True, text=True, timeout=240, check=False)
    match = re.search(r"Successfully started run (\d+)", run.stdout + run.stderr)
    assert match, run.stdout[-3000:] + run.stderr[-3000:]
    status = run_status(int(match.group(1)), processes.env)
    assert status == "finished:completed", run.stdout[-3000:] + processes.log("superlink")[-3000:]
    assert superlink.poll() is None

    summary = json.loads((results / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["rounds"] == 2
    rounds = pd.read_csv(results / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    assert "train_loss" in rounds and rounds["train_loss"].notna().all()  # both sites trained
    payloads = (results / "payloads.jsonl").read_text().splitlines()
    crossings = [json.loads(line) for line in payloads]
    assert {c["node"] for c in crossings if c["accepted"]} == node_ids

    intruder = processes.started[-1][0]
    assert intruder.wait(timeout=60) != 0, "a SuperNode with an unregistered key was accepted"
    assert "No SuperNode found with the given public key" in processes.log("superlink")


def test_cli_writes_credentials_and_refuses_bad_names(tmp_path, capsys):
    from fedad.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path / "c"), "--san", "10.1.2.3"]) == 0
    assert main(["deploy", "keys", "--out", str(tmp_path / "k"), "--sites", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "site-0", "site-0.pub", "site-1", "site-1.pub", "site-2", "site-2.pub"]
    assert main(["deploy", "commands", "--certs", str(tmp_path / "c"), "--keys",
                 str(tmp_path / "k"), "--host", "10.1.2.3", "--sites", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("flower-supernode --superlink 10.1.2.3:8000") == 2
    assert "--enable-supernode-auth" in out and "partition-id=1" in out
    assert main(["deploy", "certs", "--out", str(tmp_path / "bad"), "--san", "a/b"]) == 1
    assert "--san 'a/b'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
