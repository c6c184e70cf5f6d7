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

/* RFC 1624's HC' = ~(~HC + ~m + m'): start from the checksum (csum_start), add every word
 * that changed (csum_words: `words` 32-bit words at `from` became `to`), fold (csum_finish).
 * Inline, no helper call. */
static __always_inline __u64 csum_start(__sum16 check)
{
	return (__u16)~check;
}

static __always_inline __u64 csum_words(__u64 sum, const __be32 *from, const __be32 *to, int words)
{
	for (int i = 0; i < words; i++)
		sum += (__u64)(__u32)~from[i] + to[i];
	return sum;
}

static __always_inline __sum16 csum_finish(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	return ~csum_fold((__u32)sum);
}

/* The checksum after `words` 32-bit words at `from` became `to`. */
static __always_inline __sum16 csum_replace(__sum16 check, const __be32 *from, const __be32 *to, int words)
{
	return csum_finish(csum_words(csum_start(check), from, to, words));
}

/* Two 16-bit fields that sit side by side in a header (source and destination port), as the
 * 32-bit word they make in memory: built in a register, so that nothing reads back as one
 * word what was stored as two halves (a load spanning two stores waits for both to reach the
 * cache instead of taking its bytes from them). */
static __always_inline __u32 ports_word(__be16 sport, __be16 dport)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return (__u32)sport | (__u32)dport << 16;
#else
	return (__u32)sport << 16 | dport;
#endif
}
