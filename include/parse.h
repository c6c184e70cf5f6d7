/* Bounds-checked packet parsing shared by every program: Ethernet (+VLAN), IPv4, IPv6 + extension headers, L4. */
#pragma once

#include "common.h"

/* Highest offset we ever read headers at; pulled into the linear area before parsing. */
#define MAX_HDR_PULL 256

/*
 * As Cilium's revalidate_data_pull: a GRO'd, paged or AF_PACKET-built skb may hold its
 * headers outside the linear area, where direct reads cannot see them. Pulls the first
 * MAX_HDR_PULL bytes (or the whole packet if shorter) when fewer are linear; nothing to do,
 * and no helper call, for the usual linear headers. Packet pointers taken before are stale.
 * tc programs call it before parsing. A function of its own: inlined, the compiler may share
 * the ctx field addresses it reads with the caller's reads after it, which the verifier refuses.
 */
static __noinline __attribute__((unused)) void linearize_headers(struct __sk_buff *skb)
{
	__u32 want = skb->len < MAX_HDR_PULL ? skb->len : MAX_HDR_PULL;

	if ((__u32)(skb->data_end - skb->data) < want)
		bpf_skb_pull_data(skb, want);
}

/* Walks a packet from data to data_end; every step checks bounds before it moves. */
struct cursor {
	void *pos;
	void *end;
};

static __always_inline void cursor_init(struct cursor *c, void *data, void *data_end)
{
	c->pos = data;
	c->end = data_end;
}

/* Ethernet header plus up to two VLAN tags; *proto is the inner EtherType (network order). */
static __always_inline bool parse_eth(struct cursor *c, struct ethhdr **eth, __be16 *proto)
{
	struct ethhdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return false;
	*eth = h;
	*proto = h->h_proto;
	c->pos = h + 1;

#pragma unroll
	for (int i = 0; i < 2; i++) {
		struct vlan_hdr *vlan = c->pos;

		if (*proto != bpf_htons(ETH_P_8021Q) && *proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vlan + 1) > c->end)
			return false;
		*proto = vlan->h_vlan_encapsulated_proto;
		c->pos = vlan + 1;
	}
	return true;
}

/* IPv4 header including options (IHL-aware). */
static __always_inline bool parse_ipv4(struct cursor *c, struct iphdr **ip)
{
	struct iphdr *h = c->pos;
	__u32 hdr_len;

	if ((void *)(h + 1) > c->end)
		return false;
	hdr_len = h->ihl * 4;
	if (h->version != 4 || hdr_len < sizeof(*h))
		return false;
	if (c->pos + hdr_len > c->end)
		return false;
	*ip = h;
	c->pos += hdr_len;
	return true;
}

static __always_inline bool parse_ipv6(struct cursor *c, struct ipv6hdr **ip6)
{
	struct ipv6hdr *h = c->pos;

	if ((void *)(h + 1) > c->end)
		return false;
	if (h->version != 6)
		return false;
	*ip6 = h;
	c->pos = h + 1;
	return true;
}

#define IPV6_MAX_EXT_HDRS 8

/* Where the upper-layer protocol of an IPv6 packet starts. */
struct ipv6_l4 {
	__u8 proto;
	/* a fragment other than the first: no L4 header in this packet */
	bool later_fragment;
	/* any fragment, the first included */
	bool fragment;
};

/*
 * Walks the extension-header chain after the fixed IPv6 header, leaving the cursor at
 * the upper-layer header. False when the chain is longer than we walk or truncated.
 */
static __always_inline bool parse_ipv6_ext(struct cursor *c, __u8 nexthdr, struct ipv6_l4 *l4)
{
	l4->later_fragment = false;
	l4->fragment = false;

#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
		struct ipv6_opt_hdr *opt = c->pos;
		struct frag_hdr *frag = c->pos;

		switch (nexthdr) {
		case NEXTHDR_HOP:
		case NEXTHDR_ROUTING:
		case NEXTHDR_DEST:
			if ((void *)(opt + 1) > c->end)
				return false;
			nexthdr = opt->nexthdr;
			c->pos += (opt->hdrlen + 1) * 8;
			break;
		case NEXTHDR_AUTH:
			if ((void *)(opt + 1) > c->end)
				return false;
			nexthdr = opt->nexthdr;
			c->pos += (opt->hdrlen + 2) * 4;
			break;
		case NEXTHDR_FRAGMENT:
			if ((void *)(frag + 1) > c->end)
				return false;
			nexthdr = frag->nexthdr;
			c->pos = frag + 1;
			l4->fragment = true;
			if (frag->frag_off & bpf_htons(0xFFF8)) {
				l4->proto = nexthdr;
				l4->later_fragment = true;
				return true;
			}
			break;
		default:
			l4->proto = nexthdr;
			return true;
		}
	}
	return false;
}

