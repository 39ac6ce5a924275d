#!/usr/bin/env bash
# Start a project-owned redis-server on loopback: start.sh PORT DIR [redis-server options...]. Prints its pid;
# stop with `kill PID`. Extra options override redis.conf, e.g. `--appendonly yes --appendfsync always`.
# $REDIS_PASSWORD (optional) becomes requirepass; with `--aclfile FILE`, $REDIS_USER/$REDIS_PASSWORD are the user
# the start-up ping authenticates as.
set -euo pipefail
port=${1:?usage: start.sh PORT DIR}
dir=${2:?usage: start.sh PORT DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # redis-server chdirs to --dir before opening --logfile: a relative DIR must not reach it
# $REDIS_PASSWORD goes into a file only this user can read, never onto a command line (`ps` shows those to all).
auth=()
if [[ -n "${REDIS_PASSWORD:-}" && -z "${REDIS_USER:-}" ]]; then
  quoted=${REDIS_PASSWORD//\\/\\\\}; quoted=${quoted//\"/\\\"}   # redis.conf escapes: \\ and \"
  (umask 077 && printf 'requirepass "%s"\n' "$quoted" > "$dir/auth.conf")
  auth=(--include "$dir/auth.conf")
fi
redis-server "$here/redis.conf" "${auth[@]}" --port "$port" --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" \
  --logfile "$dir/redis.log" "${@:3}"
# redis-cli reads the password from $REDISCLI_AUTH; $REDIS_USER names an ACL user (e.g. with --aclfile)
for _ in $(seq 50); do
  REDISCLI_AUTH="${REDIS_PASSWORD:-}" redis-cli -p "$port" ${REDIS_USER:+--user "$REDIS_USER"} ping 2>/dev/null \
    | grep -q PONG && { cat "$dir/redis.pid"; exit 0; }
  sleep 0.1
done
echo "redis-server did not answer on port $port; see $dir/redis.log" >&2
exit 1
