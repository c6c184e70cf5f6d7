//! `ebpf-net kube` end to end against a real kube-apiserver (scripts/test-apiserver): Services
//! and EndpointSlices made through the API, the agent driving clusterip on a test cgroup and
//! lb in a node namespace (`-n`), clients in the cgroup and in a client namespace, three
//! backend namespaces with echo servers.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::apiserver::{endpoint, ApiServer};
use common::cgroup::{Client, Seen, TestCgroup, HELPER_ENV};
use common::kernel::{self, scaled, Feature};
use common::servers::{echo_to_the_end, echo_until, http, read_greeting, tcp_talk, EchoBackends, TIMEOUT};
use common::topology::{output_within, veth, Daemon, Netns, BIN};
use serde_json::{json, Value};

/// The helper process a [`Client`] runs: this binary again, serving commands.
#[test]
#[ignore = "a client process of the other tests, not a test"]
fn client_helper() {
    if std::env::var_os(HELPER_ENV).is_some() {
        common::cgroup::helper_main();
    }
}

/// A node namespace with three backends behind it and a client namespace in front (on the
/// node's `c0`: 10.9.0.1 and fd09::1), a test cgroup, and an API server of its own.
struct Lab {
    api: ApiServer,
    cgroup: TestCgroup,
    backends: EchoBackends,
    client: Netns,
    node: Netns,
    node_name: String,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let api = ApiServer::up(tag);
        let node = Netns::new(&format!("{tag}-n"));
        let backends = EchoBackends::start(&node, tag);
        let client = Netns::new(&format!("{tag}-c"));
        veth(&node, "c0", &client, "eth0");
        node.exec("ip addr add 10.9.0.1/24 dev c0 && ip addr add fd09::1/64 dev c0 nodad");
        client.exec(
            "ip addr add 10.9.0.2/24 dev eth0 && ip addr add fd09::2/64 dev eth0 nodad && \
             ip route add default via 10.9.0.1 && ip route add default via fd09::1",
        );
        Self {
            api,
            cgroup: TestCgroup::new(tag),
            backends,
            client,
            node,
            node_name: format!("node-{tag}"),
        }
    }

    /// The agent on the lab's node: ClusterIPs on the cgroup, and NodePorts through lb on
    /// c0 where the kernel runs lb (6.1); below it ClusterIPs only (`kube -i` refuses there:
    /// [`node_ports_load_balancer_ips_and_external_traffic_policy_local_from_a_client_namespace`]).
    fn agent_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-n",
            &self.node.name,
            "kube",
            "--kubeconfig",
            self.api.kubeconfig_str(),
            "--cgroup",
            self.cgroup.path_str(),
            "--node-name",
            &self.node_name,
            "--healthz",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if kernel::has(Feature::CtNat) {
            args.extend(["-i".to_string(), "c0".to_string()]);
        }
        args
    }

    fn agent(&self) -> Daemon {
        let args = self.agent_args();
        Daemon::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Endpoint JSON of backend `i` (0..3) of a family, on `node`.
    fn endpoint(
        &self,
        v4: bool,
        i: usize,
        node: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
    ) -> Value {
        let list = if v4 { &self.backends.v4 } else { &self.backends.v6 };
        endpoint(&list[i].ip().to_string(), node, ready, serving, terminating)
    }

    fn ready(&self, v4: bool, indexes: &[usize]) -> Value {
        Value::Array(
            indexes
                .iter()
                .map(|i| self.endpoint(v4, *i, &self.node_name, true, true, false))
                .collect(),
        )
    }

    fn backend(&self, v4: bool, i: usize) -> SocketAddr {
        if v4 {
            self.backends.v4[i]
        } else {
            self.backends.v6[i]
        }
    }
}

impl Drop for Lab {
    /// What the test's agents drove and their records under /run/ebpf-net/kube, also after a
    /// failure (the cgroup's and namespace's own cleanup removes the pins, not the record).
    fn drop(&mut self) {
        let _ = std::process::Command::new(BIN)
            .args([
                "-n",
                &self.node.name,
                "down",
                "kube",
                "--cgroup",
                self.cgroup.path_str(),
            ])
            .output();
    }
}

