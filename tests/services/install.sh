#!/usr/bin/env bash
# install.sh - everything dac-upload's demo and tests need on a fresh Debian 12 machine (as root):
#   Debian packages (python3-venv, chromium for the report's browser test; Slurm and munge come
#   with start-slurm.sh), an unprivileged
#   user 'dacuser' (real users are never root: the end-to-end tests submit as this user), and a
#   virtual environment with dac-upload installed from this checkout (not editable, so the
#   shipped templates are what runs) plus the test tools.
#
#   DAC_CI_DIR   where the venv and the services live (default /tmp/dac-upload-ci)
#   DAC_EDITABLE 1 = 'pip install -e' instead (developers); default 0
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
VENV=$CI_DIR/venv
RUCIO_VERSION=${RUCIO_VERSION:-41.5.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (it installs Debian packages)" >&2; exit 1; }
log() { printf '[install %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The venv is built on Debian's /usr/bin/python3: it must be usable by dacuser and by Slurm jobs,
# and a Python under /root (pyenv) is not readable by other users.
if ! /usr/bin/python3 -c "import venv, ensurepip" 2>/dev/null; then
  log "apt-get install python3 python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi
# the report test opens dac-upload's HTML page in a real headless browser
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  log "apt-get install chromium chromium-driver (the report's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
if ! id dacuser >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash dacuser
  log "created user dacuser"
fi
mkdir -p "$CI_DIR"
chmod 755 "$CI_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV"
  log "created $VENV"
fi
SPEC="$REPO[test,butler,docs]"   # butler: the Butler integration tests; docs: mkdocs
if [ "${DAC_EDITABLE:-0}" = 1 ]; then set -- -e "$SPEC"; else set -- --force-reinstall --no-deps "$REPO"; fi
pip_install() {  # quiet on success, the whole log on failure
  if ! "$VENV/bin/pip" install -q "$@" > "$CI_DIR/pip.log" 2>&1; then
    grep -v '^WARNING: Location' "$CI_DIR/pip.log" >&2; exit 1
  fi
}
# dependencies first (cached after the first run), then this checkout itself, freshly built
pip_install "$SPEC" "rucio-clients==$RUCIO_VERSION"
pip_install "$@"
"$VENV/bin/dac-upload" --version >/dev/null
log "dac-upload $("$VENV/bin/dac-upload" --version | awk '{print $NF}') installed in $VENV"
