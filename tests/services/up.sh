#!/usr/bin/env bash
# up.sh - bring up everything the demo and the integration tests need, as root, idempotently:
# install.sh (Debian packages, user dacuser, the venv with this checkout), the local Slurm, the
# plain-HTTP Rucio servers (SQLite, and PostgreSQL for DID metadata) and the production-like grid
# stack (start-grid.sh: HTTPS + X.509 Rucio, XRootD over root:// and davs://, gfal2).
# Every piece lives under DAC_CI_DIR (default /tmp/dac-upload-ci).
#   DAC_RUCIO_PG=0  no PostgreSQL server     DAC_GRID=0  no grid stack (the plain demo needs neither)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
export DAC_CI_DIR=$CI_DIR
export SLURM_CI_DIR=${SLURM_CI_DIR:-$CI_DIR/slurm} RUCIO_BASE=${RUCIO_BASE:-$CI_DIR/rucio}
[ "$(id -u)" = 0 ] || { echo "$0: run as root (sudo): it installs and starts Slurm and Rucio" >&2; exit 1; }

T0=$SECONDS
bash "$HERE/install.sh"
bash "$HERE/start-slurm.sh"
mkdir -p "$CI_DIR"
bash "$HERE/start-rucio.sh" > "$CI_DIR/start-rucio.log" 2>&1 \
  || { cat "$CI_DIR/start-rucio.log" >&2; exit 1; }
grep '^\[start-rucio' "$CI_DIR/start-rucio.log" | tail -n 2
# the POSIX RSE is a local directory: the uploading user (dacuser) must be able to write it
chown -R dacuser: "$RUCIO_BASE/rse"
# A second Rucio server, on PostgreSQL, sharing the venvs: Rucio keeps free-form DID metadata
# (rubin_butler, rubin_sidecar) in its JSON plugin, which it disables on SQLite. The Butler
# integration tests use it; DAC_RUCIO_PG=0 skips it (the demo does not need it).
if [ "${DAC_RUCIO_PG:-1}" = 1 ]; then
  PG_BASE=${RUCIO_PG_BASE:-$CI_DIR/rucio-pg}
  RUCIO_VENVS=$RUCIO_BASE RUCIO_BASE=$PG_BASE RUCIO_PORT=18081 RUCIO_DB=postgres \
    bash "$HERE/start-rucio.sh" > "$CI_DIR/start-rucio-pg.log" 2>&1 \
    || { cat "$CI_DIR/start-rucio-pg.log" >&2; exit 1; }
  grep '^\[start-rucio' "$CI_DIR/start-rucio-pg.log" | tail -n 1
  chown -R dacuser: "$PG_BASE/rse"
fi
if [ "${DAC_GRID:-1}" = 1 ]; then
  bash "$HERE/start-grid.sh"
fi
echo "[up.sh] services up after $((SECONDS - T0)) s"
