#!/bin/bash
# rucio-https.sh - a Rucio 41 server over HTTPS with X.509 (RFC 3820 proxy) auth, behind
# Debian's Apache httpd + mod_ssl + mod_wsgi (+ mod_gridsite for the proxies), idempotently.
#
#   https://127.0.0.1:$GRID_RUCIO_PORT (default 18443), loopback only; its own SQLite DB under
#   $GRID_BASE/rucio (never the plain-HTTP server's); Apache started with its own config file
#   ($GRID_BASE/apache/httpd.conf), NOT Debian's /etc/apache2 (which would listen on *:80).
#   It also listens on 127.0.0.2 (still loopback), a host name the server certificate does
#   not carry: the tests' host-mismatch case.
# Owned by dac-upload (adapted from shared/reference/prodstack); start-grid.sh runs it.
#
# Needs ca.sh first (host cert, CA dir, user DN). Reuses the plain server's venv
# ($GRID_RUCIO_VENV, default $DAC_CI_DIR/rucio/srv, made by start-rucio.sh: rucio==41.5.1 on /usr/bin/python3.11,
# the same Python Debian's mod_wsgi 4.9.4 is built for) as mod_wsgi's python-home, read-only.
#
#   GRID_GRIDSITE=1 (default) load mod_gridsite: with OpenSSL 3 this is what lets mod_ssl accept
#                 RFC 3820 proxies (OPENSSL_ALLOW_PROXY_CERTS was removed from OpenSSL in 1.1;
#                 without gridsite the TLS handshake with a proxy fails, error 40
#                 "proxy certificates not allowed"). GRID_GRIDSITE=0 to see that.
#   GRID_RESET=1    stop the server (by PID) and wipe the DB.
# Accounts made: root (userpass ddmlab/secret, as the CI server), dacuser (USER, identity =
# the user cert's DN, x509; account attribute admin=True, see below), scopes user.dacuser, test.
# Stop: stop-grid.sh (by PID)
set -euo pipefail
CI_DIR=${DAC_CI_DIR:-/tmp/dac-upload-ci}
BASE=${GRID_BASE:-$CI_DIR/grid}
PORT=${GRID_RUCIO_PORT:-18443}
VENV=${GRID_RUCIO_VENV:-$CI_DIR/rucio/srv}
GRIDSITE=${GRID_GRIDSITE:-1}
CA=$BASE/ca
R=$BASE/rucio
A=$BASE/apache
USER_DN=$(openssl x509 -noout -subject -nameopt compat -in "$CA/user/usercert.pem" | sed 's/^subject=//')
T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[grid-rucio %4d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }
unset RUCIO_HOME VIRTUAL_ENV CONDA_PREFIX

# ---------------------------------------------------------------- 0. packages (Debian 12)
[ -x /usr/sbin/apache2 ] && [ -e /usr/lib/apache2/modules/mod_wsgi.so ] && [ -e /usr/lib/apache2/modules/mod_gridsite.so ] \
  || { log "apache2 / mod_wsgi / mod_gridsite missing: run start-grid.sh"; exit 1; }
WSGI_PY=$(ls /usr/lib/apache2/modules/mod_wsgi.so-3.* | sed 's/.*so-//')
VENV_PY=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$WSGI_PY" = "$VENV_PY" ] || { log "mod_wsgi is built for python$WSGI_PY, venv $VENV is python$VENV_PY"; exit 1; }
"$VENV/bin/python" -c "import rucio.version as v; print(v.version_string())" > /dev/null

mkdir -p "$R"/{etc,log,run} "$A"/{run,log,cache}
chown -R www-data:www-data "$R/log" "$R/run" "$A/cache"
SP=$("$VENV/bin/python" -c "import rucio, os; print(os.path.dirname(rucio.__file__))")
DBURL="sqlite:///$R/db/rucio.db"

