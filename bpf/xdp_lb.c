// SPDX-License-Identifier: GPL-2.0
/* xdp-lb: a one-arm full-NAT L4 load balancer in XDP. A client's packet to a service VIP:PORT
 * leaves the way it came (XDP_TX) towards a backend chosen by Maglev hashing, from this
 * node's address and a source port of its own, so the backend's reply comes back here and
 * is rewritten back to the client. Flow state in LRU tables keeps every packet of a flow on
 * its backend; checksums are updated incrementally. */
#include "common.h"
#include <bpf/bpf_core_read.h>
#include "parse.h"
#include "hash.h"
#include "flood.h"
#include "xdp_lb.h"
#include "icmp_error.h"
#include "reject.h"
#include "inet_csum.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* The services' epoch: user space writes a new value after every change of the service
 * tables (xdp_lb::sync). A flow that saw this value already (xdp_lb_flow.epoch) goes to its
 * backend without looking its service up again; the first packet after a change checks.
 * A section (a map) of its own, read without a helper call or a byte of stack. */
volatile __u32 services_epoch SEC(".data.epoch") = 0;

/* Set by user space before load. */
volatile const __u32 hash_seed = 0;
volatile const __u8 events_level = XDP_LB_EVENTS_OFF;
/* source ports this node hands out towards backends: [port_lo, port_lo + port_span) */
volatile const __u16 port_lo = 1024;
volatile const __u16 port_span = 31744;
/* slots of the flow clock: --max-flows */
volatile const __u32 clock_size = XDP_LB_DEFAULT_FLOWS;
/* new flows per second per CPU above which we are under flood; 0: never */
volatile const __u32 flood_rate = XDP_LB_DEFAULT_FLOOD_RATE;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, XDP_LB_MAX_SERVICES);
	__type(key, struct service_endpoint);
	__type(value, struct service_range);
} xdp_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDP_LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct xdp_lb_backend);
} xdp_lb_backends SEC(".maps");

/* slot -> cumulative weight of the service's usable backends (include/service.h); the
 * Maglev ring (xdp_lb_rings) already holds each backend in proportion to its weight, so the
 * program does not read it: user space keeps the service tables alike in every datapath. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDP_LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} xdp_lb_weights SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_LB_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct xdp_lb_stats);
} xdp_lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDP_LB_RING_ENTRIES);
	__type(key, __u32);
	__type(value, __u32);
} xdp_lb_rings SEC(".maps");

/* client -> VIP tuple -> flow, one table per family: an IPv4 flow's key is the 16 bytes of
 * struct xdp_lb_tuple4, not a 40-byte tuple, and the kernel hashes and compares the whole key
 * at every lookup (the known-flow path's one hash lookup: 8 ns less a packet measured on the
 * AMD host; Cilium keeps ct4 and ct6 apart for the same reason). User space sets the sizes
 * (--max-flows, each: the flow clock bounds both together). Plain hashes, not LRUs: only this
 * program removes a flow (finished, idle, or half-open and making room) and always with its
 * reverse entry, so an established flow is never evicted for a new one and never loses its
 * way back. The IPv6 tables take memory as they fill (BPF_F_NO_PREALLOC), the IPv4 ones
 * hold it from the start. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDP_LB_DEFAULT_FLOWS);
	__type(key, struct xdp_lb_tuple4);
	__type(value, struct xdp_lb_flow);
} xdp_lb_flows4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDP_LB_DEFAULT_FLOWS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xdp_lb_tuple);
	__type(value, struct xdp_lb_flow);
} xdp_lb_flows6 SEC(".maps");

/* backend -> this node:lb_port tuple -> the flow's client -> VIP tuple and what its
 * replies need (struct xdp_lb_reply): a reply takes this one lookup. By family, as above. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDP_LB_DEFAULT_FLOWS);
	__type(key, struct xdp_lb_tuple4);
	__type(value, struct xdp_lb_reply);
} xdp_lb_reverse4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XDP_LB_DEFAULT_FLOWS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xdp_lb_tuple);
	__type(value, struct xdp_lb_reply);
} xdp_lb_reverse6 SEC(".maps");

/* The flow clock: slot -> client tuple of the flow holding it (which names its slot back).
 * As many slots as the flow table has entries, so a flow needs a slot to exist; a new flow
 * takes a free random slot or evicts the finished, idle or half-open flow holding one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XDP_LB_DEFAULT_FLOWS);
	__type(key, __u32);
	__type(value, struct xdp_lb_tuple);
} xdp_lb_clock SEC(".maps");

/* the flood detector's one-second window, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flood_window);
} xdp_lb_flood SEC(".maps");

/* under flood: flow hash -> (hash << 32 | ms) of a first packet dropped, by hash % slots */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOOD_SEEN_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} xdp_lb_flood_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdp_lb_counters);
} xdp_lb_counters SEC(".maps");

/* Per-CPU room for the ICMP error path's structs: its frame stays small enough to be called
 * from the programs' own, which hold the balancing path (512 bytes for a whole call chain). */
struct xdp_lb_icmp_scratch {
	struct icmp_error err;
	struct icmp_error_rewrite to;
	struct xdp_lb_tuple quote; /* the quoted packet's tuple, swapped */
	struct xdp_lb_tuple key;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdp_lb_icmp_scratch);
} xdp_lb_icmp_scratch SEC(".maps");

/* this CPU's clock as of its latest tick (now_ns), and the tick it last woke the events'
 * reader in (emit) */
struct xdp_lb_now {
	__u64 tick; /* jiffies */
	__u64 ns;
	__u64 woke;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdp_lb_now);
} xdp_lb_now SEC(".maps");

/* session affinity: (service, client address) -> the backend it got (include/service.h) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_MAX_ENTRIES);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
} xdp_lb_affinity SEC(".maps");

struct affinity_scratch {
	struct affinity_key client;
	struct affinity_value seen;
	__u32 hash;
	__u32 at; /* keys of the lookups, and the weights found */
	__u32 prev;
	__u32 ring;
	__u32 end;
	__u32 before;
};

/* affinity_pick()'s working state, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct affinity_scratch);
} xdp_lb_affinity_scratch SEC(".maps");

/* open_flow()'s new flow and its reply entry, built here before they go into their
 * tables, and the keys new_flow_clock_slot() and new_flow_port() work with (they have
 * almost no stack) */
struct flow_scratch {
	struct xdp_lb_flow flow;
	struct xdp_lb_reply reply;
	struct xdp_lb_tuple rev;
	struct xdp_lb_tuple victim;
};

/* open_flow()'s working state (struct flow_scratch), per CPU. On the stack it made the
 * balancing path's frame too big for older kernels (6.1, 5.10), which add up the frames of a
 * call chain, each rounded up to 32 bytes, against 512 ("combined stack size of 2 calls is
 * 544. Too large"); scripts/check-stack checks every chain as they do. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_scratch);
} xdp_lb_new_flow SEC(".maps");

/* refuse()'s working state, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reject_info);
} xdp_lb_reject SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} xdp_lb_events SEC(".maps");

/* puts the event layout into BTF, for the Rust skeleton's types */
struct xdp_lb_event *xdp_lb_event_layout __attribute__((unused));