fn cluster_ips(service: &k8s_openapi::api::core::v1::Service) -> Vec<String> {
    service.spec.as_ref().unwrap().cluster_ips.clone().unwrap()
}

fn with_port(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Polls `check` until it holds, for at most `timeout` (scaled in slow VMs); how long it took.
fn within(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let deadline = start + scaled(timeout);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn servers(client: &mut Client, command: &str) -> Vec<Seen> {
    client.run(command).iter().map(|line| Seen::parse(line)).collect()
}

/// A TCP exchange from `netns`: (the backend that answered, the client address it saw).
fn answered(netns: &Netns, target: SocketAddr) -> (SocketAddr, SocketAddr) {
    let stream = netns.enter(|| std::net::TcpStream::connect_timeout(&target, TIMEOUT).expect("TCP connect"));
    let greeting = tcp_talk(&stream, b"hi");
    (greeting.server, greeting.seen)
}

fn status_json() -> Value {
    let output = output_within(std::process::Command::new(BIN).args(["status", "--json"]));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn cluster_ips_from_the_api_serve_the_cgroup_and_follow_endpoint_changes() {
    let lab = Lab::new("kcip");
    let web = lab.api.apply_service(
        "web",
        json!({"ipFamilyPolicy": "PreferDualStack",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                         {"name": "echo", "port": 7, "targetPort": 8080, "protocol": "UDP"}]}),
    );
    let ports = [("http", 8080, "TCP"), ("echo", 8080, "UDP")];
    lab.api
        .apply_slice("web-4", "web", "IPv4", &ports, lab.ready(true, &[0, 1, 2]));
    lab.api
        .apply_slice("web-6", "web", "IPv6", &ports, lab.ready(false, &[0, 1, 2]));
    let sticky = lab.api.apply_service(
        "sticky",
        json!({"sessionAffinity": "ClientIP",
               "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    );
    lab.api.apply_slice(
        "sticky-4",
        "sticky",
        "IPv4",
        &[("", 8080, "TCP")],
        lab.ready(true, &[0, 1, 2]),
    );
    let ips = cluster_ips(&web);
    assert_eq!(ips.len(), 2, "a dual-stack service: {ips:?}");
    let (vip4, vip6) = (with_port(&ips[0], 80), with_port(&ips[1], 80));

    let agent = lab.agent();
    let ready = agent
        .stderr()
        .into_iter()
        .find(|l| l.contains("kube: ready:"))
        .unwrap();
    assert!(ready.contains(&format!("node {}", lab.node_name)), "{ready}");
    let mut client = Client::start(&lab.cgroup, &lab.node);
    // TCP and UDP of both families reach a backend, and the sockets see the ClusterIP
    for (vip, v4) in [(vip4, true), (vip6, false)] {
        let all: HashSet<SocketAddr> = (0..3).map(|i| lab.backend(v4, i)).collect();
        for (command, port) in [("tcp", 80), ("udpc", 7), ("udp", 7)] {
            let vip = SocketAddr::new(vip.ip(), port);
            for seen in servers(&mut client, &format!("{command} {vip} 6")) {
                assert!(all.contains(&seen.server), "{command} {vip}: {seen:?}");
                assert_eq!(seen.peer, vip, "{command} {vip}: {seen:?}");
            }
        }
    }
    // ClientIP affinity: one backend for every connection of this client
    let sticky_vip = with_port(&cluster_ips(&sticky)[0], 80);
    let chosen: HashSet<SocketAddr> = servers(&mut client, &format!("tcp {sticky_vip} 20"))
        .iter()
        .map(|s| s.server)
        .collect();
    assert_eq!(chosen.len(), 1, "sessionAffinity ClientIP: {chosen:?}");

    // a resolver-like connected UDP socket whose backend leaves: destroyed (ECONNABORTED), so
    // its owner connects again, to a backend that is there (cilium#27300)
    let vip_udp = SocketAddr::new(vip4.ip(), 7);
    let udp = Seen::parse(&client.run(&format!("udphold {vip_udp}"))[0]);
    assert!(client.run("udpping")[0].starts_with("ok "));
    let rest: Vec<usize> = (0..3).filter(|i| lab.backend(true, *i) != udp.server).collect();
    lab.api
        .apply_slice("web-4", "web", "IPv4", &ports, lab.ready(true, &rest));
    // destroyed: disconnected with ECONNABORTED pending, so a send fails EDESTADDRREQ (89)
    // and a receive ECONNABORTED (103); a live socket answers. Before 6.5 the agent says in
    // one line that it cannot, and the rest holds all the same
    if kernel::has(Feature::SockDestroy) {
        let took = within(
            "the UDP socket of a removed backend is destroyed",
            Duration::from_secs(10),
            || {
                let said = client.run("udpping").remove(0);
                said == "err errno=89" || said == "err errno=103"
            },
        );
        eprintln!("connected UDP socket destroyed {took:?} after its backend's removal");
    } else {
        kernel::skip(&format!(
            "its destroyed-UDP-socket step needs {}",
            Feature::SockDestroy.describe()
        ));
        within(
            "the agent saying it cannot destroy sockets",
            Duration::from_secs(10),
            || {
                agent
                    .stderr()
                    .iter()
                    .any(|line| line.contains("bpf_sock_destroy needs Linux 6.5"))
            },
        );
    }
    for seen in servers(&mut client, &format!("udpc {vip_udp} 6")) {
        assert_ne!(
            seen.server, udp.server,
            "a new UDP socket reached the removed backend"
        );
    }
    lab.api
        .apply_slice("web-4", "web", "IPv4", &ports, lab.ready(true, &[0, 1, 2]));
    within("all three backends again", Duration::from_secs(10), || {
        servers(&mut client, &format!("tcp {vip4} 30"))
            .iter()
            .map(|s| s.server)
            .collect::<HashSet<_>>()
            .len()
            == 3
    });

    // an open connection, then its backend's endpoint removed: new connections follow, the
    // open one keeps working
    let held = Seen::parse(&client.run(&format!("hold {vip4}"))[0]);
    let others: Vec<usize> = (0..3).filter(|i| lab.backend(true, *i) != held.server).collect();
    lab.api
        .apply_slice("web-4", "web", "IPv4", &ports, lab.ready(true, &others));
    let took = within(
        "new connections leave the removed endpoint",
        Duration::from_secs(10),
        || {
            servers(&mut client, &format!("tcp {vip4} 6"))
                .iter()
                .all(|s| s.server != held.server)
        },
    );
    eprintln!("endpoint removal seen by new connections after {took:?}");
    assert_eq!(client.run("ping"), ["ok ping"], "the open connection broke");

    // one endpoint terminating but serving, another ready: the ready one takes every new
    // connection; with no ready one left, the terminating one serves
    let (a, b) = (others[0], others[1]);
    let endpoints = json!([
        lab.endpoint(true, a, &lab.node_name, true, true, false),
        lab.endpoint(true, b, &lab.node_name, false, true, true),
    ]);
    lab.api.apply_slice("web-4", "web", "IPv4", &ports, endpoints);
    within(
        "only the ready endpoint takes new connections",
        Duration::from_secs(10),
        || {
            servers(&mut client, &format!("tcp {vip4} 8"))
                .iter()
                .all(|s| s.server == lab.backend(true, a))
        },
    );
    lab.api.apply_slice(
        "web-4",
        "web",
        "IPv4",
        &ports,
        json!([lab.endpoint(true, b, &lab.node_name, false, true, true)]),
    );
    within(
        "the terminating endpoint serves when none is ready",
        Duration::from_secs(10),
        || {
            servers(&mut client, &format!("tcp {vip4} 4"))
                .iter()
                .all(|s| s.server == lab.backend(true, b))
        },
    );

    // no endpoints: the ClusterIP refuses at connect() (EPERM before bpf_set_retval, 5.18)
    lab.api.delete_slice("web-4");
    let refused = if kernel::has(Feature::SetRetval) {
        "ConnectionRefused"
    } else {
        "PermissionDenied"
    };
    within(
        "a service without endpoints refuses",
        Duration::from_secs(10),
        || client.run(&format!("try tcp {vip4}"))[0].contains(refused),
    );
    // the service deleted: its ClusterIP is gone from the tables
    lab.api.delete_service("web");
    within(
        "a deleted service leaves the tables",
        Duration::from_secs(10),
        || {
            let status = status_json().to_string();
            !status.contains(&format!("{}:80", ips[0])) && status.contains(&sticky_vip.to_string())
        },
    );
    drop(client);
    let (code, log) = agent.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("stay pinned and serving")),
        "{log:?}"
    );
}

/// One HTTP GET to the agent's health server: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let answer = http(addr, request.as_bytes(), TIMEOUT).expect("asking /healthz");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (
        status,
        answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    )
}

#[test]
fn this_node_from_the_api_gives_the_zone_of_topology_hints_and_its_removal_fails_healthz() {
    let lab = Lab::new("knode");
    let zone = |name: &str| json!({"topology.kubernetes.io/zone": name});
    lab.api.apply_node(&lab.node_name, zone("zone-a"), json!({}));
    let web = lab.api.apply_service(
        "web",
        json!({"ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    );
    // backend 0 hinted for zone-a, backends 1 and 2 for zone-b (the EndpointSlice
    // controller's topology-aware routing)
    let hinted: Vec<Value> = [(0, "zone-a"), (1, "zone-b"), (2, "zone-b")]
        .iter()
        .map(|(i, zone)| {
            let mut endpoint = lab.endpoint(true, *i, "elsewhere", true, true, false);
            endpoint["hints"] = json!({"forZones": [{"name": zone}]});
            endpoint
        })
        .collect();
    lab.api
        .apply_slice("web-4", "web", "IPv4", &[("", 8080, "TCP")], Value::Array(hinted));
    let vip = with_port(&cluster_ips(&web)[0], 80);

    let agent = lab.agent();
    let healthz = agent
        .wait_stderr("kube: healthz at http://", 0, TIMEOUT)
        .expect("the healthz line");
    let healthz = healthz
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/healthz")
        .to_string();
    let mut client = Client::start(&lab.cgroup, &lab.node);
    let reached = |client: &mut Client| -> HashSet<SocketAddr> {
        servers(client, &format!("tcp {vip} 30"))
            .iter()
            .map(|s| s.server)
            .collect()
    };
    assert_eq!(
        reached(&mut client),
        HashSet::from([lab.backend(true, 0)]),
        "zone-a's endpoint only"
    );
    // the node moves to zone-b (its label changed): the other two
    lab.api.apply_node(&lab.node_name, zone("zone-b"), json!({}));
    let zone_b = HashSet::from([lab.backend(true, 1), lab.backend(true, 2)]);
    within(
        "zone-b's endpoints after the node's label changed",
        Duration::from_secs(10),
        || reached(&mut client) == zone_b,
    );

    // the cluster autoscaler marks the node for removal: /healthz fails (load balancers stop
    // sending), /livez does not (the agent is fine), the services keep working
    assert_eq!(get(&healthz, "/healthz").0, 200);
    let taint =
        json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]});
    lab.api.apply_node(&lab.node_name, zone("zone-b"), taint);
    within(
        "/healthz fails for a node being removed",
        Duration::from_secs(10),
        || get(&healthz, "/healthz").0 == 503,
    );
    let (status, body) = get(&healthz, "/healthz");
    assert!(
        status == 503 && body.contains("\"nodeEligible\": false"),
        "{status} {body}"
    );
    assert_eq!(get(&healthz, "/livez").0, 200);
    assert_eq!(reached(&mut client), zone_b);
    lab.api.apply_node(&lab.node_name, zone("zone-b"), json!({}));
    within(
        "/healthz back once the taint is gone",
        Duration::from_secs(10),
        || get(&healthz, "/healthz").0 == 200,
    );
    let (_, lines) = agent.stop();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ToBeDeletedByClusterAutoscaler taint: /healthz answers 503")),
        "{lines:#?}"
    );
}

