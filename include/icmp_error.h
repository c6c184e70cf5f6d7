/* ICMP and ICMPv6 errors about translated flows: parsing the packet an error quotes, and
 * rewriting the error (outer and quoted addresses and ports) with every checksum fixed
 * incrementally. On direct packet pointers, so XDP (xdp_lb.c) and tc (proxy.c) share it.
 *
 * Like the kernel's conntrack (nf_nat_icmp_reply_translation) and Katran's handle_icmp.h, the
 * flow is found by the quoted header, which is a packet the flow sent: its source is the side
 * the error goes back to. The quoted L4 checksum is fixed when it lies inside the error (a UDP
 * checksum always does; a TCP one when more than the 8 bytes RFC 792 asks for were quoted, as
 * Linux does), as conntrack does; the ICMP checksum then covers the rewritten quote, and the
 * ICMPv6 one the new outer addresses too. frag-needed's and packet-too-big's MTU stay: it is
 * about the path the quoted packet took, and a one-arm full NAT adds no encapsulation. */
#pragma once

#include "parse.h"

#define ICMP_DEST_UNREACH 3   /* every code; frag-needed (4) carries the next-hop MTU */
#define ICMP_TIME_EXCEEDED 11
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3

/* Bounds of the offsets below; an error whose headers lie further in is left alone. They let
 * the verifier see every access as a bounded offset from the packet start. */
#define ICMP_ERR_L3_MAX 0x3f
#define ICMP_ERR_ICMP_MAX 0xff
#define ICMP_ERR_INNER_L4_MAX 0x1ff

/* An ICMP error whose quoted packet is TCP or UDP with its ports: what a rewrite touches. */
struct icmp_error {
	__u32 outer_src[4];
	__u32 outer_dst[4];
	/* the quoted packet, as the flow sent it */
	__u32 inner_src[4];
	__u32 inner_dst[4];
	__be16 inner_sport;
	__be16 inner_dport;
	__u8 family;
	__u8 inner_proto;
	bool inner_csum; /* the quoted L4 checksum lies inside the error */
	__u8 pad;
	__u32 l3_off;
	__u32 icmp_off;
	__u32 inner_l3_off;
	__u32 inner_l4_off;
};

/* What the error must say instead: new outer and quoted endpoints. */
struct icmp_error_rewrite {
	__u32 outer_src[4];
	__u32 outer_dst[4];
	__u32 inner_src[4];
	__u32 inner_dst[4];
	__be16 inner_sport;
	__be16 inner_dport;
};

static __always_inline bool icmp_error_inner_ports(struct cursor *c, void *data, __u32 quote_end,
						   struct icmp_error *err)
{
	__be16 *ports = c->pos;
	__u32 csum_off = l4_csum_offset(err->inner_proto);

	if (err->inner_proto != IPPROTO_TCP && err->inner_proto != IPPROTO_UDP)
		return false;
	if ((void *)(ports + 2) > c->end)
		return false;
	err->inner_sport = ports[0];
	err->inner_dport = ports[1];
	err->inner_l4_off = c->pos - data;
	if (err->inner_l4_off > ICMP_ERR_INNER_L4_MAX - 20)
		return false;
	/* quoted bytes end at the outer IP length (Ethernet padding is not quoted) */
	err->inner_csum = c->pos + csum_off + sizeof(__sum16) <= c->end &&
			  err->inner_l4_off + csum_off + sizeof(__sum16) <= quote_end;
	return true;
}

/* Parses an ICMP (type 3, 11) or ICMPv6 (type 1, 2, 3) error quoting a TCP or UDP packet
 * whose ports are in the error. False for anything else, which callers pass untouched. */
