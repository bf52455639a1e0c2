#!/bin/sh
# Make the network CA (kept if present) and a server certificate for the given host names/IPs.
#   deploy/scripts/make-tls.sh OUT_DIR fleet.example.org 203.0.113.7
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR HOST [HOST...]" >&2; exit 2; }
out=$1; shift
exec python -c 'import sys; from pathlib import Path; from coordinator.security import make_tls
t = make_tls(Path(sys.argv[1]), sys.argv[2:]); print(t.ca_cert, t.cert, t.key, sep="\n")' "$out" "$@"
