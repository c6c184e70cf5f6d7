/* Refusing a new flow to a service without a usable backend, as a host without a listener
 * does: a TCP SYN gets an RST (RFC 9293 3.10.7.1: SEQ 0, ACK = SEG.SEQ + SEG.LEN, RST|ACK),
 * a UDP datagram an ICMP port unreachable (RFC 792: the invoking IPv4 header and the first
 * 64 bits of its data) or ICMPv6 port unreachable (RFC 4443 3.1: as much of the invoking
 * packet as fits in the IPv6 minimum MTU; a datagram that does not fit is quoted by its
 * IPv6 and UDP headers only). On direct packet pointers, so XDP (xdp_lb.c) and tc (lb.c)
 * share it; the caller resizes the packet between reject_read and reject_write:
 *   reject_read  reads what the answer needs and says how the packet must change size;
 *   (grow the head by `grow` bytes, then trim or extend the tail to `len` bytes)
 *   reject_write writes the answer over the packet's first 14 + grow (+ 40) bytes.
 * Answered only for a plain Ethernet frame carrying an IPv4 header without options or an
 * IPv6 header without extension headers (what clients send); anything else is dropped.
 * Every checksum is computed whole from the values written (the answer is a few dozen
 * bytes), except the quoted UDP datagram of an ICMPv6 answer, whose sum follows from its own
 * valid checksum. */
#pragma once

#include "parse.h"

#define REJECT_L3_OFF 14 /* Ethernet without VLAN tags */
#define REJECT_TTL 64
#define REJECT_IPV6_MIN_MTU 1280
#define REJECT_TCP_RST 0x04
#define REJECT_TCP_ACK 0x10
#define REJECT_TCP_SYN 0x02
#define REJECT_TCP_FIN 0x01
#ifndef ICMP_DEST_UNREACH
#define ICMP_DEST_UNREACH 3
#endif
#ifndef ICMPV6_DEST_UNREACH
#define ICMPV6_DEST_UNREACH 1
#endif

struct reject_info {
	__u32 saddr[4]; /* the client */
	__u32 daddr[4]; /* the VIP */
	__u8 src_mac[ETH_ALEN];
	__u8 dst_mac[ETH_ALEN];
	__be16 sport;
	__be16 dport;
	__u32 seq_end; /* TCP: SEG.SEQ + SEG.LEN, host order */
	__u32 udp_len; /* UDP: the datagram's length (IPv6: its payload length) */
	__u32 grow;    /* bytes to add in front of the packet */
	__u32 len;     /* the answer's frame length */
	__u8 family;
	__u8 proto;
	__u8 whole; /* ICMPv6: the whole invoking packet is quoted */
	__u8 pad;
};

static __always_inline __u16 reject_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* One's-complement sum of `words` 32-bit words as they lie in memory. */
static __always_inline __u64 reject_sum(const void *at, int words)
{
	const __u32 *w = at;
	__u64 sum = 0;

	for (int i = 0; i < words; i++) {
		sum += w[i];
		/* one word at a time: loading them all first spills them to the stack */
		asm volatile("" : "+r"(sum));
	}
	return sum;
}

/* What the answer to the packet parsed into `pkt` needs; false: not one we answer. */
static __always_inline bool reject_read(void *data, void *data_end, const struct l4_packet *pkt,
					struct reject_info *info)
{
	struct ethhdr *eth = data;
	__u32 l4_off = pkt->l4_off;