#[test]
fn node_ports_load_balancer_ips_and_external_traffic_policy_local_from_a_client_namespace() {
    let lab = Lab::new("knp");
    if !kernel::has(Feature::CtNat) {
        // -i runs lb: refused up front in one line that names the way out
        let mut args = lab.agent_args();
        args.extend(["-i".to_string(), "c0".to_string()]);
        let output = output_within(std::process::Command::new(BIN).args(&args[..]));
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && said.lines().count() == 1 && said.contains("--xdp puts xdp-lb there"),
            "{said}"
        );
        kernel::require_for(Feature::CtNat, "NodePorts through lb");
        return;
    }
    let service = lab.api.apply_service(
        "front",
        json!({"type": "LoadBalancer",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    );
    lab.api.set_service_status(
        "front",
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}),
    );
    let spec = service.spec.as_ref().unwrap();
    let node_port = spec.ports.as_ref().unwrap()[0].node_port.unwrap() as u16;
    // backend 0 on this node, 1 and 2 elsewhere
    let endpoints = json!([
        lab.endpoint(true, 0, &lab.node_name, true, true, false),
        lab.endpoint(true, 1, "elsewhere", true, true, false),
        lab.endpoint(true, 2, "elsewhere", true, true, false),
    ]);
    lab.api
        .apply_slice("front-4", "front", "IPv4", &[("http", 8080, "TCP")], endpoints);
    let agent = lab.agent();
    let node_vip: SocketAddr = format!("10.9.0.1:{node_port}").parse().unwrap();
    let lb_vip: SocketAddr = "192.0.2.10:80".parse().unwrap();
    let client_ip: std::net::IpAddr = "10.9.0.2".parse().unwrap();
    for vip in [node_vip, lb_vip] {
        let answers: Vec<(SocketAddr, SocketAddr)> = (0..30).map(|_| answered(&lab.client, vip)).collect();
        let seen: HashSet<SocketAddr> = answers.iter().map(|a| a.0).collect();
        assert_eq!(seen.len(), 3, "{vip} (externalTrafficPolicy Cluster): {seen:?}");
        // Cluster: the source is this node's address towards the backend
        assert!(
            answers.iter().all(|a| a.1.ip() != client_ip),
            "{vip}: {answers:?}"
        );
    }
    // the agent answers lb's asks: an established flow's segments go on past the stack
    let bulk: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let stream = lab
        .client
        .enter(|| std::net::TcpStream::connect_timeout(&lb_vip, TIMEOUT).expect("TCP connect"));
    let driven_counters = || {
        status_json()["persisted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["subcommand"] == "lb" && p["netns"] == lab.node.name.as_str())
            .expect("the agent's lb in status")["details"]["counters"]
            .clone()
    };
    read_greeting(&stream);
    // rounds until the agent has answered (at its own pace: on a loaded machine a whole 4 MiB
    // echo once went by before it did)
    let handed = echo_until(&stream, &[7u8; 16 * 1024], scaled(TIMEOUT), || {
        driven_counters()["tcp_forwarded"].as_u64().unwrap() > 0
    });
    assert!(handed, "the agent never answered: {}", driven_counters());
    let before = driven_counters()["tcp_forwarded"].as_u64().unwrap();
    echo_to_the_end(&stream, &bulk);
    let counters = driven_counters();
    let sent_on = counters["tcp_forwarded"].as_u64().unwrap() - before;
    // 4 MiB is about 2,900 full segments
    assert!(sent_on >= 2000, "{sent_on} of a 4 MiB echo sent on: {counters}");
    // Local: this node's endpoint only, and a healthCheckNodePort that says so
    let service = lab.api.apply_service(
        "front",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
    );
    let health_port = service.spec.as_ref().unwrap().health_check_node_port.unwrap();
    within(
        "Local keeps this node's endpoint",
        Duration::from_secs(10),
        || (0..10).all(|_| answered(&lab.client, node_vip).0 == lab.backend(true, 0)),
    );
    for vip in [node_vip, lb_vip] {
        for _ in 0..10 {
            // Local: this node's endpoint, and it sees the client's own address
            let (server, seen) = answered(&lab.client, vip);
            assert_eq!(server, lab.backend(true, 0), "{vip}");
            assert_eq!(
                seen.ip(),
                client_ip,
                "{vip}: externalTrafficPolicy Local keeps the source"
            );
        }
    }
    let health = |lab: &Lab| {
        lab.client.exec(&format!(
            "curl -s -m 5 -w \" %{{http_code}}\" http://10.9.0.1:{health_port}/ || true"
        ))
    };
    let said = health(&lab);
    assert!(
        said.ends_with(" 200") && said.contains("\"localEndpoints\":1"),
        "{said}"
    );
    // the local endpoint gone: 503, and the cloud's load balancer would skip this node
    let endpoints = json!([
        lab.endpoint(true, 1, "elsewhere", true, true, false),
        lab.endpoint(true, 2, "elsewhere", true, true, false),
    ]);
    lab.api
        .apply_slice("front-4", "front", "IPv4", &[("http", 8080, "TCP")], endpoints);
    within("healthCheckNodePort says 503", Duration::from_secs(10), || {
        health(&lab).ends_with(" 503")
    });
    // `down kube`: refused while the agent runs; after it, what it drove and left pinned goes
    let down = |with_netns: bool| {
        let mut args = vec!["down", "kube", "--cgroup", lab.cgroup.path_str()];
        if with_netns {
            args.splice(0..0, ["-n", lab.node.name.as_str()]);
        }
        output_within(std::process::Command::new(BIN).args(&args))
    };
    let refused = down(true);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("stop it first"),
        "{said}"
    );
    let (code, log) = agent.stop();
    assert_eq!(code, Some(0), "{log:?}");
    // at least the bulk flow (short ones may have asked too)
    let handed: u64 = log
        .iter()
        .find_map(|l| l.split("TCP flows handed over by conntrack ").nth(1))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no handover line: {log:?}"));
    assert!(handed >= 1, "{log:?}");
    let cgroup_name = lab.cgroup.path_str().rsplit('/').next().unwrap().to_string();
    let pinned = |status: &Value| {
        status["persisted"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                (p["subcommand"] == "lb" && p["netns"] == lab.node.name.as_str())
                    || (p["subcommand"] == "clusterip"
                        && p["target_display"]
                            .as_str()
                            .is_some_and(|t| t.ends_with(&cgroup_name)))
            })
            .count()
    };
    assert_eq!(
        pinned(&status_json()),
        2,
        "clusterip and lb stay pinned after the agent"
    );
    // lb is in the node's namespace: `down kube` outside it says where, removes nothing
    let elsewhere = down(false);
    let said = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success() && said.contains(&format!("-n {}", lab.node.name)),
        "{said}"
    );
    assert_eq!(pinned(&status_json()), 2);
    let done = down(true);
    let said = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{said}");
    assert!(
        said.contains("removed clusterip") && said.contains("removed lb"),
        "{said}"
    );
    assert_eq!(pinned(&status_json()), 0, "{said}");
}

