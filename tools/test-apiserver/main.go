// test-apiserver runs a real Kubernetes control plane for ebpf-net's tests: an embedded
// etcd (go.etcd.io/etcd/server/v3/embed) and kube-apiserver (k8s.io/kubernetes
// cmd/kube-apiserver/app) in one process, both serving on 127.0.0.1 only, the way
// Kubernetes' own integration test server does (cmd/kube-apiserver/app/testing), without
// its test-only dependencies.
//
//	test-apiserver --dir DIR [-- extra kube-apiserver flags...]
//	test-apiserver --check DIR     (smoke test of the server running in DIR)
//	test-apiserver --check DIR --load N  (N Services + N EndpointSlices of 10 endpoints)
//	test-apiserver --version
//
// DIR receives etcd's data, the serving certificates, the token file, the service
// account key and the ports; once /readyz answers and the "default" namespace exists it
// receives kubeconfig (token of a system:masters user), ca.crt, token, server (the URL)
// and last "ready" (the pid), and "ready" is printed on stdout. SIGTERM or SIGINT stops
// both servers and the process exits. Nothing is removed: started again on the same DIR
// it keeps the data, ports, token and certificates (a restart the clients ride through);
// scripts/test-apiserver down removes DIR.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "time/tzdata" // as kube-apiserver's main: CronJob time zones

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/embed"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/component-base/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

func main() {
	dir := flag.String("dir", "", "state directory (created if missing)")
	printVersion := flag.Bool("version", false, "print the kube-apiserver version and exit")
	checkDir := flag.String("check", "", "smoke-test the server running in this directory, then exit")
	loadN := flag.Int("load", 0, "with --check: instead, create this many Services with an EndpointSlice of 10 endpoints each")
	flag.Parse()
	if *printVersion {
		fmt.Println(version.Get().GitVersion)
		return
	}
	if *checkDir != "" && *loadN > 0 {
		if err := load(*checkDir, *loadN); err != nil {
			fatal(fmt.Errorf("load: %w", err))
		}
		return
	}
	if *checkDir != "" {
		if err := check(*checkDir); err != nil {
			fatal(fmt.Errorf("check: %w", err))
		}
		return
	}
	if *dir == "" {
		fatal(errors.New("--dir is required"))
	}
	if err := run(*dir, flag.Args()); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "test-apiserver: %v\n", err)
	os.Exit(1)
}

func run(dir string, extraFlags []string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for _, d := range []string{dir, filepath.Join(dir, "certs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	// A directory that already holds a state (a restart) keeps it: the token, the keys, the
	// serving certificates (reused by --cert-dir), etcd's data and the three ports, so that
	// clients holding the kubeconfig reconnect to the same server.
	tokenFile := filepath.Join(dir, "tokens.csv")
	token, err := readToken(tokenFile)
	if err != nil {
		if token, err = randomHex(24); err != nil {
			return err
		}
		if err := os.WriteFile(tokenFile, []byte(token+`,admin,admin-uid,"system:masters"`+"\n"), 0o600); err != nil {
			return err
		}
	}
	saKeyFile := filepath.Join(dir, "sa.key")
	if _, err := os.Stat(saKeyFile); err != nil {
		if err := writeECKey(saKeyFile); err != nil {
			return err
		}
	}
	portsFile := filepath.Join(dir, "ports")
	ports := readPorts(portsFile) // apiserver, etcd client, etcd peer; nil the first time

	var etcd *embed.Etcd
	var listener net.Listener
	if ports != nil {
		if listener, err = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", ports[0])); err != nil {
			return fmt.Errorf("listen for kube-apiserver on its previous port: %w", err)
		}
		if etcd, err = startEtcd(filepath.Join(dir, "etcd"), ports[1:]); err != nil {
			return err
		}
	} else {
		if listener, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return fmt.Errorf("listen for kube-apiserver: %w", err)
		}
		if etcd, err = startEtcd(filepath.Join(dir, "etcd"), nil); err != nil {
			return err
		}
	}
	defer etcd.Close()
	etcdURL := etcd.Clients[0].Addr().String()
	port := listener.Addr().(*net.TCPAddr).Port
	etcdPeer := etcd.Peers[0].Addr().(*net.TCPAddr).Port
	etcdClient := etcd.Clients[0].Addr().(*net.TCPAddr).Port
	if err := writeAtomic(portsFile, []byte(fmt.Sprintf("%d %d %d\n", port, etcdClient, etcdPeer))); err != nil {
		return err
	}

	s := options.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	args := []string{
		"--etcd-servers=http://" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--cert-dir=" + filepath.Join(dir, "certs"),
		// dual-stack, so that tests can create Services with clusterIPs of both families
		"--service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/108",
		"--service-node-port-range=30000-32767",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + saKeyFile,
		"--service-account-signing-key-file=" + saKeyFile,
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--token-auth-file=" + tokenFile,
		"--authorization-mode=RBAC",
		// the default ServiceAccount of each namespace comes from kube-controller-manager,
		// which does not run here
		"--disable-admission-plugins=ServiceAccount",
		// the lease reconciler would publish 127.0.0.1 as the endpoint of the "kubernetes"
		// Service, which endpoint validation rejects (loopback)
		"--endpoint-reconciler-type=none",
		// the DaemonSet of deploy/ is privileged: accept it in --dry-run=server
		"--allow-privileged=true",
		"--profiling=false",
		"--v=0",
	}
	if err := fs.Parse(append(args, extraFlags...)); err != nil {
		return fmt.Errorf("kube-apiserver flags: %w", err)
	}
	s.SecureServing.Listener = listener
	s.SecureServing.BindPort = port
	s.SecureServing.ExternalAddress = net.ParseIP("127.0.0.1")

	// what NewAPIServerCommand's PersistentPreRunE and RunE do before app.Run
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return err
	}
	completed, err := s.Complete(ctx)
	if err != nil {
		return err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return utilerrors.NewAggregate(errs)
	}
	featureGate.(featuregate.MutableFeatureGate).AddMetrics()
	s.GenericServerRunOptions.ComponentGlobalsRegistry.AddMetrics()

	server := "https://127.0.0.1:" + strconv.Itoa(port)
	go waitReady(ctx, dir, server, token)

	errc := make(chan error, 1)
	go func() { errc <- app.Run(ctx, completed) }()
	select {
	case err = <-errc:
	case err = <-etcd.Err():
		err = fmt.Errorf("etcd: %w", err)
	}
	if ctx.Err() != nil {
		return nil // stopped by a signal
	}
	if err == nil {
		err = errors.New("kube-apiserver stopped")
	}
	return err
}

