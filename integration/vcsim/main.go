// Command vcsim serves govmomi's vCenter simulator for Bonneville's vSphere tests.
//
// It is built offline in GOPATH mode against Debian's golang-github-vmware-govmomi-dev
// (integration/vsphere_env.py does that), prints one line "VCSIM_URL <url>" once the endpoint
// answers, and serves until it is killed. Credentials come from VCSIM_USERNAME and
// VCSIM_PASSWORD (environment, never argv) so tests can check bad-credential errors.
// With -tls-cert and -tls-key it serves https with that certificate (integration/
// test_vsphere_tls.py), else plain http.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("tls-cert", "", "serve https with this PEM certificate (chain)")
	keyFile := flag.String("tls-key", "", "the PEM private key of -tls-cert")
	flag.Parse()

	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 1
	model.ClusterHost = 1
	model.Host = 0
	model.Machine = 0
	model.Datastore = 1
	model.Portgroup = 1
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: %v", err)
	}
	defer model.Remove()

	u, err := url.Parse("http://" + *listen)
	if err != nil {
		log.Fatalf("vcsim: bad -listen: %v", err)
	}
	model.Service.Listen = u
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("vcsim: -tls-cert/-tls-key: %v", err)
		}
		model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	}
	if user, pass := os.Getenv("VCSIM_USERNAME"), os.Getenv("VCSIM_PASSWORD"); user != "" {
		model.Service.Listen.User = url.UserPassword(user, pass)
	}
	server := model.Service.NewServer()
	defer server.Close()

	// The URL without credentials: clients log in with their own.
	shown := *server.URL
	shown.User = nil
	fmt.Printf("VCSIM_URL %s\n", shown.String())
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