# ---------------------------------------------------------------- 1. Rucio server config
. "$(dirname "$0")/../rucio-server-config.sh"
rucio_server_config "$R" "$DBURL" "$SP"
# the WSGI entry point: sets RUCIO_CONFIG before rucio is imported (mod_wsgi's SetEnv does
# not reach os.environ), and RUCIO_HTTPD_ENCODED_SLASHES_NO_DECODE=true because the vhost has
# 'AllowEncodedSlashes NoDecode' (as Rucio's server image): Apache then hands the DID name in
# the path over with its %2F still encoded, and without this variable Rucio looks up the name
# 'a%2Fb' (DataIdentifierNotFound for every DID whose name holds a '/'). GRID_NODECODE_ENV=0 shows it.
cat > "$R/etc/rucio.wsgi" <<EOF
import os
os.environ["RUCIO_CONFIG"] = "$R/etc/rucio.cfg"
$( [ "${GRID_NODECODE_ENV:-1}" = 1 ] && echo 'os.environ["RUCIO_HTTPD_ENCODED_SLASHES_NO_DECODE"] = "true"' )
from rucio.web.rest.flaskapi.v1.main import application  # noqa: E402,F401
EOF
# client configs: admin (root, userpass) and the grid user (dacuser, x509_proxy)
cat > "$R/etc/client-root.cfg" <<EOF
[client]
rucio_host = https://127.0.0.1:$PORT
auth_host = https://127.0.0.1:$PORT
auth_type = userpass
username = ddmlab
password = secret
account = root
ca_cert = $CA/certificates
request_retries = 3
auth_token_file_path = $R/run/token-root
EOF
cat > "$R/etc/client-x509.cfg" <<EOF
[client]
rucio_host = https://127.0.0.1:$PORT
auth_host = https://127.0.0.1:$PORT
auth_type = x509_proxy
account = dacuser
ca_cert = $CA/certificates
client_x509_proxy = $(getent passwd dacuser | cut -d: -f6)/.globus/x509up_dac
request_retries = 3
EOF
chmod 644 "$R/etc/"*

# ---------------------------------------------------------------- 2. database (SQLite, own file)
httpd_pid() { local p; p=$(cat "$A/run/httpd.pid" 2>/dev/null) && kill -0 "$p" 2>/dev/null && echo "$p"; }
if [ "${GRID_RESET:-0}" = 1 ]; then
  if p=$(httpd_pid); then log "GRID_RESET=1: stopping httpd $p"; kill "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.2; done; fi
  rm -rf "$R/db"
fi
mkdir -p "$R/db"
export RUCIO_CONFIG=$R/etc/rucio.cfg
if ! "$VENV/bin/python" -c "import sys; from sqlalchemy import inspect; from rucio.db.sqla.session import get_engine; sys.exit(0 if inspect(get_engine()).has_table('alembic_version') else 1)" 2> /dev/null; then
  log "building schema + root account (bootstrap.py) in $R/db/rucio.db"
  rm -f "$R/db/rucio.db"*
  "$VENV/bin/python" "$VENV/rucio/tools/bootstrap.py" > "$R/log/bootstrap.log" 2>&1 || { cat "$R/log/bootstrap.log"; exit 1; }
  "$VENV/bin/python" -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('pragma journal_mode=wal')" "$R/db/rucio.db"
fi
# the WSGI daemon runs as www-data: it must own the DB, its directory (WAL/SHM files) and logs
chown -R www-data:www-data "$R/db"

# ---------------------------------------------------------------- 3. Apache httpd config
GS_LOAD="# mod_gridsite not loaded (GRID_GRIDSITE=0)"; GS_CONF=""
if [ "$GRIDSITE" = 1 ]; then
  GS_LOAD="LoadModule gridsite_module /usr/lib/apache2/modules/mod_gridsite.so
GridSiteSessionsDir $A/cache"
  # as Rucio's own server image (RUCIO_HTTPD_GRID_SITE_ENABLED): GridSite verifies the chain
  # with proxies allowed (GSIProxyLimit) and exports GRST_CRED_* besides mod_ssl's SSL_*.
  # GridSiteAuth off: 'on' (Rucio's image default) also enforces GACL files and, with none
  # granting access, answers /auth/x509_proxy with 403; the proxy acceptance works either way.
  GS_CONF="<LocationMatch /auth/x509>
  GridSiteIndexes off
  GridSiteAuth off
  GridSiteGSIProxyLimit 16
  GridSiteEnvs on
 </LocationMatch>"
fi
cat > "$A/httpd.conf" <<EOF
# Apache for the local HTTPS Rucio (generated by rucio-https.sh; loopback only)
ServerRoot /etc/apache2
ServerName localhost
PidFile $A/run/httpd.pid
DefaultRuntimeDir $A/run
Mutex file:$A/run default
ErrorLog $A/log/error.log
LogLevel info ssl:info
LogFormat "%h %t \"%r\" %>s %b %D \"%{SSL_CLIENT_S_DN}x\" %{SSL_CLIENT_VERIFY}x" rucio
CustomLog $A/log/access.log rucio
User www-data
Group www-data
Listen 127.0.0.1:$PORT https
Listen 127.0.0.2:$PORT https

LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule authn_core_module /usr/lib/apache2/modules/mod_authn_core.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
LoadModule headers_module /usr/lib/apache2/modules/mod_headers.so
LoadModule unique_id_module /usr/lib/apache2/modules/mod_unique_id.so
LoadModule socache_shmcb_module /usr/lib/apache2/modules/mod_socache_shmcb.so
LoadModule ssl_module /usr/lib/apache2/modules/mod_ssl.so
LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so
$GS_LOAD
TypesConfig /etc/mime.types
StartServers 1
ServerLimit 2
ThreadsPerChild 16
MaxRequestWorkers 32
MinSpareThreads 8
MaxSpareThreads 32
SSLSessionCache shmcb:$A/run/ssl_scache(512000)
SSLRandomSeed startup builtin

# Rucio's WSGI daemon: ONE process, ONE thread = one request at a time, as the CI server's
# single gunicorn sync worker: SQLite takes no concurrent writers.
WSGIRestrictEmbedded On
WSGISocketPrefix $A/run/wsgi
WSGIDaemonProcess rucio processes=1 threads=1 python-home=$VENV display-name=rucio-https user=www-data group=www-data home=$R
WSGIApplicationGroup rucio

<VirtualHost 127.0.0.1:$PORT 127.0.0.2:$PORT>
 SSLEngine on
 SSLCertificateFile $CA/host/hostcert.pem
 SSLCertificateKeyFile $CA/host/hostkey.pem
 SSLCACertificatePath $CA/certificates
 SSLCARevocationPath $CA/certificates
 SSLCARevocationCheck chain
 SSLVerifyClient optional
 SSLVerifyDepth 10
 # grid DNs (/DC=.../CN=...) as Rucio identities are usually stored
 SSLOptions +StdEnvVars +ExportCertData +LegacyDNStringFormat
 SSLProtocol +TLSv1.2 +TLSv1.3
 AllowEncodedSlashes NoDecode
 Header set X-Rucio-Host "%{HTTP_HOST}e"
 RequestHeader add X-Rucio-RequestId "%{UNIQUE_ID}e"
 $GS_CONF
 WSGIScriptAlias / $R/etc/rucio.wsgi process-group=rucio application-group=rucio
 <Directory $R/etc>
  Require all granted
 </Directory>
</VirtualHost>
EOF
/usr/sbin/apache2 -f "$A/httpd.conf" -t > "$A/log/configtest.log" 2>&1 || { cat "$A/log/configtest.log"; exit 1; }

# ---------------------------------------------------------------- 4. start httpd (root; children www-data)
if p=$(httpd_pid); then
  log "httpd already running, pid $p: graceful reload"
  /usr/sbin/apache2 -f "$A/httpd.conf" -k graceful
else
  # OPENSSL_ALLOW_PROXY_CERTS=1 as Rucio's images set it: ignored by OpenSSL >= 1.1, kept for the record
  env -i PATH=/usr/sbin:/usr/bin:/bin LANG=C.UTF-8 OPENSSL_ALLOW_PROXY_CERTS=1 \
    /usr/sbin/apache2 -f "$A/httpd.conf" -k start
  log "httpd started, waiting for /ping"
fi
for i in $(seq 1 300); do
  PING=$(curl -s --max-time 5 --capath "$CA/certificates" "https://127.0.0.1:$PORT/ping") && [ -n "$PING" ] && break
  [ "$i" = 300 ] && { log "no /ping answer in 60 s"; tail -20 "$A/log/error.log"; exit 1; }
  sleep 0.2
done
log "server answers /ping: $PING (httpd pid $(cat "$A/run/httpd.pid"))"

# ---------------------------------------------------------------- 5. accounts, identity, scopes
# The grid user gets account 'dacuser' with the x509 identity of the user cert's DN.
# admin=True: Rucio's *generic* permission policy lets only root/admin accounts set replica
# states (perm_update_replicas_states) and add replicas on RSEs not named *SCRATCHDISK etc.
# (perm_add_replicas); a production VO's policy package decides this instead.
RUCIO_CONFIG=$R/etc/client-root.cfg DN="$USER_DN" "$VENV/bin/python" - <<'EOF'
import os
from rucio.client import Client
from rucio.common.exception import Duplicate
c = Client()
dn = os.environ["DN"]
if "dacuser" not in [a["account"] for a in c.list_accounts()]:
    c.add_account("dacuser", "USER", "dacuser@localhost")
try:
    c.add_identity("dacuser", dn, "X509", "dacuser@localhost", default=True)
except Duplicate:
    pass
try:
    c.add_account_attribute("dacuser", "admin", "True")
except Duplicate:
    pass
for scope, acc in (("user.dacuser", "dacuser"), ("test", "root")):
    try:
        c.add_scope(acc, scope)
    except Duplicate:
        pass
print("identities of dacuser:", [(i["type"], i["identity"]) for i in c.list_identities("dacuser")])
EOF
log "setup done; client configs: $R/etc/client-root.cfg (root/userpass), $R/etc/client-x509.cfg (dacuser/x509_proxy)"