// startEtcd starts a single-member etcd on two free loopback ports (retrying if another
// process took one of them between the probe and the bind).
func startEtcd(dataDir string, fixed []int) (*embed.Etcd, error) {
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		ports, err := fixed, error(nil)
		if ports == nil {
			ports, err = freePorts(2)
		}
		if err != nil {
			return nil, err
		}
		cfg := embed.NewConfig()
		cfg.Dir = dataDir
		cfg.UnsafeNoFsync = true // a test store: never restarted after a crash, never kept
		client := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(ports[0])}
		peer := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(ports[1])}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
		cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
		cfg.LogLevel = "warn"
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			lastErr = err
			if fixed == nil && strings.Contains(err.Error(), "address already in use") {
				os.RemoveAll(dataDir)
				continue
			}
			return nil, fmt.Errorf("etcd: %w", err)
		}
		select {
		case <-e.Server.ReadyNotify():
			return e, nil
		case <-time.After(60 * time.Second):
			e.Close()
			return nil, errors.New("etcd: not ready after 60 s")
		}
	}
	return nil, fmt.Errorf("etcd: %w", lastErr)
}

func freePorts(n int) ([]int, error) {
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitReady polls /readyz and the default namespace, then writes the client files and
// prints "ready".
func waitReady(ctx context.Context, dir, server, token string) {
	bundle := filepath.Join(dir, "certs", "apiserver.crt")
	var ca []byte
	var client *http.Client
	for ctx.Err() == nil {
		time.Sleep(100 * time.Millisecond)
		if client == nil {
			pemBytes, err := os.ReadFile(bundle)
			if err != nil {
				continue
			}
			ca = caCerts(pemBytes)
			pool := x509.NewCertPool()
			if len(ca) == 0 || !pool.AppendCertsFromPEM(ca) {
				continue
			}
			client = &http.Client{
				Timeout:   5 * time.Second,
				Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
			}
		}
		if get(ctx, client, server+"/readyz", token) != nil ||
			get(ctx, client, server+"/api/v1/namespaces/default", token) != nil {
			continue
		}
		files := map[string][]byte{
			"ca.crt":     ca,
			"token":      []byte(token + "\n"),
			"server":     []byte(server + "\n"),
			"kubeconfig": kubeconfig(server, ca, token),
			"ready":      []byte(strconv.Itoa(os.Getpid()) + "\n"),
		}
		for _, name := range []string{"ca.crt", "token", "server", "kubeconfig", "ready"} {
			if err := writeAtomic(filepath.Join(dir, name), files[name]); err != nil {
				fmt.Fprintf(os.Stderr, "test-apiserver: %v\n", err)
				return
			}
		}
		fmt.Println("ready")
		return
	}
}

func get(ctx context.Context, client *http.Client, u, token string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", u, resp.Status)
	}
	return nil
}

// caCerts keeps the CA certificates of the self-generated serving bundle (leaf + CA), so
// that clients trust the CA rather than the leaf.
func caCerts(bundle []byte) []byte {
	var out []byte
	for {
		var block *pem.Block
		block, bundle = pem.Decode(bundle)
		if block == nil {
			return out
		}
		if c, err := x509.ParseCertificate(block.Bytes); err == nil && c.IsCA {
			out = append(out, pem.EncodeToMemory(block)...)
		}
	}
}

func kubeconfig(server string, ca []byte, token string) []byte {
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test-apiserver
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: test-apiserver
  context:
    cluster: test-apiserver
    user: admin
    namespace: default
current-context: test-apiserver
`, server, base64.StdEncoding.EncodeToString(ca), token))
}

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	token, _, ok := strings.Cut(string(b), ",")
	if !ok || token == "" {
		return "", fmt.Errorf("%s: no token", path)
	}
	return token, nil
}

func readPorts(path string) []int {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var p [3]int
	if n, _ := fmt.Sscan(string(b), &p[0], &p[1], &p[2]); n != 3 {
		return nil
	}
	return p[:]
}

func writeAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func writeECKey(path string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}
