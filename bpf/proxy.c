// SPDX-License-Identifier: GPL-2.0
/* proxy: egress rewrites FROM ip:port to TO ip:port and re-routes; ingress makes replies come from FROM. */
#include "proxy.h"

/* FROM endpoint -> TO endpoint and rule id; written by user space, read on egress. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PROXY_MAX_RULES);
	__type(key, struct proxy_endpoint);
	__type(value, struct proxy_target);
} proxy_rules SEC(".maps");

/* Reply tuple -> FROM, one entry per translated flow; written on egress, read on ingress.
 * LRU: entries of finished flows age out instead of filling the table for good. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, PROXY_MAX_FLOWS);
	__type(key, struct proxy_flow_key);
	__type(value, struct proxy_flow);
} proxy_flows SEC(".maps");

/* Per-rule counters, per CPU; read by `status`. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PROXY_MAX_RULES);
	__type(key, __u32);
	__type(value, struct proxy_stats);
} proxy_stats SEC(".maps");

/* Per-CPU room for the ICMP error paths' structs, which do not fit the stack beside the
 * program's own (512 bytes for the whole call chain). */
struct icmp_scratch {
	struct icmp_error err;
	struct icmp_error_rewrite to;
	struct l4_packet outer;
	struct proxy_flow_key reply;
	struct proxy_endpoint from;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct icmp_scratch);
} proxy_icmp_scratch SEC(".maps");

static __always_inline bool endpoint_equal(const struct proxy_endpoint *a, const struct proxy_endpoint *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
	       a->addr[3] == b->addr[3] && a->port == b->port && a->family == b->family;
}

static __always_inline bool mac_equal(const __u8 *a, const __u8 *b)
{
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/* Rewrites the source (is_src) or destination address and port of a parsed packet. */
static __always_inline int rewrite_endpoint(struct __sk_buff *skb, struct l4_packet *pkt, bool is_src,
					    const struct proxy_endpoint *to)
{
	bool is_udp = pkt->proto == IPPROTO_UDP;
	__u32 *old_addr = is_src ? pkt->saddr : pkt->daddr;
	__be16 old_port = is_src ? pkt->sport : pkt->dport;
	__u32 port_off = pkt->l4_off + (is_src ? 0 : sizeof(__be16));
	int err;

	if (pkt->family == AF_INET) {
		__u32 addr_off = pkt->l3_off + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));

		err = rewrite_ipv4_addr(skb, addr_off, pkt->l3_off + offsetof(struct iphdr, check),
					pkt->l4_csum_off, old_addr[0], to->addr[0], is_udp);
	} else {
		__u32 addr_off = pkt->l3_off + (is_src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));

		err = rewrite_ipv6_addr(skb, addr_off, (const struct in6_addr *)old_addr,
					(const struct in6_addr *)to->addr, pkt->l4_csum_off, is_udp);
	}
	if (err)
		return err;
	if (old_port == to->port)
		return 0;
	return rewrite_l4_port(skb, port_off, pkt->l4_csum_off, old_port, to->port, is_udp);
}

/*
 * The destination changed, so may the next hop: look the route up again and rewrite the
 * MACs, or let the kernel resolve the neighbour. Returns the verdict.
 */
static __always_inline int reroute(struct __sk_buff *skb, struct l4_packet *pkt, const struct proxy_endpoint *to,
				   struct proxy_stats *stats)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth;
	void *data, *data_end;
	int rc;

	fib.family = pkt->family;
	fib.l4_protocol = pkt->proto;
	fib.sport = pkt->sport;
	fib.dport = to->port;
	fib.ifindex = skb->ifindex;
	if (pkt->family == AF_INET) {
		fib.ipv4_src = pkt->saddr[0];
		fib.ipv4_dst = to->addr[0];
	} else {
		__builtin_memcpy(fib.ipv6_src, pkt->saddr, sizeof(fib.ipv6_src));
		__builtin_memcpy(fib.ipv6_dst, to->addr, sizeof(fib.ipv6_dst));
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		stats->rerouted++;
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		/* bpf_fib_lookup wants forwarding on even for output lookups (a client host
		 * has it off); the kernel's own route and neighbour lookup does not */
		stats->rerouted++;
		return bpf_redirect_neigh(skb->ifindex, NULL, 0, 0);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_PASS_ON; /* no route from here: leave it to the stack */

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_PASS_ON;
	if (!mac_equal(eth->h_dest, fib.dmac) || fib.ifindex != skb->ifindex)
		stats->rerouted++;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex != skb->ifindex)
		return bpf_redirect(fib.ifindex, 0);
	return TC_PASS_ON;
}

