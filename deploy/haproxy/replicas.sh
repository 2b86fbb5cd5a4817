#!/bin/sh
# Print the replica list for haproxy.cfg: one server per engine replica.
#   deploy/haproxy/replicas.sh 8081 8082 8083 > /run/yinshi-haproxy/engines.cfg
# Arguments are ports on 127.0.0.1 or host:port pairs; none: $ENGINE_REPLICA_PORTS (default "8081 8082").
set -eu
[ $# -gt 0 ] || set -- ${ENGINE_REPLICA_PORTS:-8081 8082}
out="backend engines"
for r in "$@"; do
    case $r in
        *:*) addr=$r ;;
        *[!0-9]*|'') echo "replicas.sh: not a port or host:port: '$r'" >&2; exit 2 ;;
        *) addr=127.0.0.1:$r ;;
    esac
    # Named by port, as the systemd instances are (yinshi-engine@8081 is engine-8081 in HAProxy's log).
    out="$out
    server engine-${r##*:} $addr"
done
printf '%s\n' "$out"