/* Offset of the L4 checksum field for protocols whose checksum covers a pseudo-header; 0 if none. */
static __always_inline __u32 l4_csum_offset(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return offsetof(struct tcphdr, check);
	case IPPROTO_UDP:
		return offsetof(struct udphdr, check);
	case NEXTHDR_ICMP:
		return offsetof(struct icmp6hdr, icmp6_cksum);
	default:
		return 0;
	}
}

static __always_inline bool ipv6_addr_equal(const struct in6_addr *a, const struct in6_addr *b)
{
	return a->in6_u.u6_addr32[0] == b->in6_u.u6_addr32[0] &&
	       a->in6_u.u6_addr32[1] == b->in6_u.u6_addr32[1] &&
	       a->in6_u.u6_addr32[2] == b->in6_u.u6_addr32[2] &&
	       a->in6_u.u6_addr32[3] == b->in6_u.u6_addr32[3];
}

/* A TCP or UDP packet (not a later fragment), with the offsets a rewrite needs. */
struct l4_packet {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 family;
	__u8 proto;
	__u8 tcp_flags; /* TCP only */
	__u8 fragment;	/* the first fragment of a fragmented datagram (later ones fail to parse) */
	__u32 l3_off;
	__u32 l4_off;
	__u32 l4_csum_off;
};

static __always_inline bool parse_l4_packet(void *data, void *data_end, struct l4_packet *pkt)
{
	struct ethhdr *eth;
	struct cursor c;
	__be16 proto;
	__be16 *ports;

	__builtin_memset(pkt, 0, sizeof(*pkt));
	cursor_init(&c, data, data_end);
	if (!parse_eth(&c, &eth, &proto))
		return false;
	pkt->l3_off = c.pos - data;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip;

		if (!parse_ipv4(&c, &ip) || (ip->frag_off & bpf_htons(0x1FFF)))
			return false;
		pkt->family = AF_INET;
		pkt->fragment = !!(ip->frag_off & bpf_htons(0x2000)); /* more fragments */
		pkt->proto = ip->protocol;
		pkt->saddr[0] = ip->saddr;
		pkt->daddr[0] = ip->daddr;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6_l4 l4;
		struct ipv6hdr *ip6;

		if (!parse_ipv6(&c, &ip6))
			return false;
		__builtin_memcpy(pkt->saddr, &ip6->saddr, sizeof(pkt->saddr));
		__builtin_memcpy(pkt->daddr, &ip6->daddr, sizeof(pkt->daddr));
		if (!parse_ipv6_ext(&c, ip6->nexthdr, &l4) || l4.later_fragment)
			return false;
		pkt->family = AF_INET6;
		pkt->fragment = l4.fragment;
		pkt->proto = l4.proto;
	} else {
		return false;
	}

	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return false;
	/* ports and the checksum field must both be in this packet */
	if (c.pos + l4_csum_offset(pkt->proto) + sizeof(__sum16) > c.end)
		return false;
	ports = c.pos;
	pkt->sport = ports[0];
	pkt->dport = ports[1];
	pkt->l4_off = c.pos - data;
	pkt->l4_csum_off = pkt->l4_off + l4_csum_offset(pkt->proto);
	pkt->tcp_flags = 0;
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = c.pos;

		if ((void *)(tcp + 1) > c.end)
			return false;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
	}
	return true;
}

/*
 * parse_l4_packet on a tc program's skb, pulling headers into the linear area only when they
 * are not all there: a packet whose payload sits in pages (a TCP segment its sender built,
 * most of a bulk transfer) has a linear part that ends with its headers, shorter than
 * MAX_HDR_PULL, and linearize_headers would pull payload in for every such packet (a copy,
 * often a new head). Packet pointers taken before are stale after it.
 */
static __noinline __attribute__((unused)) bool parse_skb_l4(struct __sk_buff *skb, struct l4_packet *pkt)
{
	__u32 want = skb->len < MAX_HDR_PULL ? skb->len : MAX_HDR_PULL;

	if (parse_l4_packet((void *)(long)skb->data, (void *)(long)skb->data_end, pkt))
		return true;
	if ((__u32)(skb->data_end - skb->data) >= want || bpf_skb_pull_data(skb, want))
		return false;
	return parse_l4_packet((void *)(long)skb->data, (void *)(long)skb->data_end, pkt);
}
