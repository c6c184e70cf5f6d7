/* The service tables every load-balancing datapath shares (clusterip, lb, xdp-lb), written by
 * src/control/service.rs:
 *   services: a service key (VIP:PORT and protocol) -> its value: `count` backend slots from
 *             `base`, the sum of its usable backends' weights, affinity;
 *   backends: slot -> a datapath's backend value, which starts with its endpoint;
 *   weights:  slot -> the cumulative weight of the service's usable backends up to and
 *             including this slot (a draining, down or unhealthy backend adds 0).
 * A changed service is written to fresh slots and then swapped in with one update of its
 * value, so a lookup never sees a half-written list. A service of both protocols has a key
 * of each, pointing at the same slots.
 * Addresses and ports are in network order; IPv4 uses addr[0]. */
#pragma once

/* An address and port of one family; zeroed padding so equal endpoints hash equal. */
struct service_endpoint {
	__u32 addr[4];
	__be16 port;
	__u8 family; /* AF_INET (2) or AF_INET6 (10) */
	__u8 proto;  /* service keys: IPPROTO_TCP or IPPROTO_UDP; backends and flows: 0 */
};

/* service_range.flags */
#define SERVICE_AFFINITY 1 /* a client keeps its backend for affinity_s (struct affinity_*) */
#define SERVICE_KEEP_SOURCE 2 /* lb: no source NAT (its backend values carry no snat_addr); user space's record */
/* every backend usable, all of one weight (the common case): a slot is base + hash % count and
 * usable, as before weights existed, with no lookup in the weights table (issue 19's cost) */
#define SERVICE_EVEN_WEIGHTS 4

struct service_range {
	__u32 base;
	__u32 count;	  /* backend slots, usable or not */
	__u32 weight;	  /* sum of the usable backends' weights; 0: no usable backend, refuse */
	__u32 flags;	  /* SERVICE_* */
	__u32 affinity_s; /* SERVICE_AFFINITY: how long a client keeps its backend, seconds */
	__u32 pad;
};

#define SERVICE_MAX_WEIGHT 1000
/* backends per service the weighted choice searches (2^14; the limits of every datapath) */
#define SERVICE_SEARCH_STEPS 15

/* Session affinity: (service, client) -> the backend it got. The client is its source
 * address (lb, xdp-lb) or its network namespace's cookie (clusterip; addr[0..1]). */
struct affinity_key {
	struct service_endpoint service;
	__u32 client[4];
};

struct affinity_value {
	struct service_endpoint backend;
	__u32 slot;
	__u64 seen_ns; /* bpf_ktime_get_ns() of its last new flow */
};

#define AFFINITY_MAX_ENTRIES 131072

#ifdef __BPF__
/* The slot whose share of the service's weight holds `hash`: the first slot whose cumulative
 * weight is above hash % weight. Every new flow's choice, in SERVICE_SEARCH_STEPS lookups. */
static __always_inline int pick_weighted_slot(void *weights, const struct service_range *range, __u32 hash,
					     __u32 *slot)
{
	__u32 target, lo = 0, hi = range->count;
	int i;

	if (!range->weight || !range->count)
		return -1;
	if (range->flags & SERVICE_EVEN_WEIGHTS) {
		*slot = range->base + hash % range->count;
		return 0;
	}
	target = hash % range->weight;
	for (i = 0; i < SERVICE_SEARCH_STEPS && lo < hi; i++) {
		__u32 mid = lo + (hi - lo) / 2;
		__u32 at = range->base + mid;
		__u32 *end = bpf_map_lookup_elem(weights, &at);

		if (!end)
			return -1;
		if (*end > target)
			hi = mid;
		else
			lo = mid + 1;
	}
	if (lo >= range->count)
		return -1;
	*slot = range->base + lo;
	return 0;
}

/* Whether `slot` of the service still takes new flows: in its range, with a weight. */
static __always_inline bool slot_usable(void *weights, const struct service_range *range, __u32 slot)
{
	__u32 before = 0, *end, *prev, at;

	if (slot < range->base || slot - range->base >= range->count)
		return false;
	if (range->flags & SERVICE_EVEN_WEIGHTS)
		return true;
	end = bpf_map_lookup_elem(weights, &slot);
	if (!end)
		return false;
	if (slot > range->base) {
		at = slot - 1;
		prev = bpf_map_lookup_elem(weights, &at);
		if (!prev)
			return false;
		before = *prev;
	}
	return *end > before;
}

static __always_inline bool service_endpoint_equal(const struct service_endpoint *a,
						   const struct service_endpoint *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
	       a->addr[3] == b->addr[3] && a->port == b->port && a->family == b->family;
}

/* The slot the client's affinity entry names while it lasts and that backend still takes new
 * flows (the same endpoint in the slot: a rewritten service moves its backends); else -1.
 * `backends` values start with their endpoint. */
static __always_inline int affinity_slot(void *affinity, void *backends, void *weights,
					 const struct service_range *range, const struct affinity_key *key,
					 __u64 now)
{
	struct affinity_value *seen;
	struct service_endpoint *at;

	if (!(range->flags & SERVICE_AFFINITY))
		return -1;
	seen = bpf_map_lookup_elem(affinity, key);
	if (!seen || now - seen->seen_ns > (__u64)range->affinity_s * 1000000000ULL)
		return -1;
	if (!slot_usable(weights, range, seen->slot))
		return -1;
	at = bpf_map_lookup_elem(backends, &seen->slot);
	if (!at || !service_endpoint_equal(at, &seen->backend))
		return -1;
	seen->seen_ns = now;
	return seen->slot;
}

static __always_inline void affinity_remember(void *affinity, const struct service_range *range,
					      const struct affinity_key *key, const struct service_endpoint *backend,
					      __u32 slot, __u64 now)
{
	struct affinity_value value = {};

	if (!(range->flags & SERVICE_AFFINITY))
		return;
	value.backend = *backend;
	value.slot = slot;
	value.seen_ns = now;
	bpf_map_update_elem(affinity, key, &value, BPF_ANY);
}
#endif