static __always_inline struct xdp_lb_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&xdp_lb_counters, &zero);
}

/* Eight bytes of a key from two words, in memory order. Opaque to the compiler, which would
 * otherwise merge the two 4-byte loads back into one 8-byte load. */
static __always_inline __u64 words_pair(__u32 first, __u32 second)
{
	/* widened before the barrier: a 4-byte load already zero-extends, the compiler knows it
	 * of a 64-bit value only (of a 32-bit one behind the barrier it shifts to make sure) */
	__u64 lo = first, hi = second;

	asm volatile("" : "+r"(lo), "+r"(hi));
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return hi << 32 | lo;
#else
	return lo << 32 | hi;
#endif
}

/* The flow and reverse tables by a tuple of either family: an IPv4 tuple's table takes its
 * 16-byte key (struct xdp_lb_tuple4), built on the stack in two 8-byte stores (as tuple_of
 * builds a tuple: the table reads its key 8 bytes at a time). */
static __always_inline void key4_of(struct xdp_lb_tuple4 *key4, const struct xdp_lb_tuple *tuple)
{
	__u64 *words = (__u64 *)key4;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	__u32 rest = tuple->proto;
#else
	__u32 rest = (__u32)tuple->proto << 24;
#endif

	words[0] = words_pair(tuple->src[0], tuple->dst[0]);
	words[1] = words_pair(ports_word(tuple->sport, tuple->dport), rest);
}

/* `key`'s entry of a pair of tables, IPv4's (`v4`, keyed by struct xdp_lb_tuple4) or
 * IPv6's (`v6`, keyed by the tuple). Always inlined, so each call site names its maps
 * itself: the verifier inlines a lookup (no helper call) only where one map reaches it. The
 * empty asm keeps the compiler from making the two lookups one call that either map reaches
 * (it did, at six sites of the new-flow and ICMP paths). */
static __always_inline void *table_find(void *v4, void *v6, const struct xdp_lb_tuple *key)
{
	struct xdp_lb_tuple4 key4;
	void *value;

	if (key->family != AF_INET) {
		value = bpf_map_lookup_elem(v6, key);
		asm volatile("" : "+r"(value));
		return value;
	}
	key4_of(&key4, key);
	return bpf_map_lookup_elem(v4, &key4);
}

static __always_inline long table_put(void *v4, void *v6, const struct xdp_lb_tuple *key, const void *value,
				      __u64 flags)
{
	struct xdp_lb_tuple4 key4;

	if (key->family != AF_INET)
		return bpf_map_update_elem(v6, key, value, flags);
	key4_of(&key4, key);
	return bpf_map_update_elem(v4, &key4, value, flags);
}

static __always_inline void table_remove(void *v4, void *v6, const struct xdp_lb_tuple *key)
{
	struct xdp_lb_tuple4 key4;
	long err;

	if (key->family != AF_INET) {
		err = bpf_map_delete_elem(v6, key);
		asm volatile("" : "+r"(err)); /* as in table_find */
		return;
	}
	key4_of(&key4, key);
	bpf_map_delete_elem(v4, &key4);
}

static __always_inline struct xdp_lb_flow *flow_find(const struct xdp_lb_tuple *key)
{
	return table_find(&xdp_lb_flows4, &xdp_lb_flows6, key);
}

static __always_inline long flow_put(const struct xdp_lb_tuple *key, const struct xdp_lb_flow *flow, __u64 flags)
{
	return table_put(&xdp_lb_flows4, &xdp_lb_flows6, key, flow, flags);
}

static __always_inline void flow_remove(const struct xdp_lb_tuple *key)
{
	table_remove(&xdp_lb_flows4, &xdp_lb_flows6, key);
}

static __always_inline struct xdp_lb_reply *reply_find(const struct xdp_lb_tuple *rev)
{
	return table_find(&xdp_lb_reverse4, &xdp_lb_reverse6, rev);
}

static __always_inline long reply_put(const struct xdp_lb_tuple *rev, const struct xdp_lb_reply *reply, __u64 flags)
{
	return table_put(&xdp_lb_reverse4, &xdp_lb_reverse6, rev, reply, flags);
}

static __always_inline void reply_remove(const struct xdp_lb_tuple *rev)
{
	table_remove(&xdp_lb_reverse4, &xdp_lb_reverse6, rev);
}

/* The flow's client side decides its backend. */
static __always_inline __u32 flow_hash(const struct xdp_lb_tuple *flow)
{
	return client_hash(hash_seed, flow->src, flow->sport, flow->proto);
}

static __always_inline bool endpoint_equal(const struct service_endpoint *a, const struct service_endpoint *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] && a->addr[2] == b->addr[2] &&
	       a->addr[3] == b->addr[3] && a->port == b->port && a->family == b->family;
}

/* endpoint_equal of a backend slot's endpoint and a flow's, for the known-flow path: both
 * open their map values (8-byte aligned), so two 8-byte and one 4-byte compare do (the
 * flow's is a copy of the backend's, protocol byte included). */
static __always_inline bool backend_unchanged(const struct xdp_lb_backend *backend, const struct xdp_lb_flow *flow)
{
	const __u64 *a = (const __u64 *)&backend->endpoint;
	const __u64 *b = (const __u64 *)&flow->backend;

	_Static_assert(__builtin_offsetof(struct xdp_lb_backend, endpoint) == 0 &&
			       __builtin_offsetof(struct xdp_lb_flow, backend) == 0,
		       "endpoints open their values");
	return a[0] == b[0] && a[1] == b[1] &&
	       *(const __u32 *)&backend->endpoint.port == *(const __u32 *)&flow->backend.port;
}

static __always_inline void copy_addr(__u32 *to, const __u32 *from)
{
	to[0] = from[0];
	to[1] = from[1];
	to[2] = from[2];
	to[3] = from[3];
}

/* Whether this event may wake the reader: once a tick per CPU at most. The ring wakes its
 * reader for every event it finds caught up, and a reader keeping up with a flood of new
 * flows is always caught up: each wakeup is an interrupt the CPU sends itself (on KVM, an exit
 * to the host each). The reader picks up what waits without one at its next wakeup or poll
 * timeout (100 ms). */
static __always_inline __u64 wakeup_flags(void)
{
	struct xdp_lb_now *cpu;
	__u64 tick = bpf_jiffies64();
	__u32 zero = 0;

	cpu = bpf_map_lookup_elem(&xdp_lb_now, &zero);
	if (!cpu)
		return 0;
	if (cpu->woke == tick)
		return BPF_RB_NO_WAKEUP;
	cpu->woke = tick;
	return 0;
}

static __always_inline void emit(__u8 kind, const struct xdp_lb_tuple *flow, const struct xdp_lb_flow *state,
				 const struct service_endpoint *previous, __u32 len)
{
	struct xdp_lb_counters *c;
	struct xdp_lb_event *event;

	event = bpf_ringbuf_reserve(&xdp_lb_events, sizeof(*event), 0);
	if (!event) {
		/* never a reason to hold a packet back: count it, carry on */
		c = counters();
		if (c)
			c->lost_events++;
		return;
	}
	__builtin_memset(event, 0, sizeof(*event));
	event->timestamp = bpf_ktime_get_ns();
	event->flow = *flow;
	event->backend = state->backend;
	if (previous)
		event->previous = *previous;
	event->len = len;
	event->lb_port = state->lb_port;
	event->kind = kind;
	bpf_ringbuf_submit(event, wakeup_flags());
}

