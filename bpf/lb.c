// SPDX-License-Identifier: GPL-2.0
/* lb: an L4 load balancer on the kernel's conntrack. The first packet of a flow to a service
 * VIP:PORT gets a conntrack entry made here, with destination NAT to a backend chosen by a
 * hash of the flow and, by default, source NAT to this node's address towards that backend;
 * from then on conntrack and NAT translate every packet of the flow, both ways. */
#include "common.h"
#include "parse.h"
#include "hash.h"
#include "flood.h"
#include "lb.h"
#include "reject.h"

#define BPF_F_CURRENT_NETNS (-1)
/* opts__sz the conntrack kfuncs accept on every kernel that has them (6.1+) */
#define CT_OPTS_SZ 12
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

struct nf_conn___init *bpf_skb_ct_alloc(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
					struct bpf_ct_opts *opts, __u32 opts__sz) __ksym;
struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
				  struct bpf_ct_opts *opts, __u32 opts__sz) __ksym;
struct nf_conn *bpf_ct_insert_entry(struct nf_conn___init *nfct) __ksym;
void bpf_ct_release(struct nf_conn *nfct) __ksym;
void bpf_ct_set_timeout(struct nf_conn___init *nfct, __u32 timeout) __ksym;
int bpf_ct_change_timeout(struct nf_conn *nfct, __u32 timeout) __ksym;
int bpf_ct_set_nat_info(struct nf_conn___init *nfct, union nf_inet_addr *addr, int port,
			enum nf_nat_manip_type manip) __ksym;

/* Set by user space before load: seeds the flow hash. */
volatile const __u32 hash_seed = 0;
/* new flows per second per CPU that mean a flood (include/flood.h); 0: never */
volatile const __u32 flood_rate = LB_DEFAULT_FLOOD_RATE;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct service_endpoint);
	__type(value, struct service_range);
} lb_services SEC(".maps");

/* slot -> backend. The slot arrays are mmapable: user space reads and writes 100,000 slots
 * as memory rather than by system calls. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

/* slot -> cumulative weight of the service's usable backends (include/service.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} lb_weights SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_stats);
} lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_counters);
} lb_counters SEC(".maps");

/* the flood detector's one-second window, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flood_window);
} lb_flood SEC(".maps");

/* under flood: first packets dropped, by flow hash (include/flood.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOOD_SEEN_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} lb_flood_seen SEC(".maps");

/* session affinity: (service, client address) -> the backend it got (include/service.h) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_MAX_ENTRIES);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
} lb_affinity SEC(".maps");

/* entries made per backend slot lately: source-NAT port pressure (include/lb.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct lb_port_use);
} lb_port_use SEC(".maps");

/* The flow's client side decides its backend. */
static __always_inline __u32 flow_hash(const struct l4_packet *pkt)
{
	return client_hash(hash_seed, pkt->saddr, pkt->sport, pkt->proto);
}

/* Options for a conntrack lookup or allocation in this namespace; the kfuncs write `error`,
 * so every call gets them afresh. */
static __always_inline void ct_opts(struct bpf_ct_opts *opts, __u8 l4proto)
{
	__builtin_memset(opts, 0, sizeof(*opts));
	opts->netns_id = BPF_F_CURRENT_NETNS;
	opts->l4proto = l4proto;
}

static __always_inline struct lb_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb_counters, &zero);
}

/* The conntrack tuple of the packet as it arrived (client -> VIP) and its size. */
static __always_inline __u32 fill_tuple(const struct l4_packet *pkt, struct bpf_sock_tuple *tuple)
{
	__builtin_memset(tuple, 0, sizeof(*tuple));
	if (pkt->family == AF_INET) {
		tuple->ipv4.saddr = pkt->saddr[0];
		tuple->ipv4.daddr = pkt->daddr[0];
		tuple->ipv4.sport = pkt->sport;
		tuple->ipv4.dport = pkt->dport;
		return sizeof(tuple->ipv4);
	}
	__builtin_memcpy(tuple->ipv6.saddr, pkt->saddr, sizeof(tuple->ipv6.saddr));
	__builtin_memcpy(tuple->ipv6.daddr, pkt->daddr, sizeof(tuple->ipv6.daddr));
	tuple->ipv6.sport = pkt->sport;
	tuple->ipv6.dport = pkt->dport;
	return sizeof(tuple->ipv6);
}

static __always_inline void to_inet_addr(const __u32 *addr, __u8 family, union nf_inet_addr *out)
{
	__builtin_memset(out, 0, sizeof(*out));
	if (family == AF_INET)
		out->ip = addr[0];
	else
		__builtin_memcpy(out->ip6, addr, sizeof(out->ip6));
}

