#!/bin/bash
# start-grid.sh - the production-like grid stack, on loopback, idempotently (as root, Debian 12):
#   a private CA and an RFC 3820 proxy for dacuser (grid/ca.sh)
#   -> Rucio 41 over HTTPS with X.509 auth: Apache + mod_ssl + mod_wsgi + mod_gridsite (grid/rucio-https.sh)
#   -> XRootD 5.5, root:// (GSI) and davs:// (XrdHttp over TLS), rename denied, checksums
#      computed by the server (grid/xrootd.sh)
#   -> RSEs ECHO_ROOT and ECHO_DAVS (gfal2 NoRename) and gfal2 in the venvs (grid/rse.sh).
# Needs install.sh and start-rucio.sh first (dacuser, the venvs, the Rucio server venv).
# Everything lives under $GRID_BASE (default $DAC_CI_DIR/grid); stop-grid.sh stops it by PID.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
export DAC_CI_DIR=$CI_DIR GRID_BASE=${GRID_BASE:-$CI_DIR/grid}
[ "$(id -u)" = 0 ] || { echo "$0: run as root (it installs Debian packages and starts servers)" >&2; exit 1; }
mkdir -p "$GRID_BASE/log"
T0=$SECONDS

PKGS="apache2 libapache2-mod-wsgi-py3 gridsite xrootd-server xrootd-server-plugins xrootd-plugins
  xrootd-client xrootd-client-plugins python3-gfal2 gfal2 gfal2-plugin-xrootd gfal2-plugin-http
  gfal2-plugin-file gfal2-util-scripts python3-gfal2-util globus-proxy-utils voms-clients gcc"
# shellcheck disable=SC2086
if ! dpkg -s $PKGS > /dev/null 2>&1; then
  echo "[start-grid] installing Apache, mod_wsgi, gridsite, XRootD, gfal2, Globus proxy tools"
  export DEBIAN_FRONTEND=noninteractive
  # no daemon of Debian's own is started (Apache on *:80 would be): no init system runs here,
  # and policy-rc.d says no where there is one
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; DROP_POLICY=1; }
  apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $PKGS > "$GRID_BASE/log/apt.log" 2>&1 || {
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $PKGS > "$GRID_BASE/log/apt.log" 2>&1 \
      || { tail -30 "$GRID_BASE/log/apt.log"; exit 1; }; }
  [ "${DROP_POLICY:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
for part in ca rucio-https xrootd rse; do
  bash "$HERE/grid/$part.sh" > "$GRID_BASE/log/$part.out" 2>&1 || { cat "$GRID_BASE/log/$part.out" >&2; exit 1; }
  grep '^\[grid' "$GRID_BASE/log/$part.out" | tail -n 1
done
echo "[start-grid] grid stack up after $((SECONDS - T0)) s: https://127.0.0.1:${GRID_RUCIO_PORT:-18443}," \
  "root://localhost:${GRID_XRD_PORT:-11094}, davs://localhost:${GRID_HTTP_PORT:-18444}"
