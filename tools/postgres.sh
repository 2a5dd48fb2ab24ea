#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the tests of `fastnet sweep --storage postgresql://...`.
#
#   tools/postgres.sh start PORT [FOLDER]  prints "URL FOLDER": a new server's database URL and the folder it
#                                          lives in; or, given FOLDER, that stopped server's, started again
#   tools/postgres.sh stop FOLDER          stops that server (its folder stays, to start again)
#   tools/postgres.sh remove FOLDER        stops it and removes its folder
#
# It needs Debian's postgresql package (apt-get install postgresql), whose server is not started here:
# every server this script starts has its own folder, a random password and no other users. PostgreSQL
# will not run as root, so as root the server runs as the package's postgres user.
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin 2> /dev/null | sort -V | tail -n 1)
if [[ -z "$bin" ]]; then
    echo "tools/postgres.sh: PostgreSQL is not installed: apt-get install postgresql" >&2
    exit 2
fi
as_server() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
    port=${2:?usage: tools/postgres.sh start PORT [FOLDER]}
    folder=${3:-}
    if [[ -z "$folder" ]]; then
        folder=$(mktemp -d /tmp/fastnet-postgres.XXXXXX)
        (umask 077; od -An -N12 -tx1 /dev/urandom | tr -d ' \n' > "$folder/password")
        if [[ $(id -u) == 0 ]]; then chown -R postgres: "$folder"; fi
        as_server "$bin/initdb" -D "$folder/data" -U fastnet --pwfile="$folder/password" --auth=scram-sha-256 \
            -E UTF8 > "$folder/initdb.log"
    fi
    password=$(cat "$folder/password")
    as_server "$bin/pg_ctl" -D "$folder/data" -l "$folder/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$folder -c fsync=off" start \
        > /dev/null
    echo "postgresql://fastnet:$password@127.0.0.1:$port/postgres $folder"
    ;;
stop | remove)
    folder=${2:?usage: tools/postgres.sh $1 FOLDER}
    if [[ -f "$folder/data/postmaster.pid" ]]; then
        as_server "$bin/pg_ctl" -D "$folder/data" -m immediate -w stop > /dev/null
    fi
    if [[ $1 == remove ]]; then rm -rf "$folder"; fi
    ;;
*)
    echo "usage: tools/postgres.sh start PORT [FOLDER] | stop FOLDER | remove FOLDER" >&2
    exit 2
    ;;
esac