#[test]
fn the_agent_restarted_or_killed_mid_traffic_loses_nothing_and_the_api_server_restarted_resyncs() {
    let lab = Lab::new("krs");
    let web = lab
        .api
        .apply_service("web", json!({"ports": [{"port": 80, "targetPort": 8080}]}));
    lab.api.apply_slice(
        "web-4",
        "web",
        "IPv4",
        &[("", 8080, "TCP")],
        lab.ready(true, &[0, 1, 2]),
    );
    let vip = with_port(&cluster_ips(&web)[0], 80);
    let agent = lab.agent();
    let mut client = Client::start(&lab.cgroup, &lab.node);
    client.run(&format!("hold {vip}"));
    // stopped: everything stays programmed
    let (code, _) = agent.stop();
    assert_eq!(code, Some(0));
    assert_eq!(servers(&mut client, &format!("tcp {vip} 20")).len(), 20);
    assert_eq!(client.run("ping"), ["ok ping"]);
    // restarted: the same tables, nothing changed in them
    let agent = lab.agent();
    let ready = agent
        .stderr()
        .into_iter()
        .find(|l| l.contains("kube: ready:"))
        .unwrap();
    let log = agent.stderr().join("\n");
    assert!(log.contains("0 added, 0 changed, 0 removed"), "{log}");
    // killed: the next one takes over
    agent.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(servers(&mut client, &format!("tcp {vip} 20")).len(), 20);
    let agent = lab.agent();
    assert_eq!(client.run("ping"), ["ok ping"], "after {ready}");

    // the API server restarted under the agent: its watches come back and changes flow again
    lab.api.restart();
    lab.api.apply_slice(
        "web-4",
        "web",
        "IPv4",
        &[("", 8080, "TCP")],
        lab.ready(true, &[1]),
    );
    let took = within(
        "a change after the API server's restart",
        Duration::from_secs(30),
        || {
            servers(&mut client, &format!("tcp {vip} 6"))
                .iter()
                .all(|s| s.server == lab.backend(true, 1))
        },
    );
    eprintln!("change after the API server restart applied after {took:?}");
    drop(client);
    let (code, log) = agent.stop();
    assert_eq!(code, Some(0), "{log:?}");
}

