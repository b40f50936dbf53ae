#!/bin/bash
# ca.sh - a private grid CA for the local grid stack (start-grid.sh), idempotently.
# Owned by dac-upload (adapted from shared/reference/prodstack).
#
# Makes (under $GRID_BASE/ca, default /tmp/dac-upload-ci/grid/ca):
#   certificates/          X509_CERT_DIR: CA cert as <hash>.0 (+ old-style hash link), an empty
#                          CRL <hash>.r0, a Globus <hash>.signing_policy and <hash>.namespace
#   host/hostcert.pem,key  host cert CN=localhost, SAN DNS:localhost + IP:127.0.0.1 (root-owned)
#   xrd/xrdcert.pem,key    a copy of the host cert/key owned by the 'xrootd' user (XRootD
#                          refuses a key that is not its own / not 0400)
#   user/usercert.pem,key  the grid user's cert, owned by $GRID_USER (dacuser), DN below
#   ~$GRID_USER/.globus/x509up_dac   an RFC 3820 proxy made with grid-proxy-init (Globus), 12 h
#                          (renewed when less than 2 h are left or the user cert changed)
# Nothing listens; nothing outside $GRID_BASE and ~$GRID_USER/.globus is touched.
# Packages (start-grid.sh installs them): openssl, globus-proxy-utils (grid-proxy-init),
# voms-clients (voms-proxy-info).
set -euo pipefail
BASE=${GRID_BASE:-${DAC_CI_DIR:-/tmp/dac-upload-ci}/grid}
CA=$BASE/ca
USER_NAME=${GRID_USER:-dacuser}
USER_HOME=$(getent passwd "$USER_NAME" | cut -d: -f6)
PROXY=${GRID_PROXY:-$USER_HOME/.globus/x509up_dac}
CA_DN="/DC=org/DC=prodstack/CN=ProdStack Test CA"
USER_DN="/DC=org/DC=prodstack/O=ProdStack/OU=Users/CN=DAC Test User"
HOST_DN="/DC=org/DC=prodstack/O=ProdStack/CN=localhost"
T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[grid-ca %4d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }

# put SRC DEST MODE [OWNER]: DEST becomes a copy of SRC only if it differs (content, mode,
# owner), by a rename: start-grid.sh runs again while xrootd and Apache serve (the tests
# restart the Rucio server that way), and they must never read one of these files half
# rewritten (truncated, then filled)
put() {
  local src=$1 dest=$2 mode=$3 owner=${4:-root}
  if cmp -s "$src" "$dest" && [ "$(stat -c %a:%U "$dest")" = "$mode:$owner" ]; then return 0; fi
  install -m "$mode" -o "$owner" "$src" "$dest.new" && mv -f "$dest.new" "$dest"
}
link() {   # link TARGET NAME: a symlink, made again only if it points elsewhere
  [ "$(readlink "$2" 2>/dev/null)" = "$1" ] || ln -sfn "$1" "$2"
}

command -v grid-proxy-init > /dev/null || { log "grid-proxy-init missing: run start-grid.sh"; exit 1; }
mkdir -p "$CA"/{private,certificates,host,xrd,user,newcerts}
chmod 700 "$CA/private"

# ---------------------------------------------------------------- 1. the CA (10 years)
if [ ! -s "$CA/ca.pem" ]; then
  log "creating CA $CA_DN"
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "$CA_DN" \
    -keyout "$CA/private/ca.key" -out "$CA/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2> /dev/null
  : > "$CA/index.txt"; echo 1000 > "$CA/serial"; echo 1000 > "$CA/crlnumber"
