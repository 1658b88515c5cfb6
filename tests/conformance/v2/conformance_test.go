// Package conformance runs containerd 2.x's snapshotter conformance suite
// (github.com/containerd/containerd/v2/core/snapshots/testsuite) against a
// lamina daemon, reached as containerd reaches a proxy snapshotter: gRPC over
// a unix socket through core/snapshots/proxy. The 1.6 suite's harness
// (../src/lamina/conformance) does the same for containerd 1.6; the daemon
// handling is one file both use (daemon.go, linked here). What differs, and is
// written twice below, is only what names containerd's packages.
//
// The suite runs under the snapshotter name "overlayfs", as containerd runs its
// own overlay snapshotter: its Rename case renames a directory of a lower
// layer unless the name is overlayfs, fuse-overlayfs or erofs, and kernel
// overlayfs does that only with redirect_dir, whose upper directories
// containerd's differ cannot read. lamina has overlayfs' semantics.
package conformance

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/dialer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
)

const snapshotterName = "overlayfs"

func TestLaminaConformance(t *testing.T) {
	abs := laminaBinary(t)
	testsuite.SnapshotterSuite(t, snapshotterName, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		d, sock, err := startLamina(abs, root)
		if err != nil {
			return nil, nil, err
		}
		conn, err := dial(ctx, sock)
		if err != nil {
			d.kill()
			return nil, nil, fmt.Errorf("%s: dialing %s: %w", d.tag, sock, err)
		}
		var (
			once     sync.Once
			closeErr error
		)
		cleanup := func() error {
			once.Do(func() { closeErr = d.stop(conn) })
			return closeErr
		}
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName), cleanup, nil
	})
}

// dial connects as containerd 2.x connects to a proxy plugin
// (core/... proxy clients: insecure, its dialer, its message size limits).
func dial(ctx context.Context, sock string) (*grpc.ClientConn, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	dctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	//nolint:staticcheck // Blocking dial: a broken server is reported here, not in the first case.
	return grpc.DialContext(dctx, dialer.DialAddress(sock),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
		grpc.WithBlock(),
	)
}