struct find_ctx {
	const struct service_endpoint *want;
	__u32 base;
	__u32 found;
};

static long find_backend_cb(__u32 index, void *data)
{
	struct find_ctx *ctx = data;
	struct xdp_lb_backend *backend;
	__u32 slot = ctx->base + index;

	backend = bpf_map_lookup_elem(&xdp_lb_backends, &slot);
	if (backend && endpoint_equal(&backend->endpoint, ctx->want)) {
		ctx->found = slot;
		return 1;
	}
	return 0;
}

/* The slot of `want` in the service's list, or ~0U. It runs only when a list was rewritten
 * under a flow. xdp_lb walks the list with bpf_loop (5.17); xdp_lb_compat, for kernels
 * without it (5.10), with a bounded loop over the first XDP_LB_COMPAT_SEARCH backends (the
 * verifier walks every turn of it: a flow whose backend moved further is re-balanced). */
static __always_inline __u32 find_backend(const struct service_range *range,
					  const struct service_endpoint *want, const bool compat)
{
	struct find_ctx ctx = { .want = want, .base = range->base, .found = ~0U };
	struct xdp_lb_backend *backend;
	__u32 i, slot;

	if (!compat) {
		bpf_loop(range->count, find_backend_cb, &ctx, 0);
		return ctx.found;
	}
	for (i = 0; i < XDP_LB_COMPAT_SEARCH; i++) {
		if (i >= range->count)
			break;
		slot = range->base + i;
		backend = bpf_map_lookup_elem(&xdp_lb_backends, &slot);
		if (backend && endpoint_equal(&backend->endpoint, want))
			return slot;
	}
	return ~0U;
}

/* The clock, read: from the coarse clock (5.11); xdp_lb_compat takes the precise one where
 * the kernel lacks it (chosen at load: the verifier drops the other branch). */
static __always_inline __u64 clock_ns(const bool compat)
{
	if (!compat || bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_ktime_get_coarse_ns))
		return bpf_ktime_get_coarse_ns();
	return bpf_ktime_get_ns();
}

/* Now, to a tick: the clock read once per tick per CPU. A helper call costs more than the
 * rest of a known flow's rewrite on some hosts (about 19 ns of a 29 ns test_run on AMD with
 * SRSO's safe RET); jiffies are an inlined load, and so is this per-CPU entry from 6.10 on
 * (before, one helper call as the clock was). A CPU that read the tick before the clock moved
 * keeps a value one tick old until its next tick: every timeout here allows a tick. */
static __always_inline __u64 now_ns(const bool compat)
{
	struct xdp_lb_now *cached;
	__u64 tick = bpf_jiffies64();
	__u32 zero = 0;

	cached = bpf_map_lookup_elem(&xdp_lb_now, &zero);
	if (!cached)
		return clock_ns(compat);
	if (cached->tick != tick) {
		cached->ns = clock_ns(compat);
		cached->tick = tick;
	}
	return cached->ns;
}

/* The flow's backend in the service's current list (its slot, refreshed when the list was
 * rewritten elsewhere), or NULL when it left the service. */
static __always_inline struct xdp_lb_backend *current_backend(const struct service_range *range,
							      struct xdp_lb_flow *flow, const bool compat)
{
	struct xdp_lb_backend *backend;
	__u32 slot = flow->slot;

	if (slot - range->base < range->count) {
		backend = bpf_map_lookup_elem(&xdp_lb_backends, &slot);
		if (backend && endpoint_equal(&backend->endpoint, &flow->backend))
			return backend;
	}
	slot = find_backend(range, &flow->backend, compat);
	if (slot == ~0U)
		return NULL;
	flow->slot = slot;
	return bpf_map_lookup_elem(&xdp_lb_backends, &slot);
}

/* Maglev: the ring entry the flow hashes to names its backend. */
static __always_inline __u32 pick_slot(const struct service_range *range, __u32 hash)
{
	__u32 ring_base = range->base * XDP_LB_RING_PER_SLOT;
	__u32 *size, *entry, index;

	size = bpf_map_lookup_elem(&xdp_lb_rings, &ring_base);
	if (!size || !*size)
		return ~0U;
	index = ring_base + 1 + hash % *size;
	entry = bpf_map_lookup_elem(&xdp_lb_rings, &index);
	if (!entry || *entry >= range->count)
		return ~0U;
	return range->base + *entry;
}

/* Whether a flow is done with: `last_seen` is its latest packet either way. */
static __always_inline bool flow_idle(const struct xdp_lb_flow *flow, __u64 last_seen, __u8 proto, __u64 now)
{
	/* coarse clocks of two CPUs may disagree by a tick: never "idle" for that */
	__u64 idle = now > last_seen ? now - last_seen : 0;

	if (!(flow->state & XDP_LB_ESTABLISHED))
		return idle > XDP_LB_HALF_OPEN_NS;
	if (proto == IPPROTO_UDP)
		return idle > XDP_LB_UDP_IDLE_NS;
	if (flow->state & XDP_LB_RST)
		return idle > XDP_LB_TCP_RESET_NS;
	if ((flow->state & (XDP_LB_FIN_CLIENT | XDP_LB_FIN_BACKEND)) == (XDP_LB_FIN_CLIENT | XDP_LB_FIN_BACKEND))
		return idle > XDP_LB_TCP_CLOSED_NS;
	return idle > XDP_LB_TCP_IDLE_NS;
}

static __always_inline bool tuple_equal(const struct xdp_lb_tuple *a, const struct xdp_lb_tuple *b)
{
	return a->src[0] == b->src[0] && a->src[1] == b->src[1] && a->src[2] == b->src[2] &&
	       a->src[3] == b->src[3] && a->dst[0] == b->dst[0] && a->dst[1] == b->dst[1] &&
	       a->dst[2] == b->dst[2] && a->dst[3] == b->dst[3] && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto && a->family == b->family;
}

/* Whether `flow` is the one reverse-table key `rev` (backend -> this node:port) points back
 * at: it still goes to that backend from that port. */
static __always_inline bool flow_owns(const struct xdp_lb_flow *flow, const struct xdp_lb_tuple *rev)
{
	return flow->lb_port == rev->dport && flow->backend.port == rev->sport &&
	       flow->backend.addr[0] == rev->src[0] && flow->backend.addr[1] == rev->src[1] &&
	       flow->backend.addr[2] == rev->src[2] && flow->backend.addr[3] == rev->src[3];
}

static __always_inline __u64 later(__u64 a, __u64 b)
{
	return a > b ? a : b;
}

/* Whether the source port of reverse entry `rev`, held by the flow `owner` names, may go to
 * the flow `want`: it is that flow itself, or its owner was removed, moved on, went idle, or
 * is half-open for over a second (then it is evicted: an established flow never is). */
