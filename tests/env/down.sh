#!/usr/bin/env bash
# Stop everything tests/env/up.sh started (by PID / process group). Caches are kept.
#   bash tests/env/down.sh           # stop
#   bash tests/env/down.sh --purge   # stop and delete the state dir (data, certs, logs)
set -euo pipefail

SECONDS=0
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

purge=false
for arg in "$@"; do
	case "$arg" in
	--purge) purge=true ;;
	-h | --help)
		sed -n '2,4p' "$0"
		exit 0
		;;
	*) die "unknown argument: $arg (expected --purge)" ;;
	esac
done

if [[ ! -d "$TESTENV_DIR" ]]; then
	log "nothing to do: $TESTENV_DIR does not exist"
	exit 0
fi

exec 9>"$TESTENV_DIR/.lock"
flock -w 60 9 || die "another up.sh/down.sh holds $TESTENV_DIR/.lock"

IS_ROOT=false
[[ "$(id -u)" == 0 ]] && IS_ROOT=true
# shellcheck source=node.sh
source "$SCRIPT_DIR/node.sh"

if [[ -d "$PIDS_DIR" ]]; then
	for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
		svc="${SERVICES[i]}"
		case "$svc" in
		containerd)
			node_stop_containers
			svc_stop containerd TERM 15
			node_release
			;;
		postgres) svc_stop postgres INT 30 ;; # fast shutdown via the postmaster
		seaweedfs)
			svc_stop seaweedfs TERM 15
			# weed leaves unix sockets named after its ports in /tmp
			for p in $(svc_ports seaweedfs); do rm -f "${TMPDIR:-/tmp}"/seaweedfs-*-"$p".sock; done
			;;
		*) svc_stop "$svc" TERM 15 ;;
		esac
	done
fi

if $purge; then
	$IS_ROOT && node_purge_host
	pg_dir="$TESTENV_DIR/postgres"
	if [[ -L "$pg_dir" ]]; then
		target="$(readlink "$pg_dir")"
		[[ "$target" == "$(pg_fallback_dir)" ]] && rm -rf "$target"
	fi
	exec 9>&-
	rm -rf "$TESTENV_DIR"
	log "stopped; purged $TESTENV_DIR (caches kept in $TESTENV_CACHE)"
else
	log "stopped (state kept in $TESTENV_DIR; caches in $TESTENV_CACHE)"
fi
