"""A multi-site deployment's credentials and commands: a certificate authority, the SuperLink's
TLS certificate, one ECDSA key per site for node authentication, the `flwr` connection entry
and the key registration.

Flower 1.41 wants: the SuperLink started with ``--ssl-ca-certfile --ssl-certfile
--ssl-keyfile`` (a server certificate whose SAN names the address the sites dial) and
``--enable-supernode-auth``; each site's public key registered with ``flwr supernode register
KEY.pub CONNECTION``; each SuperNode started with ``--root-certificates`` (the CA) and
``--auth-supernode-private-key`` (a NIST-curve ECDSA key in OpenSSH format).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedad.config import ExperimentConfig
from fedad.experiment import ExperimentData, prepare_data

CURVE = ec.SECP384R1()
"""Curve of every key: P-384 (Flower accepts NIST curves for node authentication)."""


class DeployError(ValueError):
    """A deployment input is unusable; the message names the argument or file."""


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files of one certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """A site's authentication key pair in OpenSSH format (``site-0`` and ``site-0.pub``)."""

    private: Path
    public: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def _write_certificate(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                       files: CertificateFiles) -> CertificateFiles:
    """The certificate as PEM and its private key as unencrypted PKCS#8 PEM (mode 600)."""
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedad"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise DeployError(f"days={days}: a certificate must be valid for at least one day")
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def create_ca(out_dir: str | Path, *, days: int = 365) -> CertificateFiles:
    """A self-signed certificate authority: ``ca.crt`` (the sites' ``--root-certificates``)
    and ``ca.key`` (keep it off the sites)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedad CA")).issuer_name(_name("fedad CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_certificate(cert, key, CertificateFiles(out / "ca.crt", out / "ca.key"))


def subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for the SuperLink's addresses: IPs as IPAddress, anything else as DNSName."""
    if not hosts:
        raise DeployError("--san: give at least one IP address or DNS name of the SuperLink")
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:"):
                raise DeployError(f"--san {host!r}: not an IP address or DNS name") from None
            names.append(x509.DNSName(host))
    return names


def create_server_certificate(ca: CertificateFiles, out_dir: str | Path, hosts: Sequence[str],
                              *, days: int = 365) -> CertificateFiles:
    """The SuperLink's certificate ``server.pem`` / ``server.key``, signed by ``ca``, valid for
    every name in ``hosts`` (IP addresses and/or DNS names the sites use to reach it)."""
    try:
        ca_cert = x509.load_pem_x509_certificate(Path(ca.cert).read_bytes())
        ca_key = serialization.load_pem_private_key(Path(ca.key).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise DeployError(f"{ca.cert} / {ca.key}: cannot read the CA ({err})") from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "superlink")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write_certificate(cert, key, CertificateFiles(out / "server.pem", out / "server.key"))


def create_node_key(out_dir: str | Path, name: str) -> NodeKey:
    """A site's ECDSA P-384 key pair in OpenSSH format: ``name`` (the SuperNode's
    ``--auth-supernode-private-key``) and ``name.pub`` (registered at the SuperLink)."""
    if not name or "/" in name:
        raise DeployError(f"site name {name!r}: must be a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    files = NodeKey(out / name, out / f"{name}.pub")
    files.private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
    files.private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    files.public.write_bytes(public + f" fedad-{name}\n".encode())
    return files


def write_connection(flwr_home: str | Path, name: str, address: str,
                     root_certificates: str | Path, *, default: bool = False) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``, with
    TLS verified against ``root_certificates``; other entries are kept. Returns the file."""
    if ":" not in address:
        raise DeployError(f"--address {address!r}: expected HOST:PORT")
    certs = Path(root_certificates).expanduser().resolve()
    if not certs.is_file():
        raise DeployError(f"--root-certificates {str(certs)!r}: no such file")
    path = Path(flwr_home).expanduser() / "config.toml"
    try:
        config = tomli.loads(path.read_text()) if path.is_file() else {}
    except tomli.TOMLDecodeError as err:
        raise DeployError(f"{path}: not valid TOML ({err})") from err
    superlinks = config.setdefault("superlink", {})
    superlinks[name] = {"address": address, "root-certificates": str(certs)}
    if default or "default" not in superlinks:
        superlinks["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def flower_tool(name: str) -> str:
    """A Flower executable (``flwr``, ``flower-superlink``, ``flower-supernode``): the one next
    to this Python interpreter, else the bare name (found on PATH)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def register_node(public_key: str | Path, connection: str, *,
                  env: dict[str, str] | None = None, timeout: float = 60.0) -> int:
    """``flwr supernode register KEY.pub CONNECTION``: the node id the SuperLink assigned.

    ``env`` (default: this process's) selects the FLWR_HOME that holds ``connection``.
    """
    if not Path(public_key).is_file():
        raise DeployError(f"{public_key}: no such public key file")
    done = subprocess.run(
        [flower_tool("flwr"), "supernode", "register", str(public_key), connection,
         "--format", "json"],
        env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
        if reply.get("success"):
            return int(reply["node-id"])
    except (ValueError, KeyError):
        pass
    raise DeployError(f"flwr supernode register {public_key} {connection} failed "
                      f"(exit {done.returncode}): {(done.stdout + done.stderr).strip()[-1500:]}")


def superlink_command(certs: CertificateFiles, ca_cert: str | Path, *, host: str = "0.0.0.0",
                      port: int = 8000, database: str | Path = "") -> list[str]:
    """The SuperLink's command line: TLS with ``certs`` and SuperNode authentication on."""
    command = [flower_tool("flower-superlink"), "--ssl-ca-certfile", str(ca_cert),
               "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
               "--enable-supernode-auth", "--host", host, "--port", str(port)]
    return [*command, "--database", str(database)] if database else command


def supernode_command(superlink: str, ca_cert: str | Path, private_key: str | Path, *,
                      partition_id: int, data_path: str | Path, port: int = 9094) -> list[str]:
    """One site's SuperNode command line: TLS, its authentication key, and node-config with
    its own data folder and partition id (``port``: its local ClientApp API)."""
    node_config = f'data-path="{data_path}" partition-id={int(partition_id)}'
    return [flower_tool("flower-supernode"), "--superlink", superlink,
            "--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(private_key),
            "--node-config", node_config, "--port", str(port)]


def local_site_data(cfg: ExperimentConfig, partition_id: int) -> ExperimentData:
    """A deployed site's data: its whole ``data-path`` folder (split by the MVTec protocol into
    train/val as usual), labelled as partition ``partition_id`` so that the site keeps its
    identity (seeds, ACA/CFA statistics) across the federation."""
    if partition_id < 0:
        raise DeployError(f"node-config partition-id={partition_id}: must be >= 0")
    data = prepare_data(cfg, 1)
    manifest = data.manifest.copy()
    manifest.loc[manifest["partition"] == 0, "partition"] = partition_id
    return dataclasses.replace(data, manifest=manifest)