fi
cat > "$CA/openssl.cnf" <<EOF
[ca]
default_ca = pca
[pca]
dir = $CA
database = \$dir/index.txt
serial = \$dir/serial
crlnumber = \$dir/crlnumber
new_certs_dir = \$dir/newcerts
certificate = \$dir/ca.pem
private_key = \$dir/private/ca.key
default_md = sha256
default_days = 825
default_crl_days = 3650
policy = anything
unique_subject = no
copy_extensions = none
[anything]
domainComponent = optional
organizationName = optional
organizationalUnitName = optional
commonName = supplied
[host_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[user_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment,dataEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

sign() { # sign NAME DN EXT -> $CA/NAME.pem, $CA/private/NAME.key
  local name=$1 dn=$2 ext=$3
  [ -s "$CA/$name.pem" ] && return 0
  log "issuing $name certificate $dn"
  openssl req -new -newkey rsa:2048 -nodes -subj "$dn" -keyout "$CA/private/$name.key" -out "$CA/$name.csr" 2> /dev/null
  # -multivalue-rdn not needed; -preserveDN keeps the DC/O/OU/CN order of the request
  openssl ca -batch -config "$CA/openssl.cnf" -extensions "$ext" -preserveDN -notext \
    -in "$CA/$name.csr" -out "$CA/$name.pem" > "$CA/$name.ca.log" 2>&1 || { cat "$CA/$name.ca.log"; exit 1; }
}
sign host "$HOST_DN" host_ext
sign user "$USER_DN" user_ext

# ---------------------------------------------------------------- 2. X509_CERT_DIR
H=$(openssl x509 -hash -noout -in "$CA/ca.pem")
HOLD=$(openssl x509 -subject_hash_old -noout -in "$CA/ca.pem")
put "$CA/ca.pem" "$CA/certificates/$H.0" 644
link "$H.0" "$CA/certificates/$HOLD.0"
# the CRL (empty, valid 10 years): made once per CA (the CA is made again when ca.pem is gone)
if [ ! -s "$CA/certificates/$H.r0" ] || [ "$CA/ca.pem" -nt "$CA/certificates/$H.r0" ]; then
  openssl ca -config "$CA/openssl.cnf" -gencrl -out "$CA/crl.new" 2> /dev/null
  put "$CA/crl.new" "$CA/certificates/$H.r0" 644; rm -f "$CA/crl.new"
fi
link "$H.r0" "$CA/certificates/$HOLD.r0"
cat > "$CA/signing_policy.new" <<EOF
access_id_CA      X509         '$CA_DN'
pos_rights        globus        CA:sign
cond_subjects     globus       '"/DC=org/DC=prodstack/*"'
EOF
put "$CA/signing_policy.new" "$CA/certificates/$H.signing_policy" 644
cat > "$CA/namespace.new" <<EOF
TO Issuer "$CA_DN" PERMIT Subject "/DC=org/DC=prodstack/.*"
EOF
put "$CA/namespace.new" "$CA/certificates/$H.namespace" 644
rm -f "$CA/signing_policy.new" "$CA/namespace.new"
link "$H.signing_policy" "$CA/certificates/$HOLD.signing_policy"
link "$H.namespace" "$CA/certificates/$HOLD.namespace"
chmod 755 "$CA" "$CA/certificates"

# ---------------------------------------------------------------- 3. host and user credentials
put "$CA/host.pem" "$CA/host/hostcert.pem" 644
put "$CA/private/host.key" "$CA/host/hostkey.pem" 400
id xrootd > /dev/null 2>&1 && XRD_OWNER=xrootd || XRD_OWNER=root
put "$CA/host.pem" "$CA/xrd/xrdcert.pem" 644 "$XRD_OWNER"
put "$CA/private/host.key" "$CA/xrd/xrdkey.pem" 400 "$XRD_OWNER"
chown "$XRD_OWNER" "$CA/xrd"
put "$CA/user.pem" "$CA/user/usercert.pem" 644 "$USER_NAME"
put "$CA/private/user.key" "$CA/user/userkey.pem" 400 "$USER_NAME"
chown "$USER_NAME" "$CA/user"; chmod 700 "$CA/user"

# ---------------------------------------------------------------- 4. the RFC 3820 proxy
install -d -m 700 -o "$USER_NAME" -g "$(id -gn "$USER_NAME")" "$(dirname "$PROXY")"
left=$(runuser -u "$USER_NAME" -- openssl x509 -noout -checkend 7200 -in "$PROXY" > /dev/null 2>&1 && echo ok || echo renew)
# a proxy from an older user cert (a re-made CA) is renewed too: the proxy file ends with the
# cert that signed it, which must be this usercert.pem byte for byte (a re-made CA's user cert
# starts with the same bytes - same serial, same DNs - so only the whole cert tells them apart)
if [ "$left" = ok ] && ! runuser -u "$USER_NAME" -- sed -n '/BEGIN CERTIFICATE/,/END CERTIFICATE/p' "$PROXY" \
    | tail -n "$(wc -l < "$CA/user/usercert.pem")" | cmp -s - "$CA/user/usercert.pem"; then left=renew; fi
if [ "$left" = renew ]; then
  log "grid-proxy-init (RFC 3820, 12 h) -> $PROXY"
  runuser -u "$USER_NAME" -- env X509_CERT_DIR="$CA/certificates" \
    grid-proxy-init -rfc -valid 12:00 -cert "$CA/user/usercert.pem" -key "$CA/user/userkey.pem" \
    -out "$PROXY" > "$CA/grid-proxy-init.log" 2>&1 || { cat "$CA/grid-proxy-init.log"; exit 1; }
fi
chmod 600 "$PROXY"
log "CA hash $H; X509_CERT_DIR=$CA/certificates"
log "user DN: $(openssl x509 -noout -subject -nameopt compat -in "$CA/user/usercert.pem" | sed 's/^subject=//')"
runuser -u "$USER_NAME" -- env X509_CERT_DIR="$CA/certificates" voms-proxy-info -file "$PROXY" -all 2>&1 | sed 's/^/    /'
