"""Certificates and kubeconfig for the local control plane, made with the openssl command line.

One throwaway CA signs the API server's serving certificate (127.0.0.1, localhost and the
in-cluster names) and an admin client certificate in group `system:masters`. A separate key pair
signs service-account tokens, so TokenRequest and projected tokens work as in a real cluster.
P-256 keys: generated in milliseconds, accepted by every Kubernetes component.
"""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

SERVING_NAMES = (
    "IP:127.0.0.1",
    "IP:10.0.0.1",  # the `kubernetes` Service's ClusterIP in 10.0.0.0/24
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Pki:
    """Paths of everything `make_pki` writes into one folder (field `ca_crt` is file `ca.crt`)."""

    ca_crt: Path
    ca_key: Path
    serving_crt: Path
    serving_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def in_folder(cls, folder: Path) -> Pki:
        return cls(**{f.name: folder / f.name.replace("_", ".") for f in fields(cls)})


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path.name,
             cwd=path.parent)  # fmt: skip
    path.chmod(0o600)


def _signed_cert(folder: Path, name: str, subject: str, extensions: list[str]) -> None:
    """Make `<name>.key` and `<name>.crt` signed by the CA, with the given v3 extensions."""
    key, csr, crt = (folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    _key(key)
    _openssl("req", "-new", "-key", key.name, "-subj", subject, "-out", csr.name, cwd=folder)
    ext_file = folder / f"{name}.ext"
    ext_file.write_text("\n".join(extensions) + "\n")
    _openssl("x509", "-req", "-in", csr.name, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "825", "-sha256", "-extfile", ext_file.name, "-out", crt.name, cwd=folder)  # fmt: skip
    csr.unlink()
    ext_file.unlink()


def make_pki(folder: Path) -> Pki:
    """Create CA, serving cert, admin client cert and service-account key pair (once per folder)."""
    pki = Pki.in_folder(folder)
    if pki.sa_pub.exists():
        return pki
    folder.mkdir(parents=True, exist_ok=True)
    _key(pki.ca_key)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=ftj-local-ca", "-days", "3650",
             "-sha256", "-out", "ca.crt", cwd=folder)  # fmt: skip
    usage = "keyUsage = critical, digitalSignature, keyEncipherment"
    _signed_cert(
        folder,
        "serving",
        "/CN=kube-apiserver",
        [usage, "extendedKeyUsage = serverAuth", "subjectAltName = " + ",".join(SERVING_NAMES)],
    )
    _signed_cert(folder, "admin", "/O=system:masters/CN=ftj-admin", [usage, "extendedKeyUsage = clientAuth"])
    _key(pki.sa_key)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)
    return pki


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, *, pki: Pki, server: str, context: str) -> None:
    """A self-contained kubeconfig (certificates embedded) whose cluster and context are `context`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": context, "cluster": {"server": server, "certificate-authority-data": _b64(pki.ca_crt)}}
        ],
        "users": [
            {
                "name": f"{context}-admin",
                "user": {
                    "client-certificate-data": _b64(pki.admin_crt),
                    "client-key-data": _b64(pki.admin_key),
                },
            }
        ],
        "contexts": [{"name": context, "context": {"cluster": context, "user": f"{context}-admin"}}],
        "current-context": context,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