static __always_inline bool port_reusable(const struct xdp_lb_tuple *rev, struct xdp_lb_reply *owner,
					  const struct xdp_lb_tuple *want, __u64 now)
{
	struct xdp_lb_counters *c;
	struct xdp_lb_flow *flow;

	if (tuple_equal(&owner->client, want))
		return true;
	flow = flow_find(&owner->client);
	if (!flow)
		return true;
	if (!flow_owns(flow, rev))
		return true;
	if (flow->state & XDP_LB_ESTABLISHED) {
		if (!flow_idle(flow, later(flow->last_seen, owner->last_seen), owner->client.proto, now))
			return false;
	} else {
		if (now < flow->last_seen + XDP_LB_PREEMPT_NS)
			return false;
		c = counters();
		if (c)
			c->evicted++;
	}
	flow_remove(&owner->client);
	return true;
}

/* The reverse table's key of the flow `key` -> `flow`: backend -> this node:lb_port. */
static __always_inline void reverse_key(struct xdp_lb_tuple *rev, const struct xdp_lb_tuple *key,
					const struct xdp_lb_flow *flow)
{
	__builtin_memset(rev, 0, sizeof(*rev));
	copy_addr(rev->src, flow->backend.addr);
	copy_addr(rev->dst, flow->lb_addr);
	rev->sport = flow->backend.port;
	rev->dport = flow->lb_port;
	rev->proto = key->proto;
	rev->family = key->family;
}

/* Claims a source port towards the backend of the flow built in `s` (s->flow's backend and
 * address, s->reply's key, slot and client MAC filled in): a reverse-table entry of its own,
 * its key built in `s->rev`. Tries a few ports from the flow's hash on. */
static __always_inline bool claim_port(struct flow_scratch *s, __u32 hash, __u64 now)
{
	const struct xdp_lb_tuple *key = &s->reply.client;
	struct xdp_lb_tuple *rev = &s->rev;
	struct xdp_lb_counters *c = counters();
	struct xdp_lb_reply *owner;

	reverse_key(rev, key, &s->flow);
	for (__u32 i = 0; i < XDP_LB_PORT_PROBES; i++) {
		__u32 span = port_span ? port_span : 1;

		if (i && c)
			c->port_retries++;
		rev->dport = bpf_htons((__u16)(port_lo + (hash + i * 7919) % span));
		if (reply_put(rev, &s->reply, BPF_NOEXIST) == 0) {
			s->flow.lb_port = rev->dport;
			return true;
		}
		owner = reply_find(rev);
		if (owner && port_reusable(rev, owner, key, now) &&
		    reply_put(rev, &s->reply, BPF_ANY) == 0) {
			s->flow.lb_port = rev->dport;
			return true;
		}
	}
	return false;
}

/* The reply entry of the flow `key` -> `flow`, or NULL; `rev` holds its key (a caller short
 * of stack passes scratch memory). */
static __always_inline struct xdp_lb_reply *reply_of(struct xdp_lb_tuple *rev, const struct xdp_lb_tuple *key,
						     const struct xdp_lb_flow *flow)
{
	struct xdp_lb_reply *reply;

	reverse_key(rev, key, flow);
	reply = reply_find(rev);
	return reply && tuple_equal(&reply->client, key) ? reply : NULL;
}

/* reply_of with its key built in the per-CPU scratch: for the balancing path's rarer turns
 * (a rewritten list, a new connection on an old port, a client MAC that changed), whose frame
 * has no room for a tuple more (scripts/check-stack). */
static __always_inline struct xdp_lb_reply *flow_reply(const struct xdp_lb_tuple *key, const struct xdp_lb_flow *flow)
{
	struct flow_scratch *s;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&xdp_lb_new_flow, &zero);
	return s ? reply_of(&s->rev, key, flow) : NULL;
}

/* Drops the reverse entry of a flow that moves to another backend or port; its key is
 * built in `rev`. */
static __always_inline void release_port(struct xdp_lb_tuple *rev, const struct xdp_lb_tuple *key,
					 const struct xdp_lb_flow *flow)
{
	struct xdp_lb_reply *owner;

	reverse_key(rev, key, flow);
	owner = reply_find(rev);
	if (owner && tuple_equal(&owner->client, key))
		reply_remove(rev);
}

/* The addresses and ports a rewrite changes, in packet order: what the L4 checksum's
 * pseudo-header and port words cover. */
struct rewrite {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
};

/* Rewrites addresses, ports and MACs of the packet parsed into `pkt`, fixing the IPv4 header
 * and L4 checksums; the new source MAC is the one the packet was sent to (ours), the new
 * destination `dst_mac` (a 4-byte aligned field of a map value: xdp_lb.h). The old
 * words come from `pkt` and the packet, the new from `to`, and the ports are written and
 * summed as one word made in a register: no header word is read back after a narrower
 * write to it (a store-forwarding stall, measured on the known-flow path). */
static __always_inline bool rewrite_packet(struct xdp_md *ctx, const struct l4_packet *pkt, struct rewrite *to,
					   const __u8 *dst_mac)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 l3_off = pkt->l3_off;
	__u32 l4_off = pkt->l4_off;
	__u32 old_ports, new_ports;
	__u64 sum;
	void *l4;
	__sum16 *l4_check;

	/* the masks bound the offsets for the verifier; hide from the compiler that the
	 * caller's check makes them redundant, or it drops them */
	asm volatile("" : "+r"(l3_off), "+r"(l4_off));
	l3_off &= 0x3f;
	l4_off &= 0x1ff;
	l4 = data + l4_off;
	if ((void *)(eth + 1) > data_end)
		return false;
	/* the whole TCP header (parsed before) or UDP header; its checksum lies inside */
	if (pkt->proto == IPPROTO_TCP) {
		if (l4 + sizeof(struct tcphdr) > data_end)
			return false;
		l4_check = l4 + offsetof(struct tcphdr, check);
	} else {
		if (l4 + sizeof(struct udphdr) > data_end)
			return false;
		l4_check = l4 + offsetof(struct udphdr, check);
	}
	old_ports = *(__u32 *)l4;
	new_ports = ports_word(to->sport, to->dport);

	if (pkt->family == AF_INET) {
		struct iphdr *ip = data + l3_off;
		__be32 old_words[3] = { pkt->saddr[0], pkt->daddr[0], old_ports };
		__be32 new_words[3] = { to->src[0], to->dst[0], new_ports };

		if ((void *)(ip + 1) > data_end)
			return false;
		*(__u32 *)l4 = new_ports;
		ip->saddr = new_words[0];
		ip->daddr = new_words[1];
		ip->check = csum_replace(ip->check, old_words, new_words, 2);
		/* a UDP datagram without a checksum stays without */
		if (pkt->proto == IPPROTO_TCP || *l4_check) {
			__sum16 check = csum_replace(*l4_check, old_words, new_words, 3);

			if (pkt->proto == IPPROTO_UDP && !check)
				check = 0xffff;
			*l4_check = check;
		}
	} else {
		struct ipv6hdr *ip6 = data + l3_off;
		__sum16 check;

		if ((void *)(ip6 + 1) > data_end)
			return false;
		*(__u32 *)l4 = new_ports;
		__builtin_memcpy(&ip6->saddr, to->src, 16);
		__builtin_memcpy(&ip6->daddr, to->dst, 16);
		sum = csum_words(csum_start(*l4_check), pkt->saddr, to->src, 4);
		sum = csum_words(sum, pkt->daddr, to->dst, 4);
		check = csum_finish(csum_words(sum, &old_ports, &new_ports, 1));
		if (pkt->proto == IPPROTO_UDP && !check)
			check = 0xffff;
		*l4_check = check;
	}

	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	/* in a word and a half: dst_mac lies 4-byte aligned in its map value (asserted in xdp_lb.h) */
	*(__u32 *)eth->h_dest = *(const __u32 *)dst_mac;
	*(__u16 *)&eth->h_dest[4] = *(const __u16 *)&dst_mac[4];
	return true;
}

