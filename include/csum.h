/* Checksum-preserving rewrites on tc skbs, shared by every program that changes addresses or ports. */
#pragma once

#include "parse.h"

/*
 * BPF_F_IPV6 for bpf_l4_csum_replace (Linux 6.16): tells the helper that a pseudo-header
 * change belongs to IPv6 so CHECKSUM_COMPLETE skbs stay right. Older kernels reject the
 * flag with -EINVAL, so user space probes it and sets this before load; the default (0)
 * is what a hand-loaded object uses and works everywhere.
 */
const volatile __u64 l4_csum_ipv6_flag = 0;

/* Makes the first bytes of the packet linear and writable so headers can be read directly. */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	__u32 len = skb->len < MAX_HDR_PULL ? skb->len : MAX_HDR_PULL;

	bpf_skb_pull_data(skb, len);
}

/*
 * Replaces a 16-byte IPv6 address at addr_off by new_addr and, when l4_csum_off is not
 * zero, fixes the L4 checksum for the pseudo-header change. A UDP checksum of zero
 * ("none") stays zero. Returns 0 or a negative helper error.
 */
static __always_inline int rewrite_ipv6_addr(struct __sk_buff *skb, __u32 addr_off,
					     const struct in6_addr *old_addr,
					     const struct in6_addr *new_addr, __u32 l4_csum_off,
					     bool is_udp)
{
	int err;

	if (l4_csum_off) {
		__s64 diff = bpf_csum_diff((__be32 *)old_addr, sizeof(*old_addr),
					   (__be32 *)new_addr, sizeof(*new_addr), 0);
		__u64 flags = BPF_F_PSEUDO_HDR | l4_csum_ipv6_flag;

		if (is_udp)
			flags |= BPF_F_MARK_MANGLED_0;
		err = bpf_l4_csum_replace(skb, l4_csum_off, 0, diff, flags);
		if (err)
			return err;
	}
	return bpf_skb_store_bytes(skb, addr_off, new_addr, sizeof(*new_addr), 0);
}

/* Replaces a 16-bit L4 port at port_off, fixing the L4 checksum at l4_csum_off. */
static __always_inline int rewrite_l4_port(struct __sk_buff *skb, __u32 port_off, __u32 l4_csum_off,
					   __be16 old_port, __be16 new_port, bool is_udp)
{
	__u64 flags = sizeof(new_port) | (is_udp ? BPF_F_MARK_MANGLED_0 : 0);
	int err;

	err = bpf_l4_csum_replace(skb, l4_csum_off, old_port, new_port, flags);
	if (err)
		return err;
	return bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0);
}

/*
 * Replaces an IPv4 address at addr_off, fixing the IP header checksum at ip_csum_off and
 * the L4 checksum (pseudo-header) at l4_csum_off. A zero UDP checksum stays zero.
 */
static __always_inline int rewrite_ipv4_addr(struct __sk_buff *skb, __u32 addr_off, __u32 ip_csum_off,
					     __u32 l4_csum_off, __be32 old_addr, __be32 new_addr,
					     bool is_udp)
{
	__u64 l4_flags = BPF_F_PSEUDO_HDR | sizeof(new_addr) | (is_udp ? BPF_F_MARK_MANGLED_0 : 0);
	int err;

	err = bpf_l4_csum_replace(skb, l4_csum_off, old_addr, new_addr, l4_flags);
	if (err)
		return err;
	err = bpf_l3_csum_replace(skb, ip_csum_off, old_addr, new_addr, sizeof(new_addr));
	if (err)
		return err;
	return bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0);
}
