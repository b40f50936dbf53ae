#!/usr/bin/env bash
# demo.sh - the README's first command. On a fresh Debian 12 machine, as root: installs and starts
# a local Slurm and a local Rucio server (tests/services/), generates a tree of 240 files, and
# uploads it as the unprivileged user 'dacuser' through a real Slurm job array (4 tasks, at most
# 2 at once) into the local Rucio; the collector job writes summary.json, whose path is printed.
#
#   DEMO_DIR    where the demo tree, job file and runs go (default /tmp/dac-upload-demo)
#   DEMO_FILES  number of files (default 240)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
export DAC_CI_DIR=$CI_DIR
DEMO_DIR=${DEMO_DIR:-/tmp/dac-upload-demo}
DEMO_FILES=${DEMO_FILES:-240}
[ "$(id -u)" = 0 ] || { echo "tests/demo.sh: run as root (sudo): it installs and starts Slurm and Rucio" >&2; exit 1; }

DAC_RUCIO_PG=${DAC_RUCIO_PG:-0} bash "$HERE/services/up.sh"   # the demo needs no PostgreSQL server

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
cat > "$DEMO_DIR/jobs/demo.toml" <<TOML
# Demo job written by tests/demo.sh: upload the generated tree into the local Rucio.
[source]
root = "../data/$RUN_TAG"
include = ["**/*.fits"]

[rucio]
host = "http://127.0.0.1:18080"     # the local test server (tests/services/start-rucio.sh)
account = "root"
auth_type = "userpass"
username = "ddmlab"
password_file = "../rucio.password"
scope = "test"
rse = "LOCAL_DISK"

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
