//! A real Kubernetes API server for a test (kube-apiserver + etcd built from their Go modules
//! by scripts/test-apiserver, cached outside the repo), on 127.0.0.1 with a kubeconfig, and
//! a kube-rs client to make objects through it. Stopped and removed on drop.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::Value;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/test-apiserver")
}

fn run_script(args: &[&str]) -> String {
    let output = Command::new(script())
        .args(args)
        .output()
        .expect("running scripts/test-apiserver");
    assert!(
        output.status.success(),
        "scripts/test-apiserver {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub struct ApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    /// the namespace this test's objects go in
    pub namespace: String,
}

impl ApiServer {
    /// Starts one (building it first if the cache has none) and makes namespace `tag`.
    pub fn up(tag: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ebn-api-{tag}-{}-{id}", std::process::id()));
        let said = run_script(&["up", dir.to_str().unwrap()]);
        assert!(said.contains("ready"), "test-apiserver up: {said}");
        let kubeconfig = dir.join("kubeconfig");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            let config = kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .unwrap();
            kube::Client::try_from(config).unwrap()
        });
        let server = Self {
            dir,
            kubeconfig,
            runtime,
            client,
            namespace: tag.to_string(),
        };
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": tag}
        }))
        .unwrap();
        server.block_on(async {
            Api::<Namespace>::all(server.client.clone())
                .create(&PostParams::default(), &namespace)
                .await
                .unwrap()
        });
        server
    }

    pub fn kubeconfig_str(&self) -> &str {
        self.kubeconfig.to_str().unwrap()
    }

    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates or updates a Service (server-side apply of `spec`); returns it as stored.
    pub fn apply_service(&self, name: &str, spec: Value) -> Service {
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        });
        self.block_on(async {
            self.services()
                .patch(
                    name,
                    &PatchParams::apply("ebpf-net-test").force(),
                    &Patch::Apply(&object),
                )
                .await
                .unwrap_or_else(|err| panic!("applying service {name}: {err}"))
        })
    }

    /// Sets a Service's status (LoadBalancer ingress IPs), as a cloud controller would.
    pub fn set_service_status(&self, name: &str, status: Value) {
        let patch = serde_json::json!({"status": status});
        self.block_on(async {
            self.services()
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|err| panic!("setting the status of service {name}: {err}"))
        });
    }

    /// Creates or updates an EndpointSlice of `service` (what kube-controller-manager does in a
    /// cluster): `family` IPv4 or IPv6, `ports` [(name, port, protocol)], `endpoints` as JSON.
    pub fn apply_slice(
        &self,
        name: &str,
        service: &str,
        family: &str,
        ports: &[(&str, u16, &str)],
        endpoints: Value,
    ) {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(name, port, protocol)| serde_json::json!({"name": name, "port": port, "protocol": protocol}))
            .collect();
        let object = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": self.namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": family,
            "ports": ports,
            "endpoints": endpoints,
        });
        self.block_on(async {
            self.slices()
                .patch(
                    name,
                    &PatchParams::apply("ebpf-net-test").force(),
                    &Patch::Apply(&object),
                )
                .await
                .unwrap_or_else(|err| panic!("applying endpointslice {name}: {err}"))
        });
    }

    /// Creates or updates a Node (server-side apply of `labels` and `spec`), as a kubelet
    /// registering itself would; nodes are not namespaced, and each test has its own server.
    pub fn apply_node(&self, name: &str, labels: Value, spec: Value) {
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        });
        self.block_on(async {
            Api::<Node>::all(self.client.clone())
                .patch(
                    name,
                    &PatchParams::apply("ebpf-net-test").force(),
                    &Patch::Apply(&object),
                )
                .await
                .unwrap_or_else(|err| panic!("applying node {name}: {err}"))
        });
    }

    pub fn delete_slice(&self, name: &str) {
        self.block_on(async {
            self.slices()
                .delete(name, &DeleteParams::default())
                .await
                .unwrap()
        });
    }

    pub fn delete_service(&self, name: &str) {
        self.block_on(async {
            self.services()
                .delete(name, &DeleteParams::default())
                .await
                .unwrap()
        });
    }

    /// Creates every object of a multi-document YAML file, or with `dry_run` has the server
    /// validate them (admission, RBAC, schema) without storing them: `kubectl apply
    /// --dry-run=server` without kubectl. Errors name the object.
    pub fn create_manifest(&self, path: &std::path::Path, dry_run: bool) -> Result<Vec<String>, String> {
        use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
        let text = std::fs::read_to_string(path).unwrap();
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut made = Vec::new();
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let object: DynamicObject = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            let types = object.types.clone().ok_or("an object without apiVersion/kind")?;
            let (group, version) = types
                .api_version
                .rsplit_once('/')
                .unwrap_or(("", &types.api_version));
            let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
            let api: Api<DynamicObject> = match &object.metadata.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
                None => Api::all_with(self.client.clone(), &resource),
            };
            let params = PostParams {
                dry_run,
                ..PostParams::default()
            };
            let name = format!(
                "{} {}",
                types.kind,
                object.metadata.name.clone().unwrap_or_default()
            );
            self.block_on(api.create(&params, &object))
                .map_err(|e| format!("{name}: {e}"))?;
            made.push(name);
        }
        Ok(made)
    }

    /// A token of a ServiceAccount (TokenRequest), and a kubeconfig that uses it.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "spec": {"audiences": [], "expirationSeconds": 3600}
        }))
        .unwrap();
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let token = self
            .block_on(api.create_token_request(name, &PostParams::default(), &request))
            .unwrap_or_else(|e| panic!("a token of {namespace}/{name}: {e}"))
            .status
            .unwrap()
            .token;
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let admin_token = std::fs::read_to_string(self.dir.join("token")).unwrap();
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, admin.replace(admin_token.trim(), &token)).unwrap();
        path
    }

    /// Stops and starts it on the same data, port, token and certificates.
    pub fn restart(&self) {
        let said = run_script(&["restart", self.dir.to_str().unwrap()]);
        assert!(said.contains("ready"), "test-apiserver restart: {said}");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", self.dir.to_str().unwrap()])
            .output();
    }
}

/// An endpoint of a slice: `{"addresses": [addr], "conditions": ..., "nodeName": node}`.
pub fn endpoint(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    serde_json::json!({
        "addresses": [addr],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node,
    })
}
