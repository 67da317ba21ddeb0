// Command k8s is a single static binary bundling the Kubernetes control plane
// used by the recsys test environment (tests/env/up.sh):
//
//	k8s apiserver          ... == kube-apiserver
//	k8s controller-manager ... == kube-controller-manager
//	k8s scheduler          ... == kube-scheduler
//	k8s kubectl            ... == kubectl
//	k8s etcd               ... == etcd (embedded, same version k8s.io/kubernetes requires)
//	k8s kubelet            ... == kubelet (the real node's agent)
//	k8s proxy              ... == kube-proxy (Services on the real node, iptables mode)
//
// It can also be invoked through a symlink named after the subcommand
// (kubectl, kube-apiserver, etcd, ...), busybox style.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	_ "time/tzdata" // for timeZone support in CronJob

	"go.etcd.io/etcd/server/v3/etcdmain"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl: client auth plugins
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // prometheus client-go plugins
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric registration
	"k8s.io/component-base/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

var aliases = map[string]string{
	"apiserver":               "apiserver",
	"kube-apiserver":          "apiserver",
	"controller-manager":      "controller-manager",
	"kube-controller-manager": "controller-manager",
	"scheduler":               "scheduler",
	"kube-scheduler":          "scheduler",
	"kubectl":                 "kubectl",
	"etcd":                    "etcd",
	"kubelet":                 "kubelet",
	"proxy":                   "proxy",
	"kube-proxy":              "proxy",
	"version":                 "version",
}

var progNames = map[string]string{
	"apiserver":          "kube-apiserver",
	"controller-manager": "kube-controller-manager",
	"scheduler":          "kube-scheduler",
	"kubectl":            "kubectl",
	"etcd":               "etcd",
	"kubelet":            "kubelet",
	"proxy":              "kube-proxy",
	"version":            "k8s",
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s {apiserver|controller-manager|scheduler|kubectl|etcd|kubelet|proxy|version} [flags...]\n", filepath.Base(os.Args[0]))
	os.Exit(2)
}

func main() {
	var sub string
	var rest []string
	if s, ok := aliases[strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe")]; ok {
		sub, rest = s, os.Args[1:]
	} else if len(os.Args) >= 2 {
		s, ok := aliases[os.Args[1]]
		if !ok {
			usage()
		}
		sub, rest = s, os.Args[2:]
	} else {
		usage()
	}
	// cobra (and etcdmain) read os.Args themselves: make it look like the upstream binary.
	os.Args = append([]string{progNames[sub]}, rest...)

	switch sub {
	case "apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubectl":
		if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
	case "etcd":
		etcdmain.Main(os.Args)
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "proxy":
		os.Exit(cli.Run(proxy.NewProxyCommand()))

	case "version":
		fmt.Println(version.Get().GitVersion)
	}
}
