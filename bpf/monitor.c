// SPDX-License-Identifier: GPL-2.0
/* monitor: per-flow packet and byte counters on tc ingress and egress, IPv4 and IPv6. */
#include "monitor.h"

/* Per-flow counters, per CPU so the hot path takes no lock; LRU so a full table evicts the
 * oldest flows instead of ignoring new ones. Written here, read and summed by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, MONITOR_MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct flow_counters);
} monitor_flows SEC(".maps");

/* Fills ports (or ICMP type/code) from the upper-layer header at the cursor, if present. */
static __always_inline void flow_ports(struct cursor *c, struct flow_key *key)
{
	switch (key->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP: {
		__be16 *ports = c->pos;

		if ((void *)(ports + 2) > c->end)
			return;
		key->sport = bpf_ntohs(ports[0]);
		key->dport = bpf_ntohs(ports[1]);
		return;
	}
	case IPPROTO_ICMP:
	case NEXTHDR_ICMP: {
		__u8 *type_code = c->pos;

		if ((void *)(type_code + 2) > c->end)
			return;
		key->sport = type_code[0];
		key->dport = type_code[1];
		return;
	}
	}
}

static __always_inline bool flow_key_of(struct __sk_buff *skb, enum flow_direction direction,
					struct flow_key *key)
{
	struct ethhdr *eth;
	struct cursor c;
	__be16 proto;

	__builtin_memset(key, 0, sizeof(*key));
	key->direction = direction;
	linearize_headers(skb);
	cursor_init(&c, (void *)(long)skb->data, (void *)(long)skb->data_end);
	if (!parse_eth(&c, &eth, &proto))
		return false;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip;

		if (!parse_ipv4(&c, &ip))
			return false;
		key->family = AF_INET;
		key->proto = ip->protocol;
		key->src[0] = ip->saddr;
		key->dst[0] = ip->daddr;
		/* a later fragment carries no ports */
		if (!(ip->frag_off & bpf_htons(0x1FFF)))
			flow_ports(&c, key);
		return true;
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6_l4 l4 = {};
		struct ipv6hdr *ip6;

		if (!parse_ipv6(&c, &ip6))
			return false;
		key->family = AF_INET6;
		__builtin_memcpy(key->src, &ip6->saddr, sizeof(key->src));
		__builtin_memcpy(key->dst, &ip6->daddr, sizeof(key->dst));
		if (!parse_ipv6_ext(&c, ip6->nexthdr, &l4)) {
			/* chain too long or cut short: count it under the first next-header */
			key->proto = ip6->nexthdr;
			return true;
		}
		key->proto = l4.proto;
		if (!l4.later_fragment)
			flow_ports(&c, key);
		return true;
	}
	return false;
}

static __always_inline int count_flow(struct __sk_buff *skb, enum flow_direction direction)
{
	struct flow_counters *counters, fresh = { .packets = 1, .bytes = skb->len };
	struct flow_key key;

	if (!flow_key_of(skb, direction, &key))
		return TC_PASS_ON;
	counters = bpf_map_lookup_elem(&monitor_flows, &key);
	if (!counters) {
		if (bpf_map_update_elem(&monitor_flows, &key, &fresh, BPF_NOEXIST) == 0)
			return TC_PASS_ON;
		/* another CPU created the flow meanwhile; our per-CPU slot of it starts at zero */
		counters = bpf_map_lookup_elem(&monitor_flows, &key);
		if (!counters)
			return TC_PASS_ON;
	}
	counters->packets++;
	counters->bytes += skb->len;
	return TC_PASS_ON;
}

SEC("tc/ingress")
int monitor_ingress(struct __sk_buff *skb)
{
	return count_flow(skb, FLOW_INGRESS);
}

SEC("tc/egress")
int monitor_egress(struct __sk_buff *skb)
{
	return count_flow(skb, FLOW_EGRESS);
}

char LICENSE[] SEC("license") = "GPL";
