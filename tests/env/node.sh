# shellcheck shell=bash
# The real node of the test environment: a kubelet, containerd with runc, a bridge CNI
# network, kube-proxy and CoreDNS, so that Pods scheduled onto it run real containers from
# images built on this machine. Sourced by up.sh after the control plane is up; expects
# lib.sh, the process helpers and the PKI of up.sh.
#
# Networking, and why traffic stays on this machine:
# - Pods live in network namespaces that CNI creates, on the bridge $NODE_BRIDGE
#   ($NODE_SUBNET.0/24). The bridge's own address, $NODE_GATEWAY, is the node's IP.
# - The host's test servers listen on 127.0.0.1 only. For Pods, socat forwarders listen on
#   $NODE_GATEWAY and relay to 127.0.0.1 (fwd-*), and Services without selectors in the
#   namespace $TESTENV_NS (postgres, redis, s3), plus the `kubernetes` Service, have
#   EndpointSlices on $NODE_GATEWAY. kube-proxy (iptables mode) turns ClusterIPs into those.
# - Forwarding is enabled on the bridge only, and a guard chain drops anything a Pod sends
#   that would leave the bridge for another interface, and any host packet to a ClusterIP or
#   kwok Pod IP that kube-proxy did not translate (kwok's fake Pod IPs route nowhere).

NODE_DIR="$TESTENV_DIR/node"
CONTAINERD_SOCK="$NODE_DIR/containerd/containerd.sock"
CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)

node_require() {
	$IS_ROOT || die "the real node needs root (mounts, network namespaces, iptables); run up.sh as root, or set RECSYS_TESTENV_REAL_NODE=0 to start without it (tests that need it then fail)"
	local c
	for c in containerd containerd-shim-runc-v2 runc ctr iptables iptables-save conntrack socat ip busybox; do
		command -v "$c" >/dev/null || die "the real node needs '$c' (Debian packages: $NODE_APT_PACKAGES)"
	done
	[[ -x "$CNI_BIN_DIR/bridge" && -x "$CNI_BIN_DIR/host-local" && -x "$CNI_BIN_DIR/loopback" ]] ||
		die "CNI plugins missing in $CNI_BIN_DIR (Debian package containernetworking-plugins)"
	[[ -d /sys/fs/cgroup/memory || -f /sys/fs/cgroup/cgroup.controllers ]] || die "no memory cgroup mounted under /sys/fs/cgroup"
}

# ---- network ------------------------------------------------------------------
GUARD_CHAIN=RECSYS-TESTENV-GUARD

node_network() {
	if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
		log "node: creating bridge $NODE_BRIDGE ($NODE_GATEWAY/24)"
		ip link add "$NODE_BRIDGE" type bridge
	fi
	ip addr show dev "$NODE_BRIDGE" | grep -q " $NODE_GATEWAY/24 " ||
		ip addr add "$NODE_GATEWAY/24" dev "$NODE_BRIDGE"
	ip link set "$NODE_BRIDGE" up
	# Routing for Pods (Pod -> ClusterIP -> Pod crosses the host's IP layer), on the bridge only.
	sysctl -qw "net.ipv4.conf.$NODE_BRIDGE.forwarding=1"
	# Bridged Pod-to-Pod traffic goes through iptables too, as kube-proxy expects.
	[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] && sysctl -qw net.bridge.bridge-nf-call-iptables=1
	node_guard
}

# (Re)installs the guard rules at the head of FORWARD and OUTPUT. Run again after kube-proxy
# started, so that they come before kube-proxy's own jumps.
node_guard() {
	iptables -w -N "$GUARD_CHAIN" 2>/dev/null || iptables -w -F "$GUARD_CHAIN"
	# Pod to Pod, on the bridge: fine.
	iptables -w -A "$GUARD_CHAIN" -i "$NODE_BRIDGE" -o "$NODE_BRIDGE" -j ACCEPT
	# Anything else a Pod sends through the host, or anything routed to a Pod from elsewhere.
	iptables -w -A "$GUARD_CHAIN" -i "$NODE_BRIDGE" -j DROP
	iptables -w -A "$GUARD_CHAIN" -o "$NODE_BRIDGE" ! -s "$NODE_GATEWAY" -j DROP
	# Host packets to a ClusterIP that kube-proxy did not translate, or to kwok's Pod IPs.
	iptables -w -A "$GUARD_CHAIN" -d "$SERVICE_CIDR" -j REJECT
	iptables -w -A "$GUARD_CHAIN" -d "$KWOK_POD_CIDR" -j REJECT
	local chain
	for chain in FORWARD OUTPUT; do
		while iptables -w -D "$chain" -j "$GUARD_CHAIN" 2>/dev/null; do :; done
		iptables -w -I "$chain" 1 -j "$GUARD_CHAIN"
	done
}

