"""Throughput of the gRPC blob service on loopback: Put and Get of one large blob.

Measures end to end, as a participant sees it: ``put`` includes hashing on the client and
verification + fsync + rename on the server; ``get`` includes streaming into the cache,
sha256 verification and the atomic install. Runs without TLS and, unless ``--no-tls``, with
a throwaway CA and server certificate for 127.0.0.1.

Usage:
    python benchmarks/blob_bench.py [--mb 200] [--repeats 2] [--no-tls]
Writes ``benchmarks/results/blob_bench.json``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from coordinator.blob_server import BlobServer, TlsConfig
from shared_model.blobs import BlobClient, BlobStore, issue_token

RESULTS = Path(__file__).resolve().parent / "results" / "blob_bench.json"
KEY = b"blob-bench-signing-key-000000000"


def make_tls() -> tuple[bytes, TlsConfig]:
    """A throwaway CA (returned as PEM) and a server certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    window = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))

    def build(subject, public_key, extension):
        builder = x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
        builder = builder.public_key(public_key).serial_number(x509.random_serial_number())
        builder = builder.not_valid_before(window[0]).not_valid_after(window[1])
        return builder.add_extension(*extension).sign(ca_key, hashes.SHA256())

    ca = build(
        ca_name, ca_key.public_key(), (x509.BasicConstraints(ca=True, path_length=None), True)
    )
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = build(server_name, key.public_key(), (x509.SubjectAlternativeName([ip]), False))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), TlsConfig(cert.public_bytes(pem), key_pem)


def run_case(data: bytes, tls: bool, repeats: int, workdir: Path) -> dict[str, float]:
    """Best-of-``repeats`` MB/s of Put and Get of ``data`` through a fresh server."""
    ca_pem, tls_config = make_tls() if tls else (None, None)
    token = issue_token(KEY, "bench", read_all=True, upload_quota=repeats * len(data) + 1)
    put_s, get_s = [], []
    for i in range(repeats):
        store = BlobStore(workdir / f"server-{tls}-{i}")
        with BlobServer(store, KEY, tls=tls_config) as server:
            cache = BlobStore(workdir / f"cache-{tls}-{i}")
            client = BlobClient(server.address, token, cache=cache, tls_root_cert=ca_pem)
            start = time.perf_counter()
            content_id = client.put(data)
            put_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            path = client.get(content_id)
            get_s.append(time.perf_counter() - start)
            assert path.stat().st_size == len(data)
            client.close()
        for blob_store in (store, cache):
            blob_store.gc(set())
    mb = len(data) / 1e6
    return {
        "put_mb_s": round(mb / min(put_s), 1),
        "get_mb_s": round(mb / min(get_s), 1),
        "put_s": [round(s, 3) for s in put_s],
        "get_s": [round(s, 3) for s in get_s],
    }


def main() -> None:
    """Run the benchmark and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="blob size in MB (10^6 bytes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-tls", action="store_true")
    args = parser.parse_args()
    data = os.urandom(args.mb * 1_000_000)
    report = {
        "blob_mb": args.mb,
        "chunk_bytes": 1 << 20,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="blob-bench-") as tmp:
        for tls in [False] if args.no_tls else [False, True]:
            name = "tls" if tls else "insecure"
            report["cases"][name] = run_case(data, tls, args.repeats, Path(tmp))
            print(name, report["cases"][name], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(report, indent=2) + "\n")
    tmp_path.replace(RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
