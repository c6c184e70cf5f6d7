package main

// check: a smoke test of a running test API server through client-go, covering what
// ebpf-net's Kubernetes tests rely on. Run as `test-apiserver --check DIR`.

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

func check(dir string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", dir+"/kubeconfig")
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	step := func(name string, err error) error {
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		fmt.Printf("ok   %s\n", name)
		return nil
	}

	v, err := cs.Discovery().ServerVersion()
	if err := step("version "+fmt.Sprint(v), err); err != nil {
		return err
	}

	ns := fmt.Sprintf("check-%d", time.Now().UnixNano())
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err := step("namespace "+ns, err); err != nil {
		return err
	}

	// a watch opened before the objects exist must see them
	w, err := cs.DiscoveryV1().EndpointSlices(ns).Watch(ctx, metav1.ListOptions{})
	if err := step("watch endpointslices", err); err != nil {
		return err
	}
	defer w.Stop()

	dual := corev1.IPFamilyPolicyPreferDualStack
	svc, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:           corev1.ServiceTypeNodePort,
			IPFamilyPolicy: &dual,
			Selector:       map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP},
				{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
			},
		},
	}, metav1.CreateOptions{})
	if err == nil && (len(svc.Spec.ClusterIPs) != 2 || net.ParseIP(svc.Spec.ClusterIP) == nil || svc.Spec.Ports[0].NodePort == 0) {
		err = fmt.Errorf("clusterIPs %v, nodePort %d", svc.Spec.ClusterIPs, svc.Spec.Ports[0].NodePort)
	}
	if err := step(fmt.Sprintf("service clusterIPs %v nodePorts %d/%d", svc.Spec.ClusterIPs, svc.Spec.Ports[0].NodePort, svc.Spec.Ports[1].NodePort), err); err != nil {
		return err
	}

	ready, port, proto, name := true, int32(8080), corev1.ProtocolTCP, "http"
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
		},
		Ports: []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	slice, err = cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{})
	if err := step("endpointslice create", err); err != nil {
		return err
	}
	slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.1.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
	_, err = cs.DiscoveryV1().EndpointSlices(ns).Update(ctx, slice, metav1.UpdateOptions{})
	if err := step("endpointslice update", err); err != nil {
		return err
	}
	var seen []string
	for len(seen) < 2 {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				return fmt.Errorf("watch closed after %v", seen)
			}
			seen = append(seen, string(ev.Type))
		case <-ctx.Done():
			return fmt.Errorf("watch: saw %v before timeout", seen)
		}
	}
	if err := step("watch events "+strings.Join(seen, ","), expect(seen, string(watch.Added), string(watch.Modified))); err != nil {
		return err
	}

	// loopback endpoint addresses are refused by validation: tests must use others
	bad := slice.DeepCopy()
	bad.ObjectMeta = metav1.ObjectMeta{Name: "web-bad", Labels: slice.Labels}
	bad.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{"127.0.0.5"}}}
	_, err = cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, bad, metav1.CreateOptions{})
	if err == nil {
		err = fmt.Errorf("a 127.0.0.5 endpoint was accepted")
	} else if apierrors.IsInvalid(err) {
		err = nil
	}
	if err := step("endpointslice with a loopback address refused", err); err != nil {
		return err
	}

	// RBAC: a ServiceAccount bound to a ClusterRole, its token from the TokenRequest API
	_, err = cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "agent"}}, metav1.CreateOptions{})
	if err := step("serviceaccount", err); err != nil {
		return err
	}
	role := "check-reader-" + ns
	_, err = cs.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: role},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"services", "nodes"}, Verbs: []string{"list", "watch", "get"}},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch", "get"}},
		},
	}, metav1.CreateOptions{})
	if err := step("clusterrole", err); err != nil {
		return err
	}
	defer cs.RbacV1().ClusterRoles().Delete(context.Background(), role, metav1.DeleteOptions{})
	_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: "agent", Namespace: ns}},
	}, metav1.CreateOptions{})
	if err := step("clusterrolebinding", err); err != nil {
		return err
	}
	defer cs.RbacV1().ClusterRoleBindings().Delete(context.Background(), role, metav1.DeleteOptions{})
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "agent", &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
	if err := step("serviceaccount token", err); err != nil {
		return err
	}
	agentCfg := rest.AnonymousClientConfig(cfg)
	agentCfg.BearerToken = tr.Status.Token
	agent, err := kubernetes.NewForConfig(agentCfg)
	if err != nil {
		return err
	}
	// RBAC bindings reach the authorizer through an informer: allow it a moment
	var list *discoveryv1.EndpointSliceList
	for i := 0; i < 50; i++ {
		list, err = agent.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName})
		if !apierrors.IsForbidden(err) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err == nil && len(list.Items) == 0 {
		err = fmt.Errorf("no slices listed")
	}
	if err := step("serviceaccount lists endpointslices in all namespaces", err); err != nil {
		return err
	}
	_, err = agent.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
	if apierrors.IsForbidden(err) {
		err = nil
	} else if err == nil {
		err = fmt.Errorf("secrets were listed")
	}
	if err := step("serviceaccount may not list secrets", err); err != nil {
		return err
	}

	// streaming list (sendInitialEvents), as kube-rs's streaming_lists and client-go's WatchList use
	send := true
	w2, err := cs.DiscoveryV1().EndpointSlices(ns).Watch(ctx, metav1.ListOptions{
		SendInitialEvents:    &send,
		ResourceVersionMatch: metav1.ResourceVersionMatchNotOlderThan,
		AllowWatchBookmarks:  true,
	})
	if err == nil {
		defer w2.Stop()
		seen = nil
		for len(seen) == 0 || seen[len(seen)-1] != string(watch.Bookmark) {
			select {
			case ev, ok := <-w2.ResultChan():
				if !ok {
					err = fmt.Errorf("closed after %v", seen)
					break
				}
				seen = append(seen, string(ev.Type))
				continue
			case <-ctx.Done():
				err = fmt.Errorf("saw %v before timeout", seen)
			}
			break
		}
	}
	if err := step("watch with sendInitialEvents "+strings.Join(seen, ","), err); err != nil {
		return err
	}

	err = cs.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{})
	if err := step("service delete", err); err != nil {
		return err
	}
	// a namespace never finishes deleting without kube-controller-manager: leave it
	return nil
}

func expect(got []string, want ...string) error {
	if strings.Join(got, ",") != strings.Join(want, ",") {
		return fmt.Errorf("got %v, want %v", got, want)
	}
	return nil
}
