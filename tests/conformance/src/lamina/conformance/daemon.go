// The lamina daemon each conformance case runs against: started on the case's
// root, its output forwarded with a tag, stopped and checked when the case ends.
// Shared by the harnesses of containerd 1.6 (GOPATH mode, Debian's packages) and
// 2.x (module mode, ../../../../v2, which links this file): it uses no containerd
// package, whose import paths differ between the two.
package conformance

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
)

const (
	startTimeout    = 10 * time.Second
	shutdownTimeout = 10 * time.Second
)

// laminaBinary is $LAMINA_BIN as an absolute path, checked: an executable
// file, and the suite running as root (it mounts).
func laminaBinary(t *testing.T) string {
	bin := os.Getenv("LAMINA_BIN")
	if bin == "" {
		t.Fatal("LAMINA_BIN is not set: point it at the lamina binary (e.g. target/debug/lamina)")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatalf("LAMINA_BIN=%q: %v", bin, err)
	}
	if st, err := os.Stat(abs); err != nil {
		t.Fatalf("LAMINA_BIN=%q: %v", bin, err)
	} else if st.IsDir() || st.Mode()&0111 == 0 {
		t.Fatalf("LAMINA_BIN=%q is not an executable file", bin)
	}
	if os.Getuid() != 0 {
		t.Fatal("the snapshotter conformance suite mounts filesystems and must run as root")
	}
	return abs
}

// daemon is one running lamina.
type daemon struct {
	tag     string
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	fwd     *forwarder
	root    string
}

// startLamina starts `bin serve` with its root and socket under root, and
// waits until the socket accepts connections. It returns the socket's path.
func startLamina(bin, root string) (*daemon, string, error) {
	// The suite creates root before calling us; be tolerant anyway.
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, "", err
	}
	laminaRoot := filepath.Join(root, "lamina-root")
	sock := filepath.Join(root, "lamina.sock")
	// Unix socket paths are limited to 108 bytes (sun_path).
	if len(sock) >= 108 {
		return nil, "", fmt.Errorf("socket path %q is too long for a unix socket (set TMPDIR to a shorter dir)", sock)
	}

	// Tag daemon output with the case's temp dir name so the logs of the
	// parallel cases can be told apart (the suite logs the same dir on
	// failure via DumpDirOnFailure).
	tag := fmt.Sprintf("lamina[%s]", filepath.Base(filepath.Dir(root)))

	cmd := exec.Command(bin, "serve", "--root", laminaRoot, "--address", sock)
	cmd.Stdin = nil
	// Only the flags above: never the machine's /etc/lamina/config.toml.
	cmd.Env = append(os.Environ(), "LAMINA_CONFIG=")
	if _, ok := os.LookupEnv("NO_COLOR"); !ok {
		// Output goes to a pipe and into test logs: no ANSI colours.
		cmd.Env = append(cmd.Env, "NO_COLOR=1")
	}
	// Own process group, so a Ctrl-C on the test does not hit the daemon
	// before we get to shut it down cleanly.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Our own pipe rather than StderrPipe: cmd.Wait must not depend on
	// EOF on the pipe, which never comes if lamina leaves a helper
	// process behind that still holds its stderr.
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, "", err
	}
	cmd.Stdout = pw
	cmd.Stderr = pw
	fwd := newForwarder(tag, pr)

	err = start(cmd)
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, "", fmt.Errorf("starting %s: %w", bin, err)
	}
	fmt.Fprintf(os.Stderr, "%s: started pid %d: %s\n", tag, cmd.Process.Pid, strings.Join(cmd.Args, " "))

	d := &daemon{tag: tag, cmd: cmd, exited: make(chan struct{}), fwd: fwd, root: root}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()

	if err := waitForSocket(sock, d.exited, startTimeout); err != nil {
		select {
		case <-d.exited:
			killGroup(cmd)
			fwd.waitFor(2 * time.Second)
			return nil, "", fmt.Errorf("%s exited before serving %s (%v); last output:\n%s", tag, sock, exitDesc(d.waitErr), fwd.tail())
		default:
		}
		d.kill()
		fwd.waitFor(2 * time.Second)
		return nil, "", fmt.Errorf("%s: %w; last output:\n%s", tag, err, fwd.tail())
	}

	return d, sock, nil
}

// The kernel sends a child's Pdeathsig when the *thread* that started it
// exits, not the process, and Go ends threads: one that a goroutine locked and
// never unlocked (containerd 2.x's mount code does that) is destroyed with the
// goroutine, and the daemons it started would be killed mid-test. So every
// daemon is started from one goroutine that holds its thread for the life of
// the test binary.
type startRequest struct {
	cmd  *exec.Cmd
	done chan error
}

var starts = make(chan startRequest)

func init() {
	go func() {
		runtime.LockOSThread()
		for r := range starts {
			r.done <- r.cmd.Start()
		}
	}()
}

