#!/bin/bash
# rse.sh - register the XRootD endpoint of xrootd.sh in the HTTPS Rucio of rucio-https.sh,
# idempotently, and make the client venvs see Debian's gfal2. Run after both (as root; it uses
# the root/userpass client). Owned by dac-upload (adapted from shared/reference/prodstack).
#
#   ECHO_ROOT  one protocol: root://localhost:11094//rucio/   impl rucio.rse.protocols.gfal.NoRename
#   ECHO_DAVS  one protocol: davs://localhost:18444/rucio/    impl rucio.rse.protocols.gfal.NoRename
#   (GRID_RSE_IMPL=rucio.rse.protocols.gfal.Default for the renaming implementation instead)
# Both deterministic (lfn2pfn 'hash' from the server's [policy]), verify_checksum left at its
# default (True), the quota of dacuser and root unlimited. Host 'localhost', not 127.0.0.1:
# XrdSecgsi checks the server certificate's CN against the host name in the URL.
#
# Debian's python3-gfal2 is a module of /usr/bin/python3.11, not visible in a venv: it is
# linked into the test venv ($DAC_CI_DIR/venv: dac-upload's worker) and the Rucio client venv
# ($DAC_CI_DIR/rucio/cli: the stock `rucio upload` of the benchmark).
set -euo pipefail
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
BASE=${GRID_BASE:-$CI_DIR/grid}
IMPL=${GRID_RSE_IMPL:-rucio.rse.protocols.gfal.NoRename}
XPORT=${GRID_XRD_PORT:-11094}
HPORT=${GRID_HTTP_PORT:-18444}
T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[grid-rse %4d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }

GFAL_SO=$(/usr/bin/python3 -c 'import gfal2; print(gfal2.__file__)')
for venv in "$CI_DIR/venv" "$CI_DIR/rucio/cli"; do
  [ -x "$venv/bin/python" ] || continue
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ln -sf "$GFAL_SO" "$site/"
  "$venv/bin/python" -c 'import gfal2' || { log "gfal2 does not import in $venv"; exit 1; }
done
log "gfal2 $(/usr/bin/python3 -c 'import gfal2; print(gfal2.get_version())') linked into the venvs"

RUCIO_CONFIG=$BASE/rucio/etc/client-root.cfg IMPL=$IMPL XPORT=$XPORT HPORT=$HPORT "$CI_DIR/rucio/cli/bin/python" - <<'PY'
import os
from rucio.client import Client
c = Client()
impl = os.environ["IMPL"]
dom = {"lan": {"read": 1, "write": 1, "delete": 1},
       "wan": {"read": 1, "write": 1, "delete": 1, "third_party_copy_read": 1, "third_party_copy_write": 1}}
rses = {"ECHO_ROOT": {"scheme": "root", "hostname": "localhost", "port": int(os.environ["XPORT"]), "prefix": "//rucio/"},
        "ECHO_DAVS": {"scheme": "davs", "hostname": "localhost", "port": int(os.environ["HPORT"]), "prefix": "/rucio/"}}
have = [r["rse"] for r in c.list_rses()]
for rse, proto in rses.items():
    if rse not in have:
        c.add_rse(rse)
    for p in c.get_rse(rse)["protocols"]:
        if p["scheme"] == proto["scheme"] and (p["impl"] != impl or p["port"] != proto["port"]):
            c.delete_protocols(rse, p["scheme"], p["hostname"], p["port"])
    if not any(p["scheme"] == proto["scheme"] for p in c.get_rse(rse)["protocols"]):
        c.add_protocol(rse, dict(proto, impl=impl, domains=dom))
    for acc in ("dacuser", "root"):
        c.set_local_account_limit(acc, rse, -1)
    info = c.get_rse(rse)
    print(rse, [(p["scheme"], p["hostname"], p["port"], p["prefix"], p["impl"]) for p in info["protocols"]])
PY
log "done"
