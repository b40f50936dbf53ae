#!/usr/bin/env bash
# demo.sh - the README's first command. On a fresh Debian 12 machine, as root: installs and starts
# a local Slurm and a local Rucio server (tests/services/), generates a tree of 240 files, and
# uploads it as the unprivileged user 'dacuser' through a real Slurm job array (4 tasks, at most
# 2 at once) into the local Rucio; the collector job writes summary.json, whose path is printed.
#
#   DEMO_DIR    where the demo tree, job file and runs go (default /tmp/dac-upload-demo)
#   DEMO_FILES  number of files (default 240)
#   DEMO_STACK  plain (default): Rucio on plain HTTP with a password, a POSIX RSE;
#               grid: the production-like stack (tests/services/start-grid.sh): Rucio on HTTPS
#               with an RFC 3820 X.509 proxy, XRootD storage through gfal2, no rename
#   DEMO_RSE    with DEMO_STACK=grid: ECHO_ROOT (root://, default) or ECHO_DAVS (davs://)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
export DAC_CI_DIR=$CI_DIR
DEMO_DIR=${DEMO_DIR:-/tmp/dac-upload-demo}
DEMO_FILES=${DEMO_FILES:-240}
[ "$(id -u)" = 0 ] || { echo "tests/demo.sh: run as root (sudo): it installs and starts Slurm and Rucio" >&2; exit 1; }

DEMO_STACK=${DEMO_STACK:-plain}
case $DEMO_STACK in
  plain) GRID=0 ;;
  grid) GRID=1; DEMO_RSE=${DEMO_RSE:-ECHO_ROOT} ;;
  *) echo "tests/demo.sh: DEMO_STACK is plain or grid, not '$DEMO_STACK'" >&2; exit 2 ;;
esac
# the demo needs no PostgreSQL server, and the grid stack only when asked for
DAC_RUCIO_PG=${DAC_RUCIO_PG:-0} DAC_GRID=${DAC_GRID:-$GRID} bash "$HERE/services/up.sh"

# a fresh demo area owned by the demo user; the test server's password in a file only it reads
RUN_TAG=$(date -u +%Y%m%dT%H%M%S)
mkdir -p "$DEMO_DIR/jobs"
( umask 077; printf 'secret\n' > "$DEMO_DIR/rucio.password" )
"$CI_DIR/venv/bin/python" - "$DEMO_DIR/data/$RUN_TAG" "$DEMO_FILES" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
for i in range(n):
    d = os.path.join(root, f"visit{i % 6:03d}", f"detector{i % 4:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"calexp_{i:05d}.fits"), "wb") as fh:
        fh.write(rng.randbytes(rng.randint(1024, 256 * 1024)))
print(f"demo tree: {n} files under {root}")
PY
if [ "$DEMO_STACK" = grid ]; then
  RUCIO_SECTION="[rucio]
host = \"https://127.0.0.1:18443\"    # the local HTTPS Rucio (tests/services/start-grid.sh)
account = \"dacuser\"
auth_type = \"x509_proxy\"
proxy = \"/home/dacuser/.globus/x509up_dac\"   # made by grid-proxy-init -rfc
ca_dir = \"$CI_DIR/grid/ca/certificates\"      # the private test CA
scope = \"test\"
rse = \"$DEMO_RSE\"                  # XRootD through gfal2, rename denied as on Echo"
else
  RUCIO_SECTION="[rucio]
host = \"http://127.0.0.1:18080\"     # the local test server (tests/services/start-rucio.sh)
account = \"root\"
auth_type = \"userpass\"
username = \"ddmlab\"
password_file = \"../rucio.password\"
scope = \"test\"
rse = \"LOCAL_DISK\""
fi
cat > "$DEMO_DIR/jobs/demo.toml" <<TOML
# Demo job written by tests/demo.sh: upload the generated tree into the local Rucio.
[source]
root = "../data/$RUN_TAG"
include = ["**/*.fits"]

$RUCIO_SECTION
[naming]
prefix = "demo/$RUN_TAG/"

[batching]
files_per_batch = 60
max_running = 2

[slurm]
time = "00:30:00"
mem = "1G"

[container]
runtime = "none"
TOML
chown -R dacuser: "$DEMO_DIR"

cd "$DEMO_DIR"
echo "+ dac-upload doctor jobs/demo.toml    (as dacuser)"
runuser -u dacuser -- env HOME=/home/dacuser PATH="$CI_DIR/venv/bin:/usr/bin:/bin" \
  dac-upload doctor jobs/demo.toml
echo "+ dac-upload submit jobs/demo.toml --wait    (as dacuser)"
runuser -u dacuser -- env HOME=/home/dacuser PATH="$CI_DIR/venv/bin:/usr/bin:/bin" \
  dac-upload submit jobs/demo.toml --wait --timeout 1800
