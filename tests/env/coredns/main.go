// Command coredns is CoreDNS with only the plugins the recsys test cluster uses, so it builds
// in a fraction of the time of CoreDNS' own main (which links every plugin, cloud SDKs
// included). tests/env/up.sh runs it on the real node's bridge address as the cluster DNS.
package main

import (
	"github.com/coredns/coredns/coremain"

	// The Corefile in up.sh uses exactly these.
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
