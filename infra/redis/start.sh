#!/usr/bin/env bash
# Start a project-owned redis-server on loopback: start.sh PORT DIR [redis-server options...]. Prints its pid;
# stop with `kill PID`. Extra options override redis.conf, e.g. `--appendonly yes --appendfsync always`.
set -euo pipefail
port=${1:?usage: start.sh PORT DIR}
dir=${2:?usage: start.sh PORT DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # redis-server chdirs to --dir before opening --logfile: a relative DIR must not reach it
redis-server "$here/redis.conf" --port "$port" --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" \
  --logfile "$dir/redis.log" ${REDIS_PASSWORD:+--requirepass "$REDIS_PASSWORD"} "${@:3}"
for _ in $(seq 50); do
  redis-cli -p "$port" ${REDIS_PASSWORD:+-a "$REDIS_PASSWORD" --no-auth-warning} ping >/dev/null 2>&1 && { cat "$dir/redis.pid"; exit 0; }
  sleep 0.1
done
echo "redis-server did not answer on port $port; see $dir/redis.log" >&2
exit 1
