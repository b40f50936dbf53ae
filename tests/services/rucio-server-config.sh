#!/bin/bash
# rucio-server-config.sh - sourced by start-rucio.sh and grid/rucio-https.sh: the one Rucio
# server configuration both test servers use (generic policy, hash lfn2pfn, no metrics).
#   rucio_server_config DIR DBURL SITE_PACKAGES   writes DIR/etc/rucio.cfg and DIR/etc/alembic.ini
#   (logs in DIR/log; SITE_PACKAGES is the server venv's rucio package directory)
rucio_server_config() {
  local dir=$1 DBURL=$2 SP=$3
  cat > "$dir/etc/rucio.cfg" <<EOF
[common]
logdir = $dir/log
loglevel = INFO

[database]
default = $DBURL
pool_reset_on_return = rollback
echo = 0

[bootstrap]
userpass_identity = ddmlab
userpass_pwd = secret
userpass_email = root@localhost

[alembic]
cfg = $dir/etc/alembic.ini

[policy]
permission = generic
schema = generic
lfn2pfn_algorithm_default = hash

[monitor]
enable_metrics = False

# list_archive_content (GET /archives/SCOPE/NAME/files): not served by default; the packing
# tests read an archive's constituents with it
[api]
endpoints_add = archives
EOF
  cat > "$dir/etc/alembic.ini" <<EOF
[alembic]
sqlalchemy.url = $DBURL
script_location = $SP/db/sqla/migrate_repo/

[loggers]
keys = root,sqlalchemy,alembic
[handlers]
keys = console
[formatters]
keys = generic
[logger_root]
level = WARN
handlers = console
qualname =
[logger_sqlalchemy]
level = WARN
handlers =
qualname = sqlalchemy.engine
[logger_alembic]
level = WARN
handlers =
qualname = alembic
[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic
[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
EOF
}