# ---- forwarders: the host's servers, seen from Pods on $NODE_GATEWAY ----------------
# fwd-<name> listens on $NODE_GATEWAY:<port> and relays to 127.0.0.1:<port>.
fwd_target_port() {
	case "$1" in
	fwd-apiserver) echo "$APISERVER_PORT" ;;
	fwd-postgres) echo "$PG_PORT" ;;
	fwd-redis) echo "$REDIS_PORT" ;;
	fwd-s3) echo "$S3_PORT" ;;
	esac
}
fwd_cmd_for() {
	local p
	p="$(fwd_target_port "$1")"
	CMD=(socat "TCP-LISTEN:$p,bind=$NODE_GATEWAY,reuseaddr,fork,backlog=256" "TCP:127.0.0.1:$p")
}
fwd_healthy_for() { (exec 3<>"/dev/tcp/$NODE_GATEWAY/$(fwd_target_port "$1")") 2>/dev/null; }
# shellcheck disable=SC2329 # called indirectly by ensure
{
	fwd_apiserver_cmd() { fwd_cmd_for fwd-apiserver; }
	fwd_apiserver_healthy() { fwd_healthy_for fwd-apiserver; }
	fwd_postgres_cmd() { fwd_cmd_for fwd-postgres; }
	fwd_postgres_healthy() { fwd_healthy_for fwd-postgres; }
	fwd_redis_cmd() { fwd_cmd_for fwd-redis; }
	fwd_redis_healthy() { fwd_healthy_for fwd-redis; }
	fwd_s3_cmd() { fwd_cmd_for fwd-s3; }
	fwd_s3_healthy() { fwd_healthy_for fwd-s3; }
}