#[test]
fn deploy_manifests_pass_the_api_server_and_the_service_account_is_enough_for_the_agent() {
    let api = ApiServer::up("kdep");
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for file in ["rbac.yaml", "daemonset.yaml"] {
        let checked = api.create_manifest(&deploy.join(file), true).unwrap();
        assert!(!checked.is_empty(), "{file}");
    }
    // the agent with the ServiceAccount's own token: what the ClusterRole grants is enough
    api.create_manifest(&deploy.join("rbac.yaml"), false).unwrap();
    let kubeconfig = api.service_account_kubeconfig("kube-system", "ebpf-net");
    let cgroup = TestCgroup::new("kdep");
    let args = [
        "kube",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--cgroup",
        cgroup.path_str(),
        "--node-name",
        "n",
        "--healthz",
        "off",
    ];
    let agent = Daemon::start(&args);
    let (code, log) = agent.stop();
    assert_eq!(code, Some(0), "{log:?}");
    assert!(
        !log.iter()
            .any(|l| l.contains("forbidden") || l.contains("Forbidden")),
        "{log:?}"
    );
    let down =
        output_within(std::process::Command::new(BIN).args(["down", "kube", "--cgroup", cgroup.path_str()]));
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
}

#[test]
fn bad_configuration_gets_one_line_and_leaves_nothing_attached() {
    let cgroup = TestCgroup::new("kbad");
    let missing = "/nonexistent/kubeconfig";
    let node = Netns::new("kbad");
    let dir = std::env::temp_dir().join(format!("ebn-kbad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // an API server that is not there: a closed port on loopback
    let closed = dir.join("closed.kubeconfig");
    std::fs::write(
        &closed,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["kube", "--kubeconfig", missing, "--cgroup", cgroup.path_str()],
            "--kubeconfig /nonexistent/kubeconfig",
        ),
        (
            vec![
                "kube",
                "--kubeconfig",
                closed.to_str().unwrap(),
                "--cgroup",
                cgroup.path_str(),
                "--healthz",
                "off",
            ],
            "the API server does not answer",
        ),
        (
            vec![
                "-n",
                &node.name,
                "kube",
                "--kubeconfig",
                missing,
                "--cgroup",
                cgroup.path_str(),
                "-i",
                "nope0",
            ],
            "unknown interface 'nope0'",
        ),
        (
            vec!["kube", "--kubeconfig", missing, "--xdp"],
            "--xdp puts xdp-lb on the interfaces",
        ),
        (
            vec!["kube", "--kubeconfig", missing, "--cgroup", "/nonexistent-cgroup"],
            "nonexistent-cgroup",
        ),
    ];
    for (args, expected) in cases {
        let output = output_within(std::process::Command::new(BIN).args(&args));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {stderr}");
        assert!(lines[0].contains(expected), "{args:?}: {stderr}");
        let status = status_json().to_string();
        assert!(
            !status.contains(cgroup.path.file_name().unwrap().to_str().unwrap()),
            "{args:?} left {status}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