static __always_inline bool has_snat(const struct lb_backend *backend)
{
	return backend->snat_addr[0] | backend->snat_addr[1] | backend->snat_addr[2] | backend->snat_addr[3];
}

/* Brings a slot's port use to the window of `now`. */
static __always_inline void roll_port_use(struct lb_port_use *use, __u64 now)
{
	__u64 window = now / LB_PORT_WINDOW_NS;

	if (use->window == window)
		return;
	use->previous = use->window + 1 == window ? use->current : 0;
	use->current = 0;
	use->window = window;
}

/* Whether the entries made towards a backend lately may hold half its source-NAT ports: the
 * current window's, and the part of the previous window's not yet past the half-open life. */
static __always_inline bool ports_low(struct lb_port_use *use, __u64 now)
{
	__u64 left = LB_PORT_WINDOW_NS - now % LB_PORT_WINDOW_NS;
	__u64 held;

	roll_port_use(use, now);
	held = use->current + (__u64)use->previous * (left >> 20) / (LB_PORT_WINDOW_NS >> 20);
	return held >= LB_PORT_BUDGET;
}

/* A new flow to a service without a usable backend: answered as a host without a listener
 * would (include/reject.h), out the interface it came in; dropped when not answerable. */
static __always_inline int refuse(struct __sk_buff *skb, const struct l4_packet *pkt, struct lb_counters *count)
{
	struct reject_info info;
	__u32 pull;

	count->refused++;
	if (!reject_read((void *)(long)skb->data, (void *)(long)skb->data_end, pkt, &info))
		return TC_ACT_SHOT;
	if (info.grow && bpf_skb_adjust_room(skb, info.grow, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	if (skb->len != info.len && bpf_skb_change_tail(skb, info.len, 0))
		return TC_ACT_SHOT;
	/* the headers written: linear and writable */
	pull = info.len < MAX_HDR_PULL ? info.len : MAX_HDR_PULL;
	if (bpf_skb_pull_data(skb, pull))
		return TC_ACT_SHOT;
	if (!reject_write((void *)(long)skb->data, (void *)(long)skb->data_end, &info))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc/ingress")
int lb_ingress(struct __sk_buff *skb)
{
	struct bpf_ct_opts opts;
	struct service_endpoint vip = {};
	struct service_range *service, range;
	struct lb_counters *count;
	struct lb_backend *backend;
	struct bpf_sock_tuple tuple;
	struct nf_conn___init *fresh;
	union nf_inet_addr addr;
	struct l4_packet pkt;
	struct nf_conn *ct;
	struct lb_stats *stats;
	struct lb_port_use *use = NULL;
	struct affinity_key client;
	__u32 tuple_sz, slot, hash;
	bool nat_ok = true, remembered = false;
	int kept;
	__u64 now;

	linearize_headers(skb);
	if (!parse_l4_packet((void *)(long)skb->data, (void *)(long)skb->data_end, &pkt))
		return TC_PASS_ON;
	/* only a packet that can open a flow: a TCP SYN, any UDP datagram; conntrack knows
	 * every later TCP packet by itself */
	if (pkt.proto == IPPROTO_TCP && (pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return TC_PASS_ON;
	__builtin_memcpy(vip.addr, pkt.daddr, sizeof(vip.addr));
	vip.port = pkt.dport;
	vip.family = pkt.family;
	vip.proto = pkt.proto;
	service = bpf_map_lookup_elem(&lb_services, &vip);
	if (!service)
		return TC_PASS_ON;
	range = *service;
	if (range.count > LB_MAX_BACKENDS_PER_SERVICE)
		return TC_PASS_ON;
	count = counters();
	if (!count)
		return TC_PASS_ON;

	tuple_sz = fill_tuple(&pkt, &tuple);
	ct_opts(&opts, pkt.proto);
	ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
	if (ct) {
		/*
		 * A SYN on an entry of a closed connection (a client reusing its port soon after
		 * an RST or FIN) makes conntrack drop that entry and start a new one of its own,
		 * without our NAT. Expire it here instead; the second lookup removes it.
		 */
		bool reopened = pkt.proto == IPPROTO_TCP && ct->proto.tcp.state >= TCP_CONNTRACK_TIME_WAIT &&
				ct->proto.tcp.state <= TCP_CONNTRACK_CLOSE;

		if (reopened)
			bpf_ct_change_timeout(ct, 0);
		bpf_ct_release(ct);
		if (!reopened) {
			count->known_flows++;
			return TC_PASS_ON;
		}
		count->reopened++;
		ct_opts(&opts, pkt.proto);
		ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
		if (ct) {
			bpf_ct_release(ct);
			count->insert_failed++;
			return TC_PASS_ON;
		}
	}

	if (!range.weight)
		return refuse(skb, &pkt, count);
	hash = flow_hash(&pkt);
	now = bpf_ktime_get_ns();
	if (range.flags & SERVICE_AFFINITY) {
		__builtin_memset(&client, 0, sizeof(client));
		client.service = vip;
		__builtin_memcpy(client.client, pkt.saddr, sizeof(client.client));
		kept = affinity_slot(&lb_affinity, &lb_backends, &lb_weights, &range, &client, now);
		if (kept >= 0) {
			slot = kept;
			remembered = true;
		} else if (pick_weighted_slot(&lb_weights, &range, hash, &slot)) {
			return TC_PASS_ON;
		}
	} else if (pick_weighted_slot(&lb_weights, &range, hash, &slot)) {
		return TC_PASS_ON;
	}
	backend = bpf_map_lookup_elem(&lb_backends, &slot);
	if (!backend || backend->endpoint.family != pkt.family)
		return TC_PASS_ON;
	if (flood_over_rate(&lb_flood, flood_rate, now)) {
		if (!flood_asked_again(&lb_flood_seen, hash, now)) {
			count->flood_dropped++;
			return TC_ACT_SHOT;
		}
		count->flood_admitted++;
	} else if (has_snat(backend)) {
		/* below the rate a slower flood can still take every port towards the backend */
		use = bpf_map_lookup_elem(&lb_port_use, &slot);
		if (use && ports_low(use, now)) {
			if (!flood_asked_again(&lb_flood_seen, hash, now)) {
				count->ports_low_dropped++;
				return TC_ACT_SHOT;
			}
			count->ports_low_admitted++;
		}
	}
	if (!use && has_snat(backend))
		use = bpf_map_lookup_elem(&lb_port_use, &slot);

	ct_opts(&opts, pkt.proto);
	/* From here a packet without its entry is dropped, not passed on: the node's own stack
	 * would answer a SYN to the VIP with an RST (the client gives up at once) where a drop
	 * makes it retry. */
	fresh = bpf_skb_ct_alloc(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
	if (!fresh) {
		count->alloc_failed++;
		return TC_ACT_SHOT;
	}
	bpf_ct_set_timeout(fresh, pkt.proto == IPPROTO_TCP ? LB_TCP_NEW_TIMEOUT_MS : LB_UDP_NEW_TIMEOUT_MS);
	/* destination first: the source NAT then picks a port unique towards the backend */
	to_inet_addr(backend->endpoint.addr, pkt.family, &addr);
	if (bpf_ct_set_nat_info(fresh, &addr, bpf_ntohs(backend->endpoint.port), NF_NAT_MANIP_DST)) {
		count->nat_failed++;
		/* an entry can only leave through insertion: make it die at once */
		bpf_ct_set_timeout(fresh, 1);
		nat_ok = false;
	} else if (has_snat(backend)) {
		to_inet_addr(backend->snat_addr, pkt.family, &addr);
		/* port 0: keep the client's port unless that tuple is taken */
		if (bpf_ct_set_nat_info(fresh, &addr, 0, NF_NAT_MANIP_SRC)) {
			count->nat_failed++;
			bpf_ct_set_timeout(fresh, 1);
			nat_ok = false;
		}
	}
	ct = bpf_ct_insert_entry(fresh);
	if (!ct) {
		/* the same flow inserted by another CPU meanwhile, or (a flood) no source port
		 * left towards the backend: the tuple clashes */
		ct_opts(&opts, pkt.proto);
		ct = bpf_skb_ct_lookup(skb, &tuple, tuple_sz, &opts, CT_OPTS_SZ);
		if (ct) {
			bpf_ct_release(ct);
			count->insert_raced++;
			return TC_PASS_ON;
		}
		count->insert_failed++;
		/* no port left, whatever the estimate said (another service's flows to the same
		 * backend, established ones): ports are low until the window after next */
		if (use) {
			roll_port_use(use, now);
			if (use->current < LB_PORT_BUDGET)
				use->current = LB_PORT_BUDGET;
		}
		return TC_ACT_SHOT;
	}
	bpf_ct_release(ct);
	if (!nat_ok)
		return TC_ACT_SHOT;
	if (use) {
		roll_port_use(use, now);
		__sync_fetch_and_add(&use->current, 1);
	}
	count->new_flows++;
	if ((range.flags & SERVICE_AFFINITY) && !remembered)
		affinity_remember(&lb_affinity, &range, &client, &backend->endpoint, slot, now);
	stats = bpf_map_lookup_elem(&lb_stats, &slot);
	if (stats)
		__sync_fetch_and_add(&stats->new_flows, 1);
	return TC_PASS_ON;
}

char LICENSE[] SEC("license") = "GPL";