// start starts cmd from the thread that never exits.
func start(cmd *exec.Cmd) error {
	r := startRequest{cmd: cmd, done: make(chan error)}
	starts <- r
	return <-r.done
}

// kill ends lamina at once, for a case that could not start.
func (d *daemon) kill() {
	killGroup(d.cmd)
	<-d.exited
}

// waitForSocket polls until sock accepts a connection, the process exits or
// the timeout expires.
func waitForSocket(sock string, exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		lastErr = err
		if time.Now().After(deadline) {
			return fmt.Errorf("socket %s did not accept connections within %s: %v", sock, timeout, lastErr)
		}
		select {
		case <-exited:
			return errors.New("process exited")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop closes the client connection, SIGTERMs lamina, waits for it
// (SIGKILL after shutdownTimeout) and reports a non-clean exit as an error.
func (d *daemon) stop(conn io.Closer) error {
	tag, cmd, exited, waitErr, fwd, root := d.tag, d.cmd, d.exited, &d.waitErr, d.fwd, d.root
	var errs []string
	if err := conn.Close(); err != nil {
		errs = append(errs, fmt.Sprintf("closing grpc conn: %v", err))
	}

	select {
	case <-exited:
		errs = append(errs, fmt.Sprintf("lamina exited on its own during the test (%s)", exitDesc(*waitErr)))
	default:
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			errs = append(errs, fmt.Sprintf("sending SIGTERM: %v", err))
		}
		select {
		case <-exited:
			if *waitErr != nil {
				errs = append(errs, fmt.Sprintf("lamina exited uncleanly after SIGTERM: %s", exitDesc(*waitErr)))
			}
		case <-time.After(shutdownTimeout):
			killGroup(cmd)
			<-exited
			errs = append(errs, fmt.Sprintf("lamina did not exit within %s of SIGTERM; killed", shutdownTimeout))
		}
	}

	// lamina runs in its own process group; anything still in it now is a
	// helper lamina left running.
	if syscall.Kill(-cmd.Process.Pid, 0) == nil {
		fmt.Fprintf(os.Stderr, "%s: WARNING: processes left in lamina's process group after it exited; killing them\n", tag)
		killGroup(cmd)
	}
	fwd.waitFor(2 * time.Second)

	// Anything still mounted under the test root after lamina is gone was
	// leaked (by lamina, or by a failed test). Detach it so the suite can
	// remove its temp dir, and say so.
	if leaked := mountsUnder(root); len(leaked) > 0 {
		fmt.Fprintf(os.Stderr, "%s: WARNING: %d mount(s) still present under %s after shutdown: %s\n",
			tag, len(leaked), root, strings.Join(leaked, ", "))
		for i := len(leaked) - 1; i >= 0; i-- {
			_ = syscall.Unmount(leaked[i], syscall.MNT_DETACH)
		}
	}

	if len(errs) > 0 {
		return fmt.Errorf("%s: %s; last output:\n%s", tag, strings.Join(errs, "; "), fwd.tail())
	}
	return nil
}

// killGroup SIGKILLs lamina and everything in its process group.
func killGroup(cmd *exec.Cmd) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Process.Kill()
}

func exitDesc(err error) string {
	if err == nil {
		return "exit status 0"
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "killed by signal " + ws.Signal().String()
		}
	}
	return err.Error()
}

// mountsUnder lists mount points at or below dir, in mount order.
func mountsUnder(dir string) []string {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil
	}
	sort.SliceStable(infos, func(i, j int) bool { return infos[i].ID < infos[j].ID })
	var res []string
	for _, mi := range infos {
		res = append(res, mi.Mountpoint)
	}
	return res
}

// forwarder copies the daemon's output line by line to our stderr, prefixed
// with a tag, and keeps the last lines for error messages.
type forwarder struct {
	mu    sync.Mutex
	lines []string
	done  chan struct{}
}

const tailLines = 40

func newForwarder(tag string, r io.ReadCloser) *forwarder {
	f := &forwarder{done: make(chan struct{})}
	go func() {
		defer close(f.done)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintf(os.Stderr, "%s: %s\n", tag, line)
			f.mu.Lock()
			f.lines = append(f.lines, line)
			if len(f.lines) > tailLines {
				f.lines = f.lines[len(f.lines)-tailLines:]
			}
			f.mu.Unlock()
		}
		// Drain whatever is left if the scanner gave up on a huge line.
		_, _ = io.Copy(os.Stderr, r)
		r.Close()
	}()
	return f
}

// waitFor waits (bounded) until the output has been drained to EOF.
func (f *forwarder) waitFor(d time.Duration) {
	select {
	case <-f.done:
	case <-time.After(d):
	}
}

func (f *forwarder) tail() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.lines) == 0 {
		return "  (no output)"
	}
	return "  " + strings.Join(f.lines, "\n  ")
}