/*
 * ICMP errors of translated flows, both ways, as conntrack's DNAT translates them. Ingress:
 * an error about a request (from TO or a router on the way, quoting client -> TO) is made to
 * quote client -> FROM and to come from FROM, so the client's socket finds it and a
 * frag-needed / packet-too-big lowers the path MTU of its route to FROM. Egress: an error
 * this node sends about a reply (quoting FROM -> client, to FROM) is made to quote
 * TO -> client and goes to TO. Errors about other flows pass untouched.
 */
static __noinline int icmp_error_ingress(struct __sk_buff *skb)
{
	struct icmp_error_rewrite *to;
	struct icmp_scratch *scratch;
	struct proxy_flow_key *reply;
	struct proxy_stats *stats;
	struct proxy_flow *flow;
	struct icmp_error *err;

	scratch = bpf_map_lookup_elem(&proxy_icmp_scratch, &(__u32){ 0 });
	if (!scratch)
		return TC_PASS_ON;
	err = &scratch->err;
	to = &scratch->to;
	reply = &scratch->reply;
	__builtin_memset(reply, 0, sizeof(*reply));
	if (!parse_icmp_error((void *)(long)skb->data, (void *)(long)skb->data_end, err))
		return TC_PASS_ON;
	__builtin_memcpy(reply->saddr, err->inner_dst, sizeof(reply->saddr));
	__builtin_memcpy(reply->daddr, err->inner_src, sizeof(reply->daddr));
	reply->sport = err->inner_dport;
	reply->dport = err->inner_sport;
	reply->family = err->family;
	reply->proto = err->inner_proto;
	flow = bpf_map_lookup_elem(&proxy_flows, reply);
	if (!flow)
		return TC_PASS_ON;
	stats = bpf_map_lookup_elem(&proxy_stats, &flow->rule_id);
	if (!stats)
		return TC_PASS_ON;
	__builtin_memcpy(to->outer_src, flow->from.addr, sizeof(to->outer_src));
	__builtin_memcpy(to->outer_dst, err->outer_dst, sizeof(to->outer_dst));
	__builtin_memcpy(to->inner_src, err->inner_src, sizeof(to->inner_src));
	__builtin_memcpy(to->inner_dst, flow->from.addr, sizeof(to->inner_dst));
	to->inner_sport = err->inner_sport;
	to->inner_dport = flow->from.port;
	if (!rewrite_icmp_error((void *)(long)skb->data, (void *)(long)skb->data_end, err, to))
		return TC_PASS_ON;
	stats->icmp_errors++;
	return TC_PASS_ON;
}

static __noinline int icmp_error_egress(struct __sk_buff *skb)
{
	struct icmp_error_rewrite *to;
	struct icmp_scratch *scratch;
	struct proxy_flow_key *reply;
	struct proxy_endpoint *from;
	struct proxy_target *target;
	struct proxy_stats *stats;
	struct proxy_flow *flow;
	struct icmp_error *err;

	scratch = bpf_map_lookup_elem(&proxy_icmp_scratch, &(__u32){ 0 });
	if (!scratch)
		return TC_PASS_ON;
	err = &scratch->err;
	to = &scratch->to;
	reply = &scratch->reply;
	from = &scratch->from;
	__builtin_memset(reply, 0, sizeof(*reply));
	__builtin_memset(from, 0, sizeof(*from));
	if (!parse_icmp_error((void *)(long)skb->data, (void *)(long)skb->data_end, err))
		return TC_PASS_ON;
	/* the quote is a reply as the client got it: FROM -> client */
	__builtin_memcpy(from->addr, err->inner_src, sizeof(from->addr));
	from->port = err->inner_sport;
	from->family = err->family;
	target = bpf_map_lookup_elem(&proxy_rules, from);
	if (!target)
		return TC_PASS_ON;
	__builtin_memcpy(reply->saddr, target->to.addr, sizeof(reply->saddr));
	__builtin_memcpy(reply->daddr, err->inner_dst, sizeof(reply->daddr));
	reply->sport = target->to.port;
	reply->dport = err->inner_dport;
	reply->family = err->family;
	reply->proto = err->inner_proto;
	flow = bpf_map_lookup_elem(&proxy_flows, reply);
	if (!flow || flow->rule_id != target->rule_id || !endpoint_equal(&flow->from, from))
		return TC_PASS_ON;
	stats = bpf_map_lookup_elem(&proxy_stats, &target->rule_id);
	if (!stats)
		return TC_PASS_ON;
	__builtin_memcpy(to->outer_src, err->outer_src, sizeof(to->outer_src));
	__builtin_memcpy(to->outer_dst, target->to.addr, sizeof(to->outer_dst));
	__builtin_memcpy(to->inner_src, target->to.addr, sizeof(to->inner_src));
	__builtin_memcpy(to->inner_dst, err->inner_dst, sizeof(to->inner_dst));
	to->inner_sport = target->to.port;
	to->inner_dport = err->inner_dport;
	if (!rewrite_icmp_error((void *)(long)skb->data, (void *)(long)skb->data_end, err, to))
		return TC_PASS_ON;
	stats->icmp_errors++;
	/* the new destination may have another next hop, like the requests' */
	__builtin_memset(&scratch->outer, 0, sizeof(scratch->outer));
	scratch->outer.family = err->family;
	scratch->outer.proto = err->family == AF_INET ? IPPROTO_ICMP : NEXTHDR_ICMP;
	__builtin_memcpy(scratch->outer.saddr, err->outer_src, sizeof(scratch->outer.saddr));
	return reroute(skb, &scratch->outer, &target->to, stats);
}