static __always_inline void count(__u32 slot, bool towards_backend, __u64 bytes)
{
	struct xdp_lb_stats *stats = bpf_map_lookup_elem(&xdp_lb_stats, &slot);

	if (!stats)
		return;
	if (towards_backend) {
		stats->packets_in++;
		stats->bytes_in += bytes;
	} else {
		stats->packets_out++;
		stats->bytes_out += bytes;
	}
}

static __always_inline void track_tcp(struct xdp_lb_flow *flow, __u8 flags, bool from_client)
{
	if (flags & TCP_FLAG_RST)
		flow->state |= XDP_LB_RST;
	if (flags & TCP_FLAG_FIN)
		flow->state |= from_client ? XDP_LB_FIN_CLIENT : XDP_LB_FIN_BACKEND;
}

/* Removes a flow and its reverse entry together (that entry's key built in `rev`). */
static __always_inline void evict(struct xdp_lb_tuple *rev, const struct xdp_lb_tuple *key,
				  const struct xdp_lb_flow *flow)
{
	struct xdp_lb_counters *c = counters();

	release_port(rev, key, flow);
	flow_remove(key);
	if (c)
		c->evicted++;
}

/* A slot of the flow clock for a new flow, from a few random ones: a free one at once, else
 * one whose flow finished or went idle, else the one of the oldest half-open flow seen
 * (evicted); never one of a live established flow. False: the table is (nearly) full of established flows. */
static __always_inline bool take_clock_slot(__u64 now, struct flow_scratch *s, __u32 *slot)
{
	__u32 size = clock_size ? clock_size : 1;
	struct xdp_lb_tuple *victim = &s->victim;
	struct xdp_lb_tuple *rev = &s->rev;
	__u32 fallback = ~0U;
	__u64 oldest = 0;
	struct xdp_lb_tuple *occupant;
	struct xdp_lb_reply *reply;
	struct xdp_lb_flow *flow;
	__u64 last_seen;

	for (int i = 0; i < XDP_LB_CLOCK_TRIES; i++) {
		__u32 at = bpf_get_prandom_u32() % size;

		occupant = bpf_map_lookup_elem(&xdp_lb_clock, &at);
		if (!occupant)
			continue;
		flow = occupant->family ? flow_find(occupant) : NULL;
		if (!flow || flow->clock_slot != at) {
			*slot = at;
			return true;
		}
		/* an established flow's backend side too: a stream of replies keeps it. Not a
		 * half-open one's (a flood's SYNs, answered): the lookup would slow every new flow
		 * under flood, and a backend resending its SYN-ACK keeps nothing alive */
		last_seen = flow->last_seen;
		if (flow->state & XDP_LB_ESTABLISHED) {
			reply = reply_of(rev, occupant, flow);
			if (reply)
				last_seen = later(last_seen, reply->last_seen);
		}
		if (flow_idle(flow, last_seen, occupant->proto, now)) {
			*victim = *occupant;
			evict(rev, victim, flow);
			*slot = at;
			return true;
		}
		/* of the half-open flows seen, the one quiet the longest */
		if (!(flow->state & XDP_LB_ESTABLISHED) && (fallback == ~0U || flow->last_seen < oldest)) {
			fallback = at;
			oldest = flow->last_seen;
		}
	}
	if (fallback == ~0U)
		return false;
	occupant = bpf_map_lookup_elem(&xdp_lb_clock, &fallback);
	if (!occupant)
		return false;
	*victim = *occupant;
	flow = flow_find(victim);
	if (flow && flow->clock_slot == fallback) {
		/* looked at a moment ago; a reply may have come in between */
		if (flow->state & XDP_LB_ESTABLISHED)
			return false;
		evict(rev, victim, flow);
	}
	*slot = fallback;
	return true;
}

/* Session affinity: the client's backend while its affinity lasts and it still takes new
 * flows (include/service.h's affinity_slot), else Maglev's choice (pick_slot), remembered
 * (affinity_remember). Written out here with every map key in a per-CPU scratch value: the
 * balancing path leaves a subprogram little stack (scripts/check-stack), and those helpers
 * keep their keys on it. */
static __noinline __u32 affinity_pick(const struct xdp_lb_tuple *key, const struct service_range *range,
				      __u64 now)
{
	struct xdp_lb_backend *backend;
	struct affinity_value *known;
	struct affinity_scratch *s;
	__u32 *weight, *size, *entry;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&xdp_lb_affinity_scratch, &zero);
	if (!s)
		return ~0U; /* never: a per-CPU array's only entry */
	s->seen.seen_ns = now;
	/* every byte written: the key has no padding */
	copy_addr(s->client.service.addr, key->dst);
	s->client.service.port = key->dport;
	s->client.service.family = key->family;
	s->client.service.proto = key->proto;
	copy_addr(s->client.client, key->src);
	s->hash = flow_hash(key);

	/* one pointer at a time: every value lives in the scratch entry */
	known = bpf_map_lookup_elem(&xdp_lb_affinity, &s->client);
	if (!known || s->seen.seen_ns - known->seen_ns > (__u64)range->affinity_s * 1000000000ULL)
		goto choose;
	s->at = known->slot;
	s->seen.backend = known->backend;
	/* refreshed now; a choice made below overwrites the entry anyway */
	known->seen_ns = s->seen.seen_ns;
	if (s->at - range->base >= range->count)
		goto choose;
	weight = bpf_map_lookup_elem(&xdp_lb_weights, &s->at);
	if (!weight)
		goto choose;
	s->end = *weight;
	s->prev = s->at - 1;
	s->before = 0;
	if (s->at > range->base) {
		weight = bpf_map_lookup_elem(&xdp_lb_weights, &s->prev);
		if (!weight)
			goto choose;
		s->before = *weight;
	}
	/* still usable (a weight of its own) and still that backend */
	if (s->end <= s->before)
		goto choose;
	backend = bpf_map_lookup_elem(&xdp_lb_backends, &s->at);
	if (backend && endpoint_equal(&backend->endpoint, &s->seen.backend))
		return s->at;
choose:
	s->ring = range->base * XDP_LB_RING_PER_SLOT;
	size = bpf_map_lookup_elem(&xdp_lb_rings, &s->ring);
	if (!size || !*size)
		return ~0U;
	s->ring = s->ring + 1 + s->hash % *size;
	entry = bpf_map_lookup_elem(&xdp_lb_rings, &s->ring);
	if (!entry || *entry >= range->count)
		return ~0U;
	s->seen.slot = range->base + *entry;
	backend = bpf_map_lookup_elem(&xdp_lb_backends, &s->seen.slot);
	if (backend) {
		s->seen.backend = backend->endpoint;
		bpf_map_update_elem(&xdp_lb_affinity, &s->client, &s->seen, BPF_ANY);
	}
	return s->seen.slot;
}

