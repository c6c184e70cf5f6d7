/* Shared between the ipv6-hp programs (bpf/ingress.c, bpf/egress.c) and src/ipv6_hp.rs. */
#pragma once

#include "csum.h"

/* Neighbour discovery: router solicitation .. redirect (RFC 4861) */
#define ICMPV6_ND_FIRST 133
#define ICMPV6_ND_LAST 137

/* Per-CPU counters of one direction; user space sums them over CPUs. */
struct ipv6_hp_stats {
	/* packets whose address was rewritten, and their bytes */
	__u64 rewritten_packets;
	__u64 rewritten_bytes;
	/* rewrites that included an L4 checksum fix (TCP, UDP, ICMPv6) */
	__u64 l4_fixed;
	/* packets with the address we look for that we left alone: unparsable headers or a helper error */
	__u64 skipped;
	/* neighbour discovery (ICMPv6 133-137) from or to the probe address, left alone */
	__u64 nd_passed;
};

/* The two addresses, set from --link-local/--global before load (defaults: Azure SLB). */
const volatile struct in6_addr link_local_addr = {
	.in6_u.u6_addr8 = { 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc },
};
const volatile struct in6_addr global_addr = {
	.in6_u.u6_addr8 = { 0x26, 0x03, 0x10, 0x62, 0, 0, 0, 1, 0xfe, 0x80, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc },
};

/* One slot of per-CPU counters for this program; read by `status` and on exit. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ipv6_hp_stats);
} ipv6_hp_stats SEC(".maps");

enum hp_field { HP_SRC, HP_DST };

/*
 * Rewrites one address of an IPv6 packet (source on ingress, destination on egress) from
 * `from` to `to`, fixing the L4 checksum when there is one in this packet.
 */
static __always_inline int ipv6_hp_rewrite(struct __sk_buff *skb, enum hp_field field,
					   const struct in6_addr *from, const struct in6_addr *to)
{
	struct ipv6_hp_stats *stats;
	struct ipv6_l4 l4 = {};
	struct ipv6hdr *ip6;
	struct ethhdr *eth;
	struct cursor c;
	__u32 addr_off, l4_csum_off = 0;
	__be16 proto;
	void *data;
	int err;

	linearize_headers(skb);
	data = (void *)(long)skb->data;
	cursor_init(&c, data, (void *)(long)skb->data_end);
	if (!parse_eth(&c, &eth, &proto) || proto != bpf_htons(ETH_P_IPV6))
		return TC_PASS_ON;
	if (!parse_ipv6(&c, &ip6))
		return TC_PASS_ON;
	if (!ipv6_addr_equal(field == HP_SRC ? &ip6->saddr : &ip6->daddr, from))
		return TC_PASS_ON;

	stats = bpf_map_lookup_elem(&ipv6_hp_stats, &(__u32){ 0 });
	if (!stats)
		return TC_PASS_ON;
	if (!parse_ipv6_ext(&c, ip6->nexthdr, &l4))
		goto skip;

	/*
	 * Neighbour discovery stays link-local, as Azure's own rules accept it before they
	 * rewrite: the kernel drops a router advertisement from a global source (the default
	 * route would time out), and NS/NA/redirects are about the link's addresses.
	 */
	if (!l4.later_fragment && l4.proto == NEXTHDR_ICMP) {
		__u8 *type = c.pos;

		if ((void *)(type + 1) > c.end)
			goto skip;
		if (*type >= ICMPV6_ND_FIRST && *type <= ICMPV6_ND_LAST) {
			stats->nd_passed++;
			return TC_PASS_ON;
		}
	}

	addr_off = (void *)ip6 - data +
		   (field == HP_SRC ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));

	if (!l4.later_fragment && l4_csum_offset(l4.proto)) {
		/* the checksum field must be in this packet, or the rewrite would break it */
		if (c.pos + l4_csum_offset(l4.proto) + sizeof(__sum16) > c.end)
			goto skip;
		l4_csum_off = c.pos - data + l4_csum_offset(l4.proto);
	}

	err = rewrite_ipv6_addr(skb, addr_off, from, to, l4_csum_off, l4.proto == IPPROTO_UDP);
	if (err)
		goto skip;

	stats->rewritten_packets++;
	stats->rewritten_bytes += skb->len;
	if (l4_csum_off)
		stats->l4_fixed++;
	return TC_PASS_ON;
skip:
	stats->skipped++;
	return TC_PASS_ON;
}