# ---- containerd ---------------------------------------------------------------
containerd_config() {
	mkdir -p "$NODE_DIR/containerd" "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
	cat >"$NODE_DIR/containerd/config.toml.tmp" <<EOF
# Generated by tests/env/node.sh
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Root here lacks CAP_SYS_RESOURCE, so no process may lower its oom_score_adj (the sandbox's
  # -998, a Guaranteed Pod's -997): clamp them at containerd's own, as rootless setups do.
  restrict_oom_score_adj = true
  # Pod network namespaces under the state dir, so that down.sh finds exactly ours.
  netns_mounts_under_state_dir = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1
EOF
	mv "$NODE_DIR/containerd/config.toml.tmp" "$NODE_DIR/containerd/config.toml"
	cat >"$NODE_DIR/cni/net.d/10-recsys.conflist.tmp" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "recsys-testenv",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{ "subnet": "$NODE_SUBNET.0/24", "rangeStart": "$NODE_SUBNET.10", "gateway": "$NODE_GATEWAY" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
EOF
	mv "$NODE_DIR/cni/net.d/10-recsys.conflist.tmp" "$NODE_DIR/cni/net.d/10-recsys.conflist"
}
containerd_cmd() {
	CMD=(containerd --config "$NODE_DIR/containerd/config.toml" --log-level warn)
}
containerd_healthy() { ctr --address "$CONTAINERD_SOCK" --timeout 2s version; }
containerd_pre() { containerd_config; }

# ---- the node's own images: pause (the sandbox) and a toolbox (busybox) -------------
# Built from what this machine has (k/k's pause.c, Debian's busybox-static: wget, nslookup and
# a shell for the tests' in-cluster clients), as OCI archives
# by images/oci.py, cached by content hash, and imported into containerd when missing.
node_images() {
	local kdir pause_c key out t0=$SECONDS
	kdir="$(go_module_dir "k8s.io/kubernetes@$K8S_VERSION")"
	pause_c="$kdir/build/pause/linux/pause.c"
	[[ -f "$pause_c" ]] || die "pause.c not found at $pause_c"
	key="$(cat "$pause_c" "$SCRIPT_DIR/images/oci.py" | sha256sum | cut -c1-12)"
	out="$TESTENV_CACHE/images/pause-$key"
	if [[ ! -f "$out/.complete" ]]; then
		command -v gcc >/dev/null || die "gcc is needed to build the pause image"
		rm -rf "$out" && mkdir -p "$out/rootfs"
		gcc -Os -static -Wall -DVERSION="v$PAUSE_VERSION-recsys" -o "$out/rootfs/pause" "$pause_c" ||
			die "could not compile $pause_c"
		strip "$out/rootfs/pause"
		python3 "$SCRIPT_DIR/images/oci.py" --name "$PAUSE_IMAGE" --out "$out/image.tar" \
			--layer "$out/rootfs" --entrypoint /pause --user 65535:65535 >/dev/null ||
			die "could not write the pause image"
		touch "$out/.complete"
	fi
	node_import "$PAUSE_IMAGE" "$out/image.tar"

	key="$(cat /bin/busybox "$SCRIPT_DIR/images/oci.py" | sha256sum | cut -c1-12)"
	TOOLBOX_IMAGE="recsys.local/toolbox:$key"
	out="$TESTENV_CACHE/images/toolbox-$key"
	if [[ ! -f "$out/.complete" ]]; then
		/bin/busybox --list | grep -qx wget || die "busybox has no wget applet"
		ldd /bin/busybox >/dev/null 2>&1 &&
			die "/bin/busybox is dynamically linked: the toolbox needs Debian's busybox-static"
		rm -rf "$out" && mkdir -p "$out/rootfs/bin" "$out/rootfs/tmp"
		cp /bin/busybox "$out/rootfs/bin/busybox"
		python3 "$SCRIPT_DIR/images/oci.py" --name "$TOOLBOX_IMAGE" --out "$out/image.tar" \
			--layer "$out/rootfs" --entrypoint /bin/busybox --user 65532:65532 >/dev/null ||
			die "could not write the toolbox image"
		touch "$out/.complete"
	fi
	node_import "$TOOLBOX_IMAGE" "$out/image.tar"
	((SECONDS - t0 < 2)) || log "node: images pause and toolbox ready in $((SECONDS - t0))s"
}

# node_import NAME ARCHIVE: imports an OCI archive into containerd's k8s.io namespace unless an
# image of that name (a content-hash tag) is there already.
node_import() {
	"${CTR[@]}" images ls -q "name==$1" 2>/dev/null | grep -qx "$1" && return 0
	"${CTR[@]}" images import --no-unpack=false "$2" >/dev/null || die "ctr images import $2 failed"
	"${CTR[@]}" images ls -q "name==$1" | grep -qx "$1" || die "importing $2 did not create image $1"
}

# ---- CoreDNS --------------------------------------------------------------------
COREDNS_BIN=""
coredns_cmd() {
	CMD=("$COREDNS_BIN" -conf "$NODE_DIR/coredns/Corefile")
}
coredns_pre() {
	mkdir -p "$NODE_DIR/coredns"
	cat >"$NODE_DIR/coredns/Corefile" <<EOF
# Generated by tests/env/node.sh: the cluster's DNS, for Pods on the real node only.
# No forward plugin: names outside the cluster are refused, nothing leaves the machine.
.:53 {
    bind $NODE_GATEWAY
    errors
    health 127.0.0.1:$COREDNS_HEALTH_PORT
    ready 127.0.0.1:$COREDNS_READY_PORT
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $KUBECONFIG_FILE recsys-testenv
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
}
coredns_healthy() { [[ "$(curl -fsS --max-time 2 "http://127.0.0.1:$COREDNS_READY_PORT/ready")" == OK ]]; }

# ---- kubelet --------------------------------------------------------------------
kubelet_pre() {
	mkdir -p "$NODE_DIR/kubelet" "$NODE_DIR/pod-logs"
	write_kubeconfig "$NODE_DIR/kubelet.kubeconfig" kubelet "system:node:$REAL_NODE"
	cat >"$NODE_DIR/kubelet-config.yaml" <<EOF
# Generated by tests/env/node.sh
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_GATEWAY
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $PKI_DIR/ca.crt }
authorization: { mode: Webhook }
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
clusterDNS: [$CLUSTER_DNS_IP]
clusterDomain: cluster.local
# Pods get the cluster DNS only: the host's resolver is not theirs to use.
resolvConf: ""
podLogsDir: $NODE_DIR/pod-logs
failSwapOn: false
# Without CAP_SYS_RESOURCE the kubelet cannot lower its own oom_score_adj either.
oomScoreAdj: 0
maxPods: 40
serializeImagePulls: false
# Images are imported, never pulled: image garbage collection must not remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A test machine's disk fills up; do not evict Pods for it.
evictionHard: { memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%" }
registerWithTaints:
  - { key: $REAL_NODE_TAINT_KEY, value: "true", effect: NoSchedule }
nodeStatusReportFrequency: 10s
nodeStatusUpdateFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 0s
shutdownGracePeriod: 0s
# Kubernetes 1.35 refuses cgroup v1 unless told otherwise (KEP 5573); this machine has v1.
failCgroupV1: false
EOF
}
kubelet_cmd() {
	CMD=("$K8S_BIN" kubelet --config="$NODE_DIR/kubelet-config.yaml"
		--kubeconfig="$NODE_DIR/kubelet.kubeconfig" --root-dir="$NODE_DIR/kubelet"
		--cert-dir="$NODE_DIR/kubelet/pki" --hostname-override="$REAL_NODE" --node-ip="$NODE_GATEWAY"
		--node-labels="$REAL_NODE_LABEL=true,type=real" --v=1)
}
kubelet_healthy() { [[ "$(curl -fsS --max-time 2 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz")" == ok ]]; }

# ---- kube-proxy -----------------------------------------------------------------
kube_proxy_pre() {
	write_kubeconfig "$NODE_DIR/kube-proxy.kubeconfig" kube-proxy system:kube-proxy
	cat >"$NODE_DIR/kube-proxy-config.yaml" <<EOF
# Generated by tests/env/node.sh
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: { kubeconfig: $NODE_DIR/kube-proxy.kubeconfig }
hostnameOverride: $REAL_NODE
mode: iptables
clusterCIDR: $NODE_SUBNET.0/24
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
# NodePorts only on the node's bridge address; no route_localnet on the host.
nodePortAddresses: ["$NODE_GATEWAY/32"]
iptables: { localhostNodePorts: false, masqueradeAll: false }
# Leave the host's conntrack sysctls alone.
conntrack: { maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s }
EOF
}
kube_proxy_cmd() {
	CMD=("$K8S_BIN" proxy --config="$NODE_DIR/kube-proxy-config.yaml" --v=1)
}
kube_proxy_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"; }

# ---- cluster objects: Services of the host's servers, cluster DNS ----------------------
node_cluster_objects() {
	local eps="" name port
	for name in postgres:"$PG_PORT" redis:"$REDIS_PORT" s3:"$S3_PORT"; do
		port="${name#*:}" name="${name%%:*}"
		eps+="---
apiVersion: v1
kind: Service
metadata: { name: $name, namespace: $TESTENV_NS }
spec:
  ports: [{ name: tcp, port: $port, targetPort: $port, protocol: TCP }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $name-host
  namespace: $TESTENV_NS
  labels: { kubernetes.io/service-name: $name, endpointslice.kubernetes.io/managed-by: recsys-testenv }
addressType: IPv4
ports: [{ name: tcp, port: $port, protocol: TCP }]
endpoints: [{ addresses: [\"$NODE_GATEWAY\"], conditions: { ready: true } }]
"
	done
	"$KUBECTL" apply --server-side --force-conflicts --field-manager=recsys-testenv -f - >/dev/null <<EOF || die "could not create the node's cluster objects"
apiVersion: v1
kind: Namespace
metadata: { name: $TESTENV_NS }
---
# The apiserver advertises 127.0.0.1, which Pods cannot reach: its Service points at the
# forwarder on the bridge instead (the apiserver runs with --endpoint-reconciler-type=none).
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-host
  namespace: default
  labels: { kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: recsys-testenv }
addressType: IPv4
ports: [{ name: https, port: $APISERVER_PORT, protocol: TCP }]
endpoints: [{ addresses: ["$NODE_GATEWAY"], conditions: { ready: true } }]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: { k8s-app: kube-dns, kubernetes.io/name: CoreDNS }
spec:
  clusterIP: $CLUSTER_DNS_IP
  ports:
    - { name: dns, port: 53, targetPort: 53, protocol: UDP }
    - { name: dns-tcp, port: 53, targetPort: 53, protocol: TCP }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-host
  namespace: kube-system
  labels: { kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: recsys-testenv }
addressType: IPv4
ports:
  - { name: dns, port: 53, protocol: UDP }
  - { name: dns-tcp, port: 53, protocol: TCP }
endpoints: [{ addresses: ["$NODE_GATEWAY"], conditions: { ready: true } }]
$eps
EOF
}

# Ready, and the node lifecycle controller has lifted its not-ready taint: only ours is left.
real_node_ready() {
	[[ "$("$KUBECTL" get node "$REAL_NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]] &&
		[[ "$("$KUBECTL" get node "$REAL_NODE" -o jsonpath='{range .spec.taints[*]}{.key}{" "}{end}' 2>/dev/null)" == "$REAL_NODE_TAINT_KEY " ]]
}

# ---- everything, in order ---------------------------------------------------------
start_real_node() {
	local t0=$SECONDS
	node_require
	COREDNS_BIN="$COREDNS_DIR/bin/coredns"
	node_network
	for f in fwd-apiserver fwd-postgres fwd-redis fwd-s3; do ensure "$f" 10; done
	ensure containerd 30
	node_images
	node_cluster_objects
	ensure coredns 30
	ensure kubelet 60
	ensure kube-proxy 60
	node_guard # ahead of kube-proxy's jumps
	local deadline=$((SECONDS + 120))
	until real_node_ready; do
		((SECONDS < deadline)) || die "node $REAL_NODE did not become Ready within 120s (logs: $LOGS_DIR/kubelet.log, $LOGS_DIR/containerd.log)"
		sleep 0.5
	done
	log "real node $REAL_NODE Ready in $((SECONDS - t0))s (Pods on $NODE_SUBNET.0/24, DNS $CLUSTER_DNS_IP)"
}

# ---- teardown (down.sh) -----------------------------------------------------------
# After kubelet and kube-proxy stopped, before containerd stops: kill every container of the
# node and forget them (kubelet recreates the Pods on the next up.sh), then release what they
# held: mounts, network namespaces, IP allocations.
node_stop_containers() {
	containerd_healthy >/dev/null 2>&1 || return 0
	local id n=0
	for id in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
		"${CTR[@]}" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
		n=$((n + 1))
	done
	for id in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
		"${CTR[@]}" tasks delete -f "$id" >/dev/null 2>&1 || true
	done
	for id in $("${CTR[@]}" containers ls -q 2>/dev/null); do
		"${CTR[@]}" containers rm "$id" >/dev/null 2>&1 || true
	done
	((n == 0)) || log "node: killed $n containers"
}

node_release() {
	local pid mnt
	# Shims outlive containerd (they are their own session): ours name our socket.
	for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null); do
		kill -KILL "$pid" 2>/dev/null || true
	done
	# Deepest first: secret volumes, container root filesystems, network namespaces.
	findmnt -rn -o TARGET 2>/dev/null | awk -v d="$NODE_DIR/" 'index($0, d) == 1' | sort -r |
		while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
	rm -rf "$NODE_DIR/cni/ipam"
}

# --purge: also what up.sh changed on the host outside the state dir.
node_purge_host() {
	local chain
	for chain in FORWARD OUTPUT; do
		while iptables -w -D "$chain" -j "$GUARD_CHAIN" 2>/dev/null; do :; done
	done
	iptables -w -F "$GUARD_CHAIN" 2>/dev/null && iptables -w -X "$GUARD_CHAIN" 2>/dev/null
	[[ -x "$TESTENV_DIR/bin/k8s" ]] && "$TESTENV_DIR/bin/k8s" proxy --cleanup >/dev/null 2>&1
	ip link del "$NODE_BRIDGE" 2>/dev/null || true
}
