#!/usr/bin/env bash
# Print HLM's Redis ACL file (`aclfile`) to stdout. Passwords come from the environment, never from arguments
# (`ps` shows arguments), and are written as SHA-256 (`#hex`), so the file holds no password in clear:
#   HLM_REDIS_WRITER_PASSWORD  user hlm-writer: the jobs (publish, gc, rollback, the refresh lease)
#   HLM_REDIS_READER_PASSWORD  user hlm-reader: serving replicas and probes (read hlm:* keys, hear hlm:* events)
#   HLM_REDIS_ADMIN_PASSWORD   user hlm-admin (optional): operators, every command
# The default user is off: every client names its user. On Kubernetes (docs/cluster.md):
#   infra/redis/users-acl.sh | kubectl create secret generic hlm-redis-acl --from-file=users.acl=/dev/stdin
# tests/reliability/test_redis_acl.py runs a redis-server with what this prints.
set -euo pipefail
: "${HLM_REDIS_WRITER_PASSWORD:?set HLM_REDIS_WRITER_PASSWORD}" "${HLM_REDIS_READER_PASSWORD:?set HLM_REDIS_READER_PASSWORD}"
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }   # printf is a builtin: the password is in no argv
# Only hlm:* keys and channels; nothing @dangerous or @admin (FLUSHALL, KEYS, CONFIG, DEBUG, MIGRATE, ...).
scope="resetkeys ~hlm:* resetchannels &hlm:* -@all +@connection +select"
echo "user default off resetkeys resetchannels -@all"
# Replicas: GET/LRANGE/EXISTS/SCAN and SUBSCRIBE; no SET, DEL, PUBLISH or EVAL.
echo "user hlm-reader on #$(sha "$HLM_REDIS_READER_PASSWORD") $scope +@read +subscribe +unsubscribe -@admin -@dangerous"
# Jobs: also writes, MULTI/EXEC/WATCH, PUBLISH, and EVAL for the lease's compare-and-delete.
echo "user hlm-writer on #$(sha "$HLM_REDIS_WRITER_PASSWORD") $scope +@read +@write +@transaction +publish +eval +evalsha -@admin -@dangerous"
if [[ -n "${HLM_REDIS_ADMIN_PASSWORD:-}" ]]; then
  echo "user hlm-admin on #$(sha "$HLM_REDIS_ADMIN_PASSWORD") ~* &* +@all"
fi