/* The two loops of a new flow, as global functions: the verifier checks each once, on its
 * own. Inlined, the 16 clock tries and the 32 port probes were checked again for every way a
 * packet reaches them (family, VLAN tags, TCP or UDP, a new or a moved flow), and the
 * verifiers of 6.1 and 5.10 ran out of their 1,000,000 instructions. So scalars in and out
 * (5.10's global functions take no pointers), their keys in the per-CPU scratch, and
 * frames of a few words: the balancing path leaves them 128 bytes (scripts/check-stack). */

/* A clock slot for a new flow (take_clock_slot()), or ~0 when the table is full of live
 * flows (counted). */
__noinline __u32 new_flow_clock_slot(__u64 now)
{
	struct xdp_lb_counters *c;
	struct flow_scratch *s;
	__u32 zero = 0;
	__u32 slot;

	s = bpf_map_lookup_elem(&xdp_lb_new_flow, &zero);
	if (!s)
		return ~0U; /* never: a per-CPU array's only entry */
	if (take_clock_slot(now, s, &slot))
		return slot;
	c = counters();
	if (c)
		c->table_full++;
	return ~0U;
}

/* A source port towards the backend of the flow built in the scratch, with its reverse
 * entry written (claim_port()); its port in s->flow.lb_port. False when none is free
 * (counted). */
__noinline int new_flow_port(__u32 hash, __u64 now)
{
	struct xdp_lb_counters *c;
	struct flow_scratch *s;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&xdp_lb_new_flow, &zero);
	if (!s)
		return false; /* never: a per-CPU array's only entry */
	if (claim_port(s, hash, now))
		return true;
	c = counters();
	if (c)
		c->no_port++;
	return false;
}

/* Starts a flow on a backend (or moves one whose backend left its service). */
static __always_inline struct xdp_lb_flow *open_flow(const struct xdp_lb_tuple *key, const struct service_range *range,
						     struct xdp_lb_flow *old, const __u8 *client_mac, __u64 now)
{
	struct xdp_lb_counters *c = counters();
	struct service_endpoint previous = {};
	struct xdp_lb_backend *backend;
	struct xdp_lb_tuple *clock_entry;
	struct xdp_lb_stats *stats;
	struct flow_scratch *scratch;
	struct xdp_lb_flow *flow;
	__u32 hash = flow_hash(key);
	__u32 slot, clock_slot;
	__u32 zero = 0;

	if (!old && flood_over_rate(&xdp_lb_flood, flood_rate, now)) {
		if (!flood_asked_again(&xdp_lb_flood_seen, hash, now)) {
			if (c)
				c->flood_dropped++;
			return NULL;
		}
		if (c)
			c->flood_admitted++;
	}
	slot = range->flags & SERVICE_AFFINITY ? affinity_pick(key, range, now) : pick_slot(range, hash);
	backend = bpf_map_lookup_elem(&xdp_lb_backends, &slot);
	if (!backend)
		return NULL;
	scratch = bpf_map_lookup_elem(&xdp_lb_new_flow, &zero);
	if (!scratch)
		return NULL; /* never: a per-CPU array's only entry */
	flow = &scratch->flow;
	if (old) {
		previous = old->backend;
		clock_slot = old->clock_slot;
		release_port(&scratch->rev, key, old);
	} else {
		clock_slot = new_flow_clock_slot(now);
		if (clock_slot == ~0U)
			return NULL;
	}
	__builtin_memset(flow, 0, sizeof(*flow));
	flow->backend = backend->endpoint;
	copy_addr(flow->lb_addr, backend->lb_addr);
	flow->last_seen = now;
	flow->slot = slot;
	flow->clock_slot = clock_slot;
	__builtin_memcpy(flow->client_mac, client_mac, ETH_ALEN);
	__builtin_memset(&scratch->reply, 0, sizeof(scratch->reply));
	scratch->reply.client = *key;
	scratch->reply.last_seen = now;
	scratch->reply.slot = slot;
	__builtin_memcpy(scratch->reply.client_mac, client_mac, ETH_ALEN);
	if (!new_flow_port(hash, now)) {
		if (old)
			flow_remove(key);
		return NULL;
	}
	if (flow_put(key, flow, BPF_ANY)) {
		if (c)
			c->flow_failed++;
		/* no flow without its reverse entry, and no reverse entry without its flow */
		release_port(&scratch->rev, key, flow);
		if (old)
			flow_remove(key);
		return NULL;
	}
	clock_entry = bpf_map_lookup_elem(&xdp_lb_clock, &clock_slot);
	if (clock_entry)
		*clock_entry = *key;
	if (c) {
		if (old)
			c->rerouted++;
		else
			c->new_flows++;
	}
	if (events_level >= XDP_LB_EVENTS_FLOWS)
		emit(old ? XDP_LB_EVENT_REROUTED : XDP_LB_EVENT_NEW_FLOW, key, flow, old ? &previous : NULL, 0);
	stats = bpf_map_lookup_elem(&xdp_lb_stats, &slot);
	if (stats)
		stats->new_flows++;
	return flow_find(key);
}

/* The packet's tuple (the flow table's key), written in 8-byte stores: the hash table hashes
 * and compares its keys 8 bytes at a time, and a load that spans two narrower stores (the
 * parser's, or a field-by-field copy's) waits for both to reach the cache instead of taking
 * its bytes from them: a stall measured on every packet of the known-flow path. */
static __always_inline void tuple_of(struct xdp_lb_tuple *tuple, const struct l4_packet *pkt)
{
	__u64 *words = (__u64 *)tuple;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	__u32 rest = (__u32)pkt->proto | (__u32)pkt->family << 8;
#else
	__u32 rest = (__u32)pkt->proto << 24 | (__u32)pkt->family << 16;
#endif
	words[0] = words_pair(pkt->saddr[0], pkt->saddr[1]);
	words[1] = words_pair(pkt->saddr[2], pkt->saddr[3]);
	words[2] = words_pair(pkt->daddr[0], pkt->daddr[1]);
	words[3] = words_pair(pkt->daddr[2], pkt->daddr[3]);
	words[4] = words_pair(ports_word(pkt->sport, pkt->dport), rest);
}

/* A new flow to a service without a usable backend (or a flow whose backend left it): a TCP
 * SYN gets an RST, a UDP datagram an ICMP port unreachable, back the way it came
 * (include/reject.h); anything else, or what cannot be answered, is dropped. */
/* The packet's bounds, read afresh: the compiler must not reuse a ctx field address it
 * computed before a helper moved them (the verifier refuses a dereference of ctx + off). */
static __always_inline void *xdp_data(struct xdp_md *ctx)
{
	asm volatile("" : "+r"(ctx));
	return (void *)(long)ctx->data;
}