static __always_inline bool parse_icmp_error(void *data, void *data_end, struct icmp_error *err)
{
	struct ethhdr *eth;
	struct cursor c;
	__be16 proto;
	__u32 quote_end; /* offset of the end of the outer IP packet */

	__builtin_memset(err, 0, sizeof(*err));
	cursor_init(&c, data, data_end);
	if (!parse_eth(&c, &eth, &proto))
		return false;
	err->l3_off = c.pos - data;
	if (err->l3_off > ICMP_ERR_L3_MAX)
		return false;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip, *inner;
		struct icmphdr *icmp;

		/* an error is never fragmented by its sender; a fragment is not ours to read */
		if (!parse_ipv4(&c, &ip) || (ip->frag_off & bpf_htons(0x3FFF)) || ip->protocol != IPPROTO_ICMP)
			return false;
		quote_end = err->l3_off + bpf_ntohs(ip->tot_len);
		icmp = c.pos;
		if ((void *)(icmp + 1) > c.end)
			return false;
		if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
			return false;
		err->icmp_off = c.pos - data;
		if (err->icmp_off > ICMP_ERR_ICMP_MAX - sizeof(*icmp))
			return false;
		c.pos = icmp + 1;
		if (!parse_ipv4(&c, &inner) || (inner->frag_off & bpf_htons(0x1FFF)))
			return false;
		err->family = AF_INET;
		err->outer_src[0] = ip->saddr;
		err->outer_dst[0] = ip->daddr;
		err->inner_src[0] = inner->saddr;
		err->inner_dst[0] = inner->daddr;
		err->inner_proto = inner->protocol;
		err->inner_l3_off = (void *)inner - data;
		return icmp_error_inner_ports(&c, data, quote_end, err);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6, *inner;
		struct icmp6hdr *icmp6;
		struct ipv6_l4 l4;

		if (!parse_ipv6(&c, &ip6))
			return false;
		quote_end = err->l3_off + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		if (!parse_ipv6_ext(&c, ip6->nexthdr, &l4) || l4.fragment || l4.proto != NEXTHDR_ICMP)
			return false;
		icmp6 = c.pos;
		if ((void *)(icmp6 + 1) > c.end)
			return false;
		if (icmp6->icmp6_type != ICMPV6_DEST_UNREACH && icmp6->icmp6_type != ICMPV6_PKT_TOOBIG &&
		    icmp6->icmp6_type != ICMPV6_TIME_EXCEED)
			return false;
		err->icmp_off = c.pos - data;
		if (err->icmp_off > ICMP_ERR_ICMP_MAX - sizeof(*icmp6))
			return false;
		__builtin_memcpy(err->outer_src, &ip6->saddr, 16);
		__builtin_memcpy(err->outer_dst, &ip6->daddr, 16);
		c.pos = icmp6 + 1;
		if (!parse_ipv6(&c, &inner))
			return false;
		__builtin_memcpy(err->inner_src, &inner->saddr, 16);
		__builtin_memcpy(err->inner_dst, &inner->daddr, 16);
		err->inner_l3_off = (void *)inner - data;
		/* a first fragment still quotes the ports */
		if (!parse_ipv6_ext(&c, inner->nexthdr, &l4) || l4.later_fragment)
			return false;
		err->family = AF_INET6;
		err->inner_proto = l4.proto;
		return icmp_error_inner_ports(&c, data, quote_end, err);
	}
	return false;
}

/* RFC 1624: a checksum changes by ~m + m' for every word m that became m'. Deltas are summed
 * in 64 bits and folded once, when applied. */
static __always_inline __u64 csum_delta_words(__u64 sum, const __u32 *from, const __u32 *to, int words)
{
	for (int i = 0; i < words; i++)
		sum += (__u64)(__u32)~from[i] + to[i];
	return sum;
}

static __always_inline __u64 csum_delta_half(__u64 sum, __u16 from, __u16 to)
{
	return sum + (__u16)~from + to;
}

