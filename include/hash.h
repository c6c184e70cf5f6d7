/* The flow hash of the load balancers (lb, xdp-lb): murmur3 over the client side of a flow,
 * so a flow always hashes the same and different clients and ports spread evenly. */
#pragma once

#include "common.h"

static __always_inline __u32 rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

/* Mixes one word into a running hash (murmur3's block step). */
static __always_inline __u32 mix(__u32 hash, __u32 word)
{
	word *= 0xcc9e2d51;
	word = rol32(word, 15);
	word *= 0x1b873593;
	hash ^= word;
	hash = rol32(hash, 13);
	return hash * 5 + 0xe6546b64;
}

/* Client address (four words, IPv4 in the first), port and protocol, with a seed. */
static __always_inline __u32 client_hash(__u32 seed, const __u32 *addr, __be16 port, __u8 proto)
{
	__u32 hash = seed;

	hash = mix(hash, addr[0]);
	hash = mix(hash, addr[1]);
	hash = mix(hash, addr[2]);
	hash = mix(hash, addr[3]);
	hash = mix(hash, ((__u32)port << 16) | proto);
	/* murmur3's finaliser: every input bit reaches every output bit */
	hash ^= hash >> 16;
	hash *= 0x85ebca6b;
	hash ^= hash >> 13;
	hash *= 0xc2b2ae35;
	return hash ^ (hash >> 16);
}