	__builtin_memset(info, 0, sizeof(*info));
	if (pkt->l3_off != REJECT_L3_OFF || pkt->fragment)
		return false;
	if ((void *)(eth + 1) > data_end)
		return false;
	__builtin_memcpy(info->src_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(info->dst_mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(info->saddr, pkt->saddr, sizeof(info->saddr));
	__builtin_memcpy(info->daddr, pkt->daddr, sizeof(info->daddr));
	info->sport = pkt->sport;
	info->dport = pkt->dport;
	info->family = pkt->family;
	info->proto = pkt->proto;

	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + REJECT_L3_OFF;

		if ((void *)(ip + 1) > data_end || ip->ihl != 5 || l4_off != REJECT_L3_OFF + sizeof(*ip))
			return false;
		if (pkt->proto == IPPROTO_TCP) {
			struct tcphdr *tcp = data + REJECT_L3_OFF + sizeof(*ip);
			__u32 payload;

			if ((void *)(tcp + 1) > data_end)
				return false;
			payload = bpf_ntohs(ip->tot_len) - sizeof(*ip) - tcp->doff * 4;
			if (payload > 0xffff)
				payload = 0;
			info->seq_end = bpf_ntohl(tcp->seq) + payload + 1; /* SYN */
			if (((__u8 *)tcp)[13] & REJECT_TCP_FIN)
				info->seq_end++;
			info->len = REJECT_L3_OFF + sizeof(struct iphdr) + sizeof(struct tcphdr);
			return true;
		}
		/* RFC 792: the invoking header and 64 bits of its data (the UDP header) */
		info->grow = sizeof(struct iphdr) + sizeof(struct icmphdr);
		info->len = REJECT_L3_OFF + info->grow + sizeof(struct iphdr) + sizeof(struct udphdr);
		return true;
	}

	struct ipv6hdr *ip6 = data + REJECT_L3_OFF;

	if ((void *)(ip6 + 1) > data_end || l4_off != REJECT_L3_OFF + sizeof(*ip6))
		return false;
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + REJECT_L3_OFF + sizeof(*ip6);
		__u32 payload;

		if ((void *)(tcp + 1) > data_end)
			return false;
		payload = bpf_ntohs(ip6->payload_len) - tcp->doff * 4;
		if (payload > 0xffff)
			payload = 0;
		info->seq_end = bpf_ntohl(tcp->seq) + payload + 1;
		if (((__u8 *)tcp)[13] & REJECT_TCP_FIN)
			info->seq_end++;
		info->len = REJECT_L3_OFF + sizeof(struct ipv6hdr) + sizeof(struct tcphdr);
		return true;
	}
	info->udp_len = bpf_ntohs(ip6->payload_len);
	if (info->udp_len < sizeof(struct udphdr))
		return false;
	info->grow = sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr);
	/* the whole invoking packet when the answer stays within the minimum MTU and the packet
	 * holds all of it; else its headers */
	if (info->grow + sizeof(struct ipv6hdr) + info->udp_len <= REJECT_IPV6_MIN_MTU &&
	    (void *)(ip6 + 1) + info->udp_len <= data_end) {
		info->whole = 1;
		info->len = REJECT_L3_OFF + info->grow + sizeof(struct ipv6hdr) + info->udp_len;
	} else {
		info->len = REJECT_L3_OFF + info->grow + sizeof(struct ipv6hdr) + sizeof(struct udphdr);
	}
	return true;
}

static __always_inline void reject_eth(struct ethhdr *eth, const struct reject_info *info)
{
	__builtin_memcpy(eth->h_dest, info->src_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, info->dst_mac, ETH_ALEN);
	/* a grown head (XDP) starts with whatever was there */
	eth->h_proto = bpf_htons(info->family == AF_INET ? ETH_P_IP : ETH_P_IPV6);
}

static __always_inline void reject_ipv4_header(struct iphdr *ip, const struct reject_info *info, __u8 proto,
					       __u16 tot_len)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(tot_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = REJECT_TTL;
	ip->protocol = proto;
	ip->check = 0;
	ip->saddr = info->daddr[0];
	ip->daddr = info->saddr[0];
	/* from the values, not read back: the compiler may merge the byte stores above into
	 * wider ones it need not order before 32-bit loads (strict aliasing) */
	ip->check = ~reject_fold((__u64)bpf_htons(0x4500) + bpf_htons(tot_len) + bpf_htons(0x4000) +
				 bpf_htons((REJECT_TTL << 8) | proto) + info->daddr[0] + info->saddr[0]);
}

static __always_inline void reject_ipv6_header(struct ipv6hdr *ip6, const struct reject_info *info, __u8 nexthdr,
					       __u16 payload_len)
{
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(payload_len);
	ip6->nexthdr = nexthdr;
	ip6->hop_limit = REJECT_TTL;
	__builtin_memcpy(&ip6->saddr, info->daddr, 16);
	__builtin_memcpy(&ip6->daddr, info->saddr, 16);
}

/* Pseudo-header of an answer from the VIP to the client (IPv4: one address word each). */
static __always_inline __u64 reject_pseudo(const struct reject_info *info, __u8 proto, __u32 len)
{
	int words = info->family == AF_INET ? 1 : 4;
	__u64 sum = reject_sum(info->daddr, words) + reject_sum(info->saddr, words);

	return sum + bpf_htonl(len) + bpf_htonl(proto);
}