static __always_inline void *xdp_data_end(struct xdp_md *ctx)
{
	asm volatile("" : "+r"(ctx));
	return (void *)(long)ctx->data_end;
}

/* A subprogram with its state in a map: the balancing path already uses most of the stack. */
static __noinline int refuse(struct xdp_md *ctx, const struct l4_packet *pkt)
{
	struct xdp_lb_counters *c;
	struct reject_info *info;
	__u32 zero = 0;
	int delta;

	if (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return XDP_DROP;
	c = counters();
	if (c)
		c->refused++;
	info = bpf_map_lookup_elem(&xdp_lb_reject, &zero);
	if (!info)
		return XDP_DROP;
	if (!reject_read(xdp_data(ctx), xdp_data_end(ctx), pkt, info))
		return XDP_DROP;
	if (info->grow && bpf_xdp_adjust_head(ctx, -(int)info->grow))
		return XDP_DROP;
	delta = (int)info->len - (int)(xdp_data_end(ctx) - xdp_data(ctx));
	if (delta && bpf_xdp_adjust_tail(ctx, delta))
		return XDP_DROP;
	if (!reject_write(xdp_data(ctx), xdp_data_end(ctx), info))
		return XDP_DROP;
	return XDP_TX;
}

/* Client -> VIP: on to the flow's backend. With `range` NULL, `flow` and `backend` are a
 * flow checked in this epoch and its backend; else `range` is the service's, and `flow` its
 * flow if it has one, to be checked (and moved, when its backend left) or opened. */
static __always_inline int to_backend(struct xdp_md *ctx, const struct l4_packet *pkt,
				      const struct xdp_lb_tuple *key, const struct service_range *range,
				      struct xdp_lb_flow *flow, struct xdp_lb_backend *backend, __u32 epoch,
				      const bool compat)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	__u64 now = now_ns(compat);
	struct ethhdr *eth = data;
	struct rewrite to = {};
	struct xdp_lb_reply *reply;
	__u8 client_mac[ETH_ALEN];
	__u32 slot;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(client_mac, eth->h_source, ETH_ALEN);
	if (range) {
		backend = NULL;
		if (flow) {
			slot = flow->slot;
			backend = current_backend(range, flow, compat);
			if (!backend) {
				flow = open_flow(key, range, flow, client_mac, now);
			} else if (flow->slot != slot) {
				/* the list was rewritten under the flow: its replies count here too */
				reply = flow_reply(key, flow);
				if (reply)
					reply->slot = flow->slot;
			}
		} else if (range->weight) {
			flow = open_flow(key, range, NULL, client_mac, now);
		}
		if (!flow)
			return range->weight ? XDP_DROP : refuse(ctx, pkt);
		if (!backend) {
			backend = bpf_map_lookup_elem(&xdp_lb_backends, &flow->slot);
			if (!backend)
				return XDP_DROP;
		}
		if (flow->epoch != epoch)
			flow->epoch = epoch;
	}
	if (pkt->proto == IPPROTO_TCP) {
		/* a new connection on the port of a closed one starts clean, its reply entry too
		 * (which tells the next reply to say REPLIED again) */
		if ((pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN && flow->state) {
			flow->state = 0;
			reply = flow_reply(key, flow);
			if (reply)
				reply->state = 0;
		}
		track_tcp(flow, pkt->tcp_flags, true);
	}
	/* the client answered the backend (the handshake's ACK, a second datagram): a spoofed
	 * source never sees the backend's reply, so never gets here */
	if ((flow->state & (XDP_LB_REPLIED | XDP_LB_ESTABLISHED)) == XDP_LB_REPLIED &&
	    (pkt->proto == IPPROTO_UDP || (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_ACK))
		flow->state |= XDP_LB_ESTABLISHED;
	/* written only when changed: a flow's cache line stays clean between clock ticks */
	if (flow->last_seen != now)
		flow->last_seen = now;
	if (*(__u32 *)flow->client_mac != *(__u32 *)client_mac ||
	    *(__u16 *)&flow->client_mac[4] != *(__u16 *)&client_mac[4]) {
		__builtin_memcpy(flow->client_mac, client_mac, ETH_ALEN);
		reply = flow_reply(key, flow);
		if (reply)
			__builtin_memcpy(reply->client_mac, client_mac, ETH_ALEN);
	}
	copy_addr(to.src, flow->lb_addr);
	copy_addr(to.dst, flow->backend.addr);
	to.sport = flow->lb_port;
	to.dport = flow->backend.port;
	count(flow->slot, true, len);
	if (events_level >= XDP_LB_EVENTS_TRACE)
		emit(XDP_LB_EVENT_TRACE_IN, key, flow, NULL, len);
	if (!rewrite_packet(ctx, pkt, &to, backend->mac))
		return XDP_PASS;
	return XDP_TX;
}

#define NOT_A_REPLY -1
#define NOT_L4 -2

/* Backend -> this node: a reply of one of our flows goes back to its client, by its reply
 * entry alone. `rev`: the packet's tuple (backend -> this node:lb_port). NOT_A_REPLY when no
 * flow of ours owns it. */
static __always_inline int to_client(struct xdp_md *ctx, const struct l4_packet *pkt,
				      const struct xdp_lb_tuple *rev, const bool compat)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct xdp_lb_backend *backend;
	struct xdp_lb_counters *c;
	struct xdp_lb_reply *reply;
	struct xdp_lb_flow *flow;
	__u64 now;
	struct rewrite to = {};

	reply = reply_find(rev);
	if (!reply)
		return NOT_A_REPLY;
	/* what the flow's state needs of this side, from the few packets that change it: the
	 * backend's first answer (then the client's next packet establishes the flow), a FIN,
	 * an RST. The flow table is looked at for those only. */
	if (!(reply->state & XDP_LB_REPLIED) ||
	    (pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))) {
		flow = flow_find(&reply->client);
		if (!flow || !flow_owns(flow, rev)) {
			c = counters();
			if (c)
				c->stale_replies++;
			return NOT_A_REPLY;
		}
		flow->state |= XDP_LB_REPLIED;
		if (pkt->proto == IPPROTO_TCP)
			track_tcp(flow, pkt->tcp_flags, false);
		reply->state |= XDP_LB_REPLIED;
	}
	now = now_ns(compat);
	if (reply->last_seen != now)
		reply->last_seen = now;
	copy_addr(to.src, reply->client.dst);
	copy_addr(to.dst, reply->client.src);
	to.sport = reply->client.dport;
	to.dport = reply->client.sport;
	/* still the backend of that slot (a rewritten list may have moved it) */
	backend = bpf_map_lookup_elem(&xdp_lb_backends, &reply->slot);
	if (backend && backend->endpoint.port == rev->sport && backend->endpoint.addr[0] == rev->src[0] &&
	    backend->endpoint.addr[1] == rev->src[1] && backend->endpoint.addr[2] == rev->src[2] &&
	    backend->endpoint.addr[3] == rev->src[3])
		count(reply->slot, false, len);
	else if ((c = counters()))
		c->unattributed++;
	if (events_level >= XDP_LB_EVENTS_TRACE) {
		flow = flow_find(&reply->client);
		if (flow)
			emit(XDP_LB_EVENT_TRACE_OUT, &reply->client, flow, NULL, len);
	}
	if (!rewrite_packet(ctx, pkt, &to, reply->client_mac))
		return XDP_PASS;
	return XDP_TX;
}