/* HC' = ~(~HC + delta), folded to 16 bits. */
static __always_inline __sum16 csum_apply_delta(__sum16 check, __u64 delta)
{
	__u64 sum = (__u16)~check + delta;

	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

/*
 * Rewrites a parsed error in place: outer addresses, the quoted addresses and ports, the
 * quoted IPv4 header checksum, the quoted L4 checksum when present (a zero UDP checksum stays
 * zero), the ICMP checksum, the outer IPv4 header checksum. Every change is offset by a
 * checksum inside the packet, so the packet's one's-complement sum stays the same and a
 * CHECKSUM_COMPLETE skb's csum stays right without a helper.
 */
static __always_inline bool rewrite_icmp_error(void *data, void *data_end, const struct icmp_error *err,
					       const struct icmp_error_rewrite *to)
{
	__u32 l3_off = err->l3_off, icmp_off = err->icmp_off;
	__u32 inner_l3_off = err->inner_l3_off, inner_l4_off = err->inner_l4_off;
	__u32 old_ports, new_ports;
	__u64 inner_delta, icmp_delta;
	__sum16 *icmp_check, *l4_check = NULL;
	__be16 *ports;
	int words = err->family == AF_INET ? 1 : 4;

	/* the masks bound the offsets for the verifier; hide from the compiler that the
	 * parser's checks make them redundant, or it drops them */
	asm volatile("" : "+r"(l3_off), "+r"(icmp_off), "+r"(inner_l3_off), "+r"(inner_l4_off));
	l3_off &= ICMP_ERR_L3_MAX;
	icmp_off &= ICMP_ERR_ICMP_MAX;
	inner_l3_off &= ICMP_ERR_INNER_L4_MAX;
	inner_l4_off &= ICMP_ERR_INNER_L4_MAX;

	ports = data + inner_l4_off;
	if ((void *)(ports + 2) > data_end)
		return false;
	icmp_check = data + icmp_off + 2;
	if ((void *)(icmp_check + 1) > data_end)
		return false;
	if (err->inner_csum) {
		l4_check = data + inner_l4_off + (err->inner_proto == IPPROTO_TCP ? 16 : 6);
		if ((void *)(l4_check + 1) > data_end)
			return false;
	}

	/* what the quoted L4 checksum's pseudo-header and port words see change */
	old_ports = *(__u32 *)ports;
	__builtin_memcpy(&new_ports, &to->inner_sport, 2);
	__builtin_memcpy((__u8 *)&new_ports + 2, &to->inner_dport, 2);
	inner_delta = csum_delta_words(0, err->inner_src, to->inner_src, words);
	inner_delta = csum_delta_words(inner_delta, err->inner_dst, to->inner_dst, words);
	icmp_delta = csum_delta_words(inner_delta, &old_ports, &new_ports, 1);
	if (l4_check) {
		__sum16 old = *l4_check, new = old;

		if (err->inner_proto == IPPROTO_TCP || old) {
			new = csum_apply_delta(old, icmp_delta);
			if (err->inner_proto == IPPROTO_UDP && !new)
				new = 0xffff;
		}
		icmp_delta = csum_delta_half(icmp_delta, old, new);
		*l4_check = new;
	}
	*(__u32 *)ports = new_ports;

	if (err->family == AF_INET) {
		struct iphdr *ip = data + l3_off, *inner = data + inner_l3_off;
		__sum16 old_check;

		if ((void *)(ip + 1) > data_end || (void *)(inner + 1) > data_end)
			return false;
		old_check = inner->check;
		inner->check = csum_apply_delta(old_check, inner_delta);
		icmp_delta = csum_delta_half(icmp_delta, old_check, inner->check);
		inner->saddr = to->inner_src[0];
		inner->daddr = to->inner_dst[0];
		ip->check = csum_apply_delta(ip->check,
					     csum_delta_words(csum_delta_words(0, err->outer_src, to->outer_src, 1),
							      err->outer_dst, to->outer_dst, 1));
		ip->saddr = to->outer_src[0];
		ip->daddr = to->outer_dst[0];
	} else {
		struct ipv6hdr *ip6 = data + l3_off, *inner = data + inner_l3_off;

		if ((void *)(ip6 + 1) > data_end || (void *)(inner + 1) > data_end)
			return false;
		/* ICMPv6's checksum covers a pseudo-header with the outer addresses */
		icmp_delta = csum_delta_words(icmp_delta, err->outer_src, to->outer_src, 4);
		icmp_delta = csum_delta_words(icmp_delta, err->outer_dst, to->outer_dst, 4);
		__builtin_memcpy(&inner->saddr, to->inner_src, 16);
		__builtin_memcpy(&inner->daddr, to->inner_dst, 16);
		__builtin_memcpy(&ip6->saddr, to->outer_src, 16);
		__builtin_memcpy(&ip6->daddr, to->outer_dst, 16);
	}
	*icmp_check = csum_apply_delta(*icmp_check, icmp_delta);
	return true;
}
