// Package conformance runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite) against a lamina
// daemon, talking to it exactly the way containerd talks to a proxy
// snapshotter plugin: gRPC over a unix socket through snapshots/proxy.
//
// Each of the suite's cases calls the factory below with a fresh, already
// existing root directory; the factory starts a dedicated lamina process
// for that case:
//
//	$LAMINA_BIN serve --root <root>/lamina-root --address <root>/lamina.sock
//
// The suite mounts the returned mounts itself, so this must run as root.
package conformance

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

const (
	// snapshotterName is sent in every request's "snapshotter" field and is
	// also the name the suite uses for the run.
	snapshotterName = "overlayfs"
)

func TestLaminaConformance(t *testing.T) {
	abs := laminaBinary(t)

	testsuite.SnapshotterSuite(t, snapshotterName, laminaFactory(abs))
}

// laminaFactory returns a testsuite.SnapshotterFunc that starts one lamina
// daemon per call.
func laminaFactory(bin string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		d, sock, err := startLamina(bin, root)
		if err != nil {
			return nil, nil, err
		}
		conn, err := dialLamina(ctx, sock)
		if err != nil {
			d.kill()
			return nil, nil, fmt.Errorf("%s: dialing %s: %w", d.tag, sock, err)
		}

		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)

		var (
			once     sync.Once
			closeErr error
		)
		cleanup := func() error {
			once.Do(func() {
				closeErr = d.stop(conn)
			})
			return closeErr
		}
		return sn, cleanup, nil
	}
}

// dialLamina dials the socket the same way containerd dials proxy plugins
// (services/server/server.go: proxyClients.getClient).
func dialLamina(ctx context.Context, sock string) (*grpc.ClientConn, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	gopts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	}
	dctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	// Block so a broken gRPC/HTTP2 server is reported here, not as a
	// confusing failure in the first snapshot call.
	return grpc.DialContext(dctx, dialer.DialAddress(sock), append(gopts, grpc.WithBlock())...)
}
