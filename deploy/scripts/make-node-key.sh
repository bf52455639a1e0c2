#!/bin/sh
# Make a SuperNode key pair (ECDSA P-384, OpenSSH format): KEY and KEY.pub. Kept if present.
#   deploy/scripts/make-node-key.sh /var/lib/perspective/node_key
set -eu
[ $# -eq 1 ] || { echo "usage: $0 KEY_PATH" >&2; exit 2; }
exec python -c 'import sys; from pathlib import Path; from coordinator.security import make_node_key
print(make_node_key(Path(sys.argv[1]))[1])' "$1"
