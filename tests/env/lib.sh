# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for tests/env/up.sh and tests/env/down.sh.
# Sourced, not executed. Expects SCRIPT_DIR to be set by the caller.

REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

# ---- versions (K8S_VERSION comes from controlplane/go.mod) -------------------
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$SCRIPT_DIR/controlplane/go.mod")"
KWOK_VERSION="${RECSYS_TESTENV_KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${RECSYS_TESTENV_HELM_VERSION:-v3.22.0}"
SEAWEEDFS_VERSION="${RECSYS_TESTENV_SEAWEEDFS_VERSION:-4.48}"
# CoreDNS comes from coredns/go.mod (a module of its own, so its dependencies never move the
# control plane's).
COREDNS_VERSION="$(awk '$1 == "github.com/coredns/coredns" { print $2; exit } $2 == "github.com/coredns/coredns" { print $3; exit }' "$SCRIPT_DIR/coredns/go.mod")"
# The sandbox image the real node's containerd uses, compiled from k/k's build/pause/linux/pause.c.
PAUSE_VERSION=3.10
BOTO3_VERSION="${RECSYS_TESTENV_BOTO3_VERSION:-1.44.8}"

# ---- locations ---------------------------------------------------------------
TESTENV_DIR="${RECSYS_TESTENV_DIR:-$REPO_ROOT/target/testenv}"
TESTENV_CACHE="${RECSYS_TESTENV_CACHE:-$HOME/.cache/recsys-testenv}"
case "$TESTENV_DIR" in /*) ;; *) TESTENV_DIR="$PWD/$TESTENV_DIR" ;; esac
case "$TESTENV_CACHE" in /*) ;; *) TESTENV_CACHE="$PWD/$TESTENV_CACHE" ;; esac
PIDS_DIR="$TESTENV_DIR/pids"
LOGS_DIR="$TESTENV_DIR/logs"
PKI_DIR="$TESTENV_DIR/pki"

# ---- ports (everything binds 127.0.0.1) ---------------------------------------
PG_PORT="${RECSYS_TESTENV_PG_PORT:-55432}"
REDIS_PORT="${RECSYS_TESTENV_REDIS_PORT:-56379}"
S3_PORT="${RECSYS_TESTENV_S3_PORT:-58333}"
# weed mini's internal servers use SEAWEED_PORT_BASE .. SEAWEED_PORT_BASE+7 and SEAWEED_PORT_BASE-9993
SEAWEED_PORT_BASE="${RECSYS_TESTENV_SEAWEED_PORT_BASE:-58340}"
ETCD_PORT="${RECSYS_TESTENV_ETCD_PORT:-52379}"
ETCD_PEER_PORT="${RECSYS_TESTENV_ETCD_PEER_PORT:-52380}"
APISERVER_PORT="${RECSYS_TESTENV_APISERVER_PORT:-56443}"
KCM_PORT="${RECSYS_TESTENV_KCM_PORT:-56444}"
SCHEDULER_PORT="${RECSYS_TESTENV_SCHEDULER_PORT:-56445}"
KWOK_PORT="${RECSYS_TESTENV_KWOK_PORT:-56446}"

# ---- credentials / names -----------------------------------------------------
PG_USER=recsys
PG_PASSWORD=recsys
PG_DB=recsys
S3_ACCESS_KEY="${RECSYS_TESTENV_S3_ACCESS_KEY:-recsys}"
S3_SECRET_KEY="${RECSYS_TESTENV_S3_SECRET_KEY:-recsys-secret}"
S3_BUCKET="${RECSYS_TESTENV_S3_BUCKET:-recsys-test}"
S3_REGION=us-east-1
KWOK_NODE="${RECSYS_TESTENV_KWOK_NODE:-kwok-node-0}"

# ---- the real node (node.sh) ----------------------------------------------------
# RECSYS_TESTENV_REAL_NODE=0 starts the environment without it (it needs root).
REAL_NODE_ENABLED="${RECSYS_TESTENV_REAL_NODE:-1}"
REAL_NODE="${RECSYS_TESTENV_REAL_NODE_NAME:-recsys-node-0}"
# Label and NoSchedule taint of the real node: only Pods that ask for it land there.
REAL_NODE_LABEL=recsys.io/real-node
REAL_NODE_TAINT_KEY=recsys.io/real-node
NODE_BRIDGE="${RECSYS_TESTENV_NODE_BRIDGE:-recsys0}"
# Pods get $NODE_SUBNET.10-254; the bridge (the node's address) is $NODE_SUBNET.1.
NODE_SUBNET="${RECSYS_TESTENV_NODE_SUBNET:-10.213.0}"
NODE_GATEWAY="$NODE_SUBNET.1"
SERVICE_CIDR=10.0.0.0/24
CLUSTER_DNS_IP=10.0.0.10
KWOK_POD_CIDR=10.244.0.0/16
# Namespace of the Services that lead Pods to the host's servers.
TESTENV_NS=recsys-testenv
PAUSE_IMAGE="recsys.local/pause:$PAUSE_VERSION"
CNI_BIN_DIR="${RECSYS_TESTENV_CNI_BIN_DIR:-/usr/lib/cni}"
NODE_APT_PACKAGES="containerd runc containernetworking-plugins iptables conntrack socat busybox-static"
KUBELET_PORT="${RECSYS_TESTENV_KUBELET_PORT:-10250}" # on $NODE_GATEWAY
KUBELET_HEALTHZ_PORT="${RECSYS_TESTENV_KUBELET_HEALTHZ_PORT:-58390}"
KUBE_PROXY_HEALTHZ_PORT="${RECSYS_TESTENV_KUBE_PROXY_HEALTHZ_PORT:-58391}"
KUBE_PROXY_METRICS_PORT="${RECSYS_TESTENV_KUBE_PROXY_METRICS_PORT:-58392}"
COREDNS_HEALTH_PORT="${RECSYS_TESTENV_COREDNS_HEALTH_PORT:-58393}"
COREDNS_READY_PORT="${RECSYS_TESTENV_COREDNS_READY_PORT:-58394}"

# start order; down.sh stops in reverse
SERVICES=(postgres redis seaweedfs etcd apiserver controller-manager scheduler kwok
	fwd-apiserver fwd-postgres fwd-redis fwd-s3 containerd coredns kubelet kube-proxy)

# Ports a service listens on 127.0.0.1.
svc_ports() {
	case "$1" in
	postgres) echo "$PG_PORT" ;;
	redis) echo "$REDIS_PORT" ;;
	seaweedfs) echo "$S3_PORT $(seq "$SEAWEED_PORT_BASE" $((SEAWEED_PORT_BASE + 7)) | tr '\n' ' ') $((SEAWEED_PORT_BASE - 9993))" ;;
	etcd) echo "$ETCD_PORT $ETCD_PEER_PORT" ;;
	apiserver) echo "$APISERVER_PORT" ;;
	controller-manager) echo "$KCM_PORT" ;;
	scheduler) echo "$SCHEDULER_PORT" ;;
	kwok) echo "$KWOK_PORT" ;;
	kubelet) echo "$KUBELET_HEALTHZ_PORT" ;;
	kube-proxy) echo "$KUBE_PROXY_HEALTHZ_PORT $KUBE_PROXY_METRICS_PORT" ;;
	coredns) echo "$COREDNS_HEALTH_PORT $COREDNS_READY_PORT" ;;
	# fwd-*: on $NODE_GATEWAY, relaying to the 127.0.0.1 ports above; containerd: a unix socket
	esac
}

log() { printf '[testenv %3ds] %s\n' "$SECONDS" "$*"; }
warn() { printf '[testenv %3ds] WARNING: %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[testenv %3ds] ERROR: %s\n' "$SECONDS" "$*" >&2; exit 1; }

# Process start time (clock ticks since boot), used to detect PID reuse.
proc_start_time() {
	local stat
	stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
	stat="${stat##*) }" # drop "pid (comm) ", comm may contain spaces
	# shellcheck disable=SC2086
	set -- $stat
	echo "${20}"
}

proc_is_zombie() {
	local stat
	stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
	stat="${stat##*) }"
	[[ "${stat:0:1}" == Z ]]
}

# Prints the PID of service $1 if its pid file names a live process that we started.
svc_pid() {
	local f="$PIDS_DIR/$1.pid" pid st
	[[ -f "$f" ]] || return 1
	read -r pid st _ <"$f" || true
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	[[ -e "/proc/$pid" ]] || return 1
	[[ "$(proc_start_time "$pid")" == "$st" ]] || return 1
	proc_is_zombie "$pid" && return 1
	echo "$pid"
}

# True while any non-zombie process is left in process group $1.
group_alive() {
	ps -e -o pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

# svc_stop NAME [first-signal] [grace-seconds]
# Sends first-signal (default TERM) to the service's process group (the service
# is started with setsid, so its PID is the PGID), waits, then SIGKILLs the group.
svc_stop() {
	local name="$1" sig="${2:-TERM}" grace="${3:-15}" pid i
	if ! pid="$(svc_pid "$name")"; then
		rm -f "$PIDS_DIR/$name.pid"
		return 0
	fi
	log "stopping $name (pid $pid)"
	if [[ "$sig" == TERM ]]; then
		kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
	else
		# e.g. postgres: signal the postmaster only, it shuts its children down itself
		kill "-$sig" "$pid" 2>/dev/null || true
	fi
	for ((i = 0; i < grace * 10; i++)); do
		group_alive "$pid" || break
		sleep 0.1
	done
	if group_alive "$pid"; then
		warn "$name did not stop within ${grace}s, sending SIGKILL"
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			group_alive "$pid" || break
			sleep 0.1
		done
	fi
	rm -f "$PIDS_DIR/$name.pid"
}

# Directory postgres data lives in. Postgres refuses to run as root, so as root it
# runs as the `postgres` user; if that user cannot reach the state dir (e.g. it is
# under /root), the data goes to a per-state-dir folder in /tmp and
# $TESTENV_DIR/postgres is a symlink to it.
pg_fallback_dir() {
	echo "${TMPDIR:-/tmp}/recsys-testenv-pg-$(printf '%s' "$TESTENV_DIR" | sha256sum | cut -c1-12)"
}
