/* One's-complement checksum arithmetic on header words, without a helper call: for checksums
 * of headers a program rewrites in place (xdp-lb's addresses and ports, lb's forwarded IPv4
 * header). */
#pragma once

#include "common.h"

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* A checksum after `words` 32-bit words at `from` became `to`: RFC 1624's
 * HC' = ~(~HC + ~m + m'), summed inline (no helper call) and folded. */
static __always_inline __sum16 csum_replace(__sum16 check, const __be32 *from, const __be32 *to, int words)
{
	__u64 sum = (__u16)~check;

	for (int i = 0; i < words; i++)
		sum += (__u64)(__u32)~from[i] + to[i];
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	return ~csum_fold((__u32)sum);
}