/* ICMP errors of our flows. An error about the backend leg (from the backend or a router
 * between us, to this node's address, quoting this node:lb_port -> backend) goes back to the
 * client as an error about its client -> VIP packet, from the VIP as conntrack's full NAT
 * does it, out the way replies go. An error about the client leg (to the VIP, quoting
 * VIP -> client) goes on to the backend as an error about its reply, from this node's
 * address: the backend's TCP then learns the client path's MTU. Anything else passes. */
static __always_inline int icmp_error_of_flow(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct xdp_lb_backend *backend;
	struct icmp_error_rewrite *to;
	struct xdp_lb_reply *owner;
	struct xdp_lb_icmp_scratch *s;
	struct xdp_lb_counters *c;
	struct xdp_lb_flow *flow;
	struct icmp_error *err;
	struct ethhdr *eth;
	const __u8 *dst_mac;
	__u32 zero = 0;

	s = bpf_map_lookup_elem(&xdp_lb_icmp_scratch, &zero);
	if (!s)
		return XDP_PASS;
	err = &s->err;
	to = &s->to; /* every field written below, in either leg */
	if (!parse_icmp_error(data, data_end, err))
		return XDP_PASS;

	/* the quote swapped: a reverse entry's key if the error is about the backend leg (the
	 * quote is this node:lb_port -> backend), else a flow's key (the quote is VIP -> client) */
	__builtin_memset(&s->quote, 0, sizeof(s->quote));
	copy_addr(s->quote.src, err->inner_dst);
	copy_addr(s->quote.dst, err->inner_src);
	s->quote.sport = err->inner_dport;
	s->quote.dport = err->inner_sport;
	s->quote.proto = err->inner_proto;
	s->quote.family = err->family;
	owner = reply_find(&s->quote);
	if (owner) {
		s->key = owner->client;
		flow = flow_find(&s->key);
		if (!flow || !flow_owns(flow, &s->quote))
			return XDP_PASS;
		copy_addr(to->outer_src, s->key.dst);
		copy_addr(to->outer_dst, s->key.src);
		copy_addr(to->inner_src, s->key.src);
		copy_addr(to->inner_dst, s->key.dst);
		to->inner_sport = s->key.sport;
		to->inner_dport = s->key.dport;
		dst_mac = flow->client_mac;
		c = counters();
		if (c)
			c->icmp_to_client++;
	} else {
		flow = flow_find(&s->quote);
		if (!flow)
			return XDP_PASS;
		backend = bpf_map_lookup_elem(&xdp_lb_backends, &flow->slot);
		if (!backend || !endpoint_equal(&backend->endpoint, &flow->backend))
			return XDP_PASS;
		copy_addr(to->outer_src, flow->lb_addr);
		copy_addr(to->outer_dst, flow->backend.addr);
		copy_addr(to->inner_src, flow->backend.addr);
		copy_addr(to->inner_dst, flow->lb_addr);
		to->inner_sport = flow->backend.port;
		to->inner_dport = flow->lb_port;
		dst_mac = backend->mac;
		c = counters();
		if (c)
			c->icmp_to_backend++;
	}
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	if (!rewrite_icmp_error(data, data_end, err, to))
		return XDP_PASS;
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, dst_mac, ETH_ALEN);
	return XDP_TX;
}

/* The packet's way, in as few hash lookups as its kind allows: a reply (its destination
 * port one of ours) by its reverse entry; a flow's packet by its flow alone while no service
 * changed since it was checked; the rest by the service lookup. */
static __always_inline int balance(struct xdp_md *ctx, const bool compat)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct service_endpoint vip = {};
	struct xdp_lb_backend *backend;
	struct service_range *range;
	struct xdp_lb_tuple tuple;
	struct xdp_lb_flow *flow;
	struct l4_packet pkt;
	__u32 epoch;
	bool ours;
	int verdict;

	/* fragments are not balanced: later ones carry no ports to find their flow by */
	if (!parse_l4_packet(data, data_end, &pkt))
		return NOT_L4;
	if (pkt.fragment || pkt.l4_off > 0x1ff - 20)
		return XDP_PASS;
	tuple_of(&tuple, &pkt);
	/* a port we hand out: most likely a backend's reply. A live reverse entry is one for
	 * certain, whatever else the tuple matches: the backend's own stack holds that
	 * connection (or UDP socket) with us and can hold no other of that tuple. */
	ours = (__u32)(__u16)(bpf_ntohs(pkt.dport) - port_lo) < (__u32)port_span;
	if (ours) {
		verdict = to_client(ctx, &pkt, &tuple, compat);
		if (verdict != NOT_A_REPLY)
			return verdict;
	}
	/* read before the service lookup: a change in between is seen at the next packet */
	epoch = services_epoch;
	flow = flow_find(&tuple);
	if (flow && flow->epoch == epoch && epoch) {
		/* the backend at its slot is still the one: only a change rewrites a slot */
		backend = bpf_map_lookup_elem(&xdp_lb_backends, &flow->slot);
		if (backend && backend_unchanged(backend, flow))
			return to_backend(ctx, &pkt, &tuple, NULL, flow, backend, epoch, compat);
	}
	copy_addr(vip.addr, pkt.daddr);
	vip.port = pkt.dport;
	vip.family = pkt.family;
	vip.proto = pkt.proto;
	range = bpf_map_lookup_elem(&xdp_lb_services, &vip);
	if (range)
		return to_backend(ctx, &pkt, &tuple, range, flow, NULL, epoch, compat);
	/* a reply on a port outside today's range: of flows a run with other --ports made */
	if (!ours) {
		verdict = to_client(ctx, &pkt, &tuple, compat);
		if (verdict != NOT_A_REPLY)
			return verdict;
	}
	return XDP_PASS;
}

/* The programs: the balancing path in their own frame (a call and its return cost about 8 ns
 * a packet on hosts with return thunks, a twelfth of a known flow's), the ICMP path a
 * subprogram beside it. Kernels before 6.11 (6.1, 5.10) add up the frames of a call chain,
 * each rounded up to 32 bytes, against the 512 bytes of stack: the balancing path (about 300
 * bytes) leaves the ICMP path and the subprograms it calls about 200 (the ICMP path keeps its
 * structs in a per-CPU map for that; scripts/check-stack -v prints every chain). xdp_lb_compat
 * holds no bpf_loop (5.10 refuses a program with its callback in it, even where it is never
 * called). */
static __noinline int icmp_error(struct xdp_md *ctx)
{
	return icmp_error_of_flow(ctx);
}

SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	int verdict = balance(ctx, false);

	return verdict == NOT_L4 ? icmp_error(ctx) : verdict;
}

/* The same for kernels without bpf_loop (before 5.17); user space loads one of the two. */
SEC("xdp")
int xdp_lb_compat(struct xdp_md *ctx)
{
	int verdict = balance(ctx, true);

	return verdict == NOT_L4 ? icmp_error(ctx) : verdict;
}

char LICENSE[] SEC("license") = "GPL";
