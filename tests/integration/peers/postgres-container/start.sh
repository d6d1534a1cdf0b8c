#!/bin/sh
# Make a cluster with the role and database of POSTGRES_USER, POSTGRES_DB and
# POSTGRES_PASSWORD, then serve it on 127.0.0.1:5432 in the foreground.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
data=/var/lib/postgresql/data
sockets=/var/run/postgresql
"$bin/initdb" -D "$data" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=trust \
    --auth-host=scram-sha-256 >/dev/null
"$bin/pg_ctl" -D "$data" -o "-c listen_addresses='' -k $sockets" -w start >/dev/null
psql -h "$sockets" -U postgres -v ON_ERROR_STOP=1 -q \
    -v user="$POSTGRES_USER" -v password="$POSTGRES_PASSWORD" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
SQL
createdb -h "$sockets" -U postgres -O "$POSTGRES_USER" "$POSTGRES_DB"
"$bin/pg_ctl" -D "$data" -w stop >/dev/null
exec "$bin/postgres" -D "$data" -c listen_addresses=127.0.0.1 -k "$sockets"