/* Writes the answer; the packet already has the size reject_read asked for. */
static __always_inline bool reject_write(void *data, void *data_end, const struct reject_info *info)
{
	struct ethhdr *eth = data;

	if (info->proto == IPPROTO_TCP) {
		struct tcphdr *tcp;

		if (info->family == AF_INET) {
			struct iphdr *ip = data + REJECT_L3_OFF;

			tcp = (void *)(ip + 1);
			if ((void *)(tcp + 1) > data_end)
				return false;
			reject_ipv4_header(ip, info, IPPROTO_TCP, sizeof(*ip) + sizeof(*tcp));
		} else {
			struct ipv6hdr *ip6 = data + REJECT_L3_OFF;

			tcp = (void *)(ip6 + 1);
			if ((void *)(tcp + 1) > data_end)
				return false;
			reject_ipv6_header(ip6, info, IPPROTO_TCP, sizeof(*tcp));
		}
		__builtin_memset(tcp, 0, sizeof(*tcp));
		tcp->source = info->dport;
		tcp->dest = info->sport;
		tcp->seq = 0;
		tcp->ack_seq = bpf_htonl(info->seq_end);
		tcp->doff = 5;
		((__u8 *)tcp)[13] = REJECT_TCP_RST | REJECT_TCP_ACK;
		tcp->check = ~reject_fold(reject_pseudo(info, IPPROTO_TCP, sizeof(*tcp)) + info->dport + info->sport +
					  bpf_htonl(info->seq_end) +
					  bpf_htons(0x5000 | REJECT_TCP_RST | REJECT_TCP_ACK));
		reject_eth(eth, info);
		return true;
	}

	if (info->family == AF_INET) {
		struct iphdr *ip = data + REJECT_L3_OFF;
		struct icmphdr *icmp = (void *)(ip + 1);
		void *quote = icmp + 1;

		/* the quoted header and 8 bytes, then nothing */
		if (quote + sizeof(struct iphdr) + sizeof(struct udphdr) > data_end)
			return false;
		reject_ipv4_header(ip, info, IPPROTO_ICMP,
				   sizeof(*ip) + sizeof(*icmp) + sizeof(struct iphdr) + sizeof(struct udphdr));
		__builtin_memset(icmp, 0, sizeof(*icmp));
		icmp->type = ICMP_DEST_UNREACH;
		icmp->code = 3; /* port unreachable */
		icmp->checksum = ~reject_fold((__u64)bpf_htons((ICMP_DEST_UNREACH << 8) | 3) + reject_sum(quote, 7));
		reject_eth(eth, info);
		return true;
	}

	struct ipv6hdr *ip6 = data + REJECT_L3_OFF;
	struct icmp6hdr *icmp6 = (void *)(ip6 + 1);
	void *quote = icmp6 + 1;
	__u32 quote_len = sizeof(struct ipv6hdr) + (info->whole ? info->udp_len : sizeof(struct udphdr));
	__u64 sum;

	if (quote + sizeof(struct ipv6hdr) + sizeof(struct udphdr) > data_end || quote_len > 0xffff)
		return false;
	reject_ipv6_header(ip6, info, NEXTHDR_ICMP, sizeof(*icmp6) + quote_len);
	__builtin_memset(icmp6, 0, sizeof(*icmp6));
	icmp6->icmp6_type = ICMPV6_DEST_UNREACH;
	icmp6->icmp6_code = 4; /* port unreachable */
	sum = reject_pseudo(info, NEXTHDR_ICMP, sizeof(*icmp6) + quote_len) +
	      bpf_htons((ICMPV6_DEST_UNREACH << 8) | 4) + reject_sum(quote, 10);
	if (info->whole) {
		/* the datagram's own checksum makes its pseudo-header and bytes sum to 0xffff:
		 * its bytes sum to the complement of its pseudo-header (client -> VIP) */
		__u64 pseudo = reject_sum(info->saddr, 4) + reject_sum(info->daddr, 4) + bpf_htonl(info->udp_len) +
			       bpf_htonl(IPPROTO_UDP);

		sum += (__u16)~reject_fold(pseudo);
	} else {
		sum += reject_sum(quote + sizeof(struct ipv6hdr), 2);
	}
	icmp6->icmp6_cksum = ~reject_fold(sum);
	reject_eth(eth, info);
	return true;
}
