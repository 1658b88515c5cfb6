// Command overlayd serves containerd's built-in overlayfs snapshotter
// (github.com/containerd/containerd/snapshots/overlay) over containerd's
// Snapshots gRPC API on a unix socket, so that lamina's benchmark can drive it
// exactly as it drives lamina: same client code, its own process, its own
// socket. The conformance harness's self-test (tests/conformance/run.sh
// --self-test) runs containerd's suite against it, to check the harness apart
// from lamina.
//
//	overlayd [serve] --root DIR --address SOCK
//
// It uses the options containerd's own overlayfs plugin passes by default
// (snapshots/overlay/plugin: AsynchronousRemove, no upperdir label), and the
// same service adapter containerd uses for proxy snapshotters
// (contrib/snapshotservice). Build it in GOPATH mode against Debian's
// packaged containerd sources (the benchmark does this):
//
//	GO111MODULE=off GOPATH=$PWD/benches/go:/usr/share/gocode go build laminabench/overlayd
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
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	fs := flag.NewFlagSet("overlayd", flag.ExitOnError)
	root := fs.String("root", "", "snapshotter root directory")
	address := fs.String("address", "", "unix socket to listen on")
	_ = fs.Parse(args)
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "usage: overlayd [serve] --root DIR --address SOCK")
		os.Exit(2)
	}

	// containerd's default for its overlayfs plugin: asynchronous remove
	// (Remove drops the record; Cleanup deletes the directories).
	sn, err := overlay.NewSnapshotter(*root, overlay.AsynchronousRemove)
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
	// containerd's proxy plugin client allows 16 MiB messages; match it.
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(16<<20),
		grpc.MaxSendMsgSize(16<<20),
	)
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.GracefulStop()
	}()
	if err := srv.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
	if err := sn.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		os.Exit(1)
	}
}
