// Command refd is a reference daemon for validating the conformance harness
// itself: it serves containerd's own overlayfs snapshotter over the Snapshots
// gRPC API with the same command line as lamina
//
//	refd serve --root DIR --address SOCK
//
// so `run.sh <refd>` should pass every case. It is not part of lamina.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "serve" {
		fmt.Fprintln(os.Stderr, "usage: refd serve --root DIR --address SOCK")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	root := fs.String("root", "", "snapshotter root")
	address := fs.String("address", "", "unix socket to listen on")
	_ = fs.Parse(os.Args[2:])
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "--root and --address are required")
		os.Exit(2)
	}

	sn, err := overlay.NewSnapshotter(*root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "overlay:", err)
		os.Exit(1)
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sig
		fmt.Fprintln(os.Stderr, "refd: got", s, "- shutting down")
		srv.GracefulStop()
	}()
	fmt.Fprintln(os.Stderr, "refd: serving", *address)
	if err := srv.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
	if err := sn.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		os.Exit(1)
	}
}
