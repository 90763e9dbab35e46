# Sourced by the other scripts: make sure PostgreSQL answers at $DATABASE_URL (or the default).
#
# If nothing listens there and PostgreSQL's server binaries are installed, start a private cluster
# under target/pgdata (as the `postgres` OS user when run as root, since initdb refuses root). If they
# are not installed, say exactly what to install.

: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/jobqueue}"
export DATABASE_URL

_pg_hostport() {
    # postgres://user[:pw]@host[:port]/db?params -> "host port"
    local rest=${DATABASE_URL#*://}
    rest=${rest#*@}
    rest=${rest%%/*}
    rest=${rest%%\?*}
    local host=${rest%%:*} port=5432
    [[ $rest == *:* ]] && port=${rest##*:}
    [[ -z $host ]] && host=127.0.0.1
    echo "$host $port"
}

_pg_listening() {
    local host=$1 port=$2
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

_pg_bindir() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
        return
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) /usr/local/pgsql/bin; do
        if [[ -x $d/initdb && -x $d/pg_ctl ]]; then
            echo "$d"
            return
        fi
    done
    return 1
}

ensure_postgres() {
    local host port
    read -r host port < <(_pg_hostport)
    if _pg_listening "$host" "$port"; then
        return 0
    fi
    case $host in
        127.0.0.1|localhost|::1) ;;
        *) echo "PostgreSQL is not reachable at $host:$port (DATABASE_URL). Start it, or point DATABASE_URL at a running server." >&2
           return 1 ;;
    esac
    local bindir
    if ! bindir=$(_pg_bindir); then
        cat >&2 <<MSG
PostgreSQL is not reachable at $host:$port and no PostgreSQL server is installed.
Install one, for example:
    sudo apt-get install postgresql        # Debian, Ubuntu
    brew install postgresql@16             # macOS
or start one with Docker: docker compose up -d postgres
or set DATABASE_URL to a server you have.
MSG
        return 1
    fi
    local top; top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    local data="$top/target/pgdata"
    local as=()
    if [[ $(id -u) == 0 ]]; then
        if ! id postgres >/dev/null 2>&1; then
            useradd --system --home-dir "$data" --shell /bin/bash postgres
        fi
        as=(runuser -u postgres --)
    fi
    mkdir -p "$top/target"
    if [[ ! -s $data/PG_VERSION ]]; then
        echo "Starting a private PostgreSQL cluster in $data (port $port)" >&2
        mkdir -p "$data"
        [[ ${#as[@]} -gt 0 ]] && chown postgres "$data"
        chmod 700 "$data"
        "${as[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >"$top/target/pg-initdb.log" 2>&1 || {
            cat "$top/target/pg-initdb.log" >&2; return 1; }
    fi
    [[ ${#as[@]} -gt 0 ]] && chown -R postgres "$data"
    # A scratch cluster for development and tests: durability traded for speed, room for parallel tests.
    "${as[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
        -o "-p $port -c listen_addresses=$host -c unix_socket_directories=$data -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >&2 || {
        tail -n 30 "$data/server.log" >&2; return 1; }
    for _ in $(seq 1 50); do
        _pg_listening "$host" "$port" && return 0
        sleep 0.2
    done
    echo "PostgreSQL did not start; see $data/server.log" >&2
    return 1
}