SEC("tc/egress")
int proxy_egress(struct __sk_buff *skb)
{
	struct proxy_endpoint from = {};
	struct proxy_flow_key reply = {};
	struct proxy_flow *known, flow = {};
	struct proxy_target *target;
	struct proxy_stats *stats;
	struct l4_packet pkt = {};

	if (!parse_skb_l4(skb, &pkt))
		return icmp_error_egress(skb);
	__builtin_memcpy(from.addr, pkt.daddr, sizeof(from.addr));
	from.port = pkt.dport;
	from.family = pkt.family;
	target = bpf_map_lookup_elem(&proxy_rules, &from);
	if (!target)
		return TC_PASS_ON;
	stats = bpf_map_lookup_elem(&proxy_stats, &target->rule_id);
	if (!stats)
		return TC_PASS_ON;

	/* remember how to translate the replies of this flow, once per flow */
	__builtin_memcpy(reply.saddr, target->to.addr, sizeof(reply.saddr));
	__builtin_memcpy(reply.daddr, pkt.saddr, sizeof(reply.daddr));
	reply.sport = target->to.port;
	reply.dport = pkt.sport;
	reply.family = pkt.family;
	reply.proto = pkt.proto;
	known = bpf_map_lookup_elem(&proxy_flows, &reply);
	if (!known || known->rule_id != target->rule_id || !endpoint_equal(&known->from, &from)) {
		flow.from = from;
		flow.rule_id = target->rule_id;
		bpf_map_update_elem(&proxy_flows, &reply, &flow, BPF_ANY);
	}

	if (rewrite_endpoint(skb, &pkt, false, &target->to))
		return TC_PASS_ON;
	stats->packets++;
	stats->bytes += skb->len;
	return reroute(skb, &pkt, &target->to, stats);
}

SEC("tc/ingress")
int proxy_ingress(struct __sk_buff *skb)
{
	struct proxy_flow_key reply = {};
	struct proxy_stats *stats;
	struct proxy_flow *flow;
	struct l4_packet pkt = {};

	if (!parse_skb_l4(skb, &pkt))
		return icmp_error_ingress(skb);
	__builtin_memcpy(reply.saddr, pkt.saddr, sizeof(reply.saddr));
	__builtin_memcpy(reply.daddr, pkt.daddr, sizeof(reply.daddr));
	reply.sport = pkt.sport;
	reply.dport = pkt.dport;
	reply.family = pkt.family;
	reply.proto = pkt.proto;
	flow = bpf_map_lookup_elem(&proxy_flows, &reply);
	if (!flow)
		return TC_PASS_ON;
	stats = bpf_map_lookup_elem(&proxy_stats, &flow->rule_id);
	if (!stats)
		return TC_PASS_ON;
	if (rewrite_endpoint(skb, &pkt, true, &flow->from))
		return TC_PASS_ON;
	stats->replies++;
	stats->reply_bytes += skb->len;
	return TC_PASS_ON;
}

char LICENSE[] SEC("license") = "GPL";
