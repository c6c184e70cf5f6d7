// SPDX-License-Identifier: GPL-2.0
/* clusterip: socket-level service load balancing. connect() and unconnected sendmsg() to a
 * service VIP:PORT go to one of its backends instead, chosen at random per connection (per
 * datagram for unconnected UDP); recvmsg() and getpeername() show the VIP again. No packet is
 * ever NATed: the socket itself talks to the backend. */
#include "common.h"
#include <bpf/bpf_core_read.h>
#include "clusterip.h"

/* VIP:PORT -> backend slot range; written by user space. Not preallocated, so a replaced
 * value is freed only after every program that may still read it has finished. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CLUSTERIP_MAX_SERVICES);
	__type(key, struct service_endpoint);
	__type(value, struct service_range);
} clusterip_services SEC(".maps");

/* slot -> backend; a service owns a contiguous range. The slot arrays are mmapable: user
 * space reads and writes 100,000 slots as memory rather than by system calls. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, CLUSTERIP_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct service_endpoint);
} clusterip_backends SEC(".maps");

/* (socket, backend) -> VIP, for the replies and getpeername of translated sockets. LRU:
 * entries of closed sockets age out. */
CLUSTERIP_REVERSE_MAP;

/* slot -> cumulative weight of the service's usable backends (include/service.h) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, CLUSTERIP_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} clusterip_weights SEC(".maps");

/* (service, client network namespace) -> its backend, for session affinity */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_MAX_ENTRIES);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
} clusterip_affinity SEC(".maps");

/* key 0: events of no backend slot, per CPU */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct clusterip_counters);
} clusterip_counters SEC(".maps");

/* slot -> how often that backend was chosen. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, CLUSTERIP_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct clusterip_stats);
} clusterip_stats SEC(".maps");

static __always_inline struct clusterip_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&clusterip_counters, &zero);
}

static __always_inline bool is_tcp_or_udp(const struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP;
}

enum pick {
	NO_SERVICE, /* not a VIP:PORT of ours: leave the socket alone */
	PICKED,
	REFUSED, /* a service without a usable backend */
};

/* A backend of the service at `vip` for this socket's protocol: the client network
 * namespace's backend while its affinity lasts, else a random one by weight. */
static __always_inline enum pick pick_backend(struct bpf_sock_addr *ctx, struct service_endpoint *vip,
					      struct service_endpoint *backend, bool datagram)
{
	struct service_range *service, range;
	struct service_endpoint *found;
	struct clusterip_stats *stats;
	struct affinity_key client;
	__u64 now = 0, cookie;
	__u32 slot;
	int remembered = -1;

	vip->proto = ctx->protocol;
	service = bpf_map_lookup_elem(&clusterip_services, vip);
	vip->proto = 0;
	if (!service)
		return NO_SERVICE;
	range = *service;
	if (range.count > CLUSTERIP_MAX_BACKENDS_PER_SERVICE)
		return NO_SERVICE;
	if (range.flags & SERVICE_AFFINITY) {
		__builtin_memset(&client, 0, sizeof(client));
		client.service = *vip;
		client.service.proto = ctx->protocol;
		cookie = bpf_get_netns_cookie(ctx);
		__builtin_memcpy(client.client, &cookie, sizeof(cookie));
		now = bpf_ktime_get_ns();
		remembered = affinity_slot(&clusterip_affinity, &clusterip_backends, &clusterip_weights, &range,
					   &client, now);
	}
	if (remembered >= 0)
		slot = remembered;
	else if (pick_weighted_slot(&clusterip_weights, &range, bpf_get_prandom_u32(), &slot))
		return REFUSED;
	found = bpf_map_lookup_elem(&clusterip_backends, &slot);
	if (!found || found->family != vip->family)
		return NO_SERVICE;
	*backend = *found;
	if (remembered < 0)
		affinity_remember(&clusterip_affinity, &range, &client, backend, slot, now);
	stats = bpf_map_lookup_elem(&clusterip_stats, &slot);
	if (stats) {
		if (datagram)
			__sync_fetch_and_add(&stats->datagrams, 1);
		else
			__sync_fetch_and_add(&stats->connects, 1);
	}
	return PICKED;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct service_endpoint *backend,
				     const struct service_endpoint *vip)
{
	struct clusterip_reverse_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.backend = *backend;
	bpf_map_update_elem(&clusterip_reverse, &key, vip, BPF_ANY);
}

static __always_inline const struct service_endpoint *recall(struct bpf_sock_addr *ctx,
							      const struct service_endpoint *backend)
{
	struct clusterip_reverse_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.backend = *backend;
	return bpf_map_lookup_elem(&clusterip_reverse, &key);
}

/* The IPv4 destination (or source, on the way back) in the context as an endpoint. */
static __always_inline void read4(const struct bpf_sock_addr *ctx, struct service_endpoint *ep)
{
	__builtin_memset(ep, 0, sizeof(*ep));
	ep->addr[0] = ctx->user_ip4;
	ep->port = (__be16)ctx->user_port;
	ep->family = AF_INET;
}

static __always_inline void write4(struct bpf_sock_addr *ctx, const struct service_endpoint *ep)
{
	ctx->user_ip4 = ep->addr[0];
	ctx->user_port = ep->port;
}

/* The IPv6 address in the context; an IPv4-mapped one (::ffff:a.b.c.d, an IPv4 peer of a
 * dual-stack socket) becomes an AF_INET endpoint. */
static __always_inline void read6(const struct bpf_sock_addr *ctx, struct service_endpoint *ep)
{
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];

	__builtin_memset(ep, 0, sizeof(*ep));
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
		ep->addr[0] = a3;
		ep->family = AF_INET;
	} else {
		ep->addr[0] = a0;
		ep->addr[1] = a1;
		ep->addr[2] = a2;
		ep->addr[3] = a3;
		ep->family = AF_INET6;
	}
	ep->port = (__be16)ctx->user_port;
}

static __always_inline void write6(struct bpf_sock_addr *ctx, const struct service_endpoint *ep)
{
	if (ep->family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = ep->addr[0];
	} else {
		ctx->user_ip6[0] = ep->addr[0];
		ctx->user_ip6[1] = ep->addr[1];
		ctx->user_ip6[2] = ep->addr[2];
		ctx->user_ip6[3] = ep->addr[3];
	}
	ctx->user_port = ep->port;
}

/* A refused connect() or sendmsg() fails with ECONNREFUSED where the kernel lets the
 * program say so (bpf_set_retval, 5.18), EPERM before: either at once, no packet sent. */
#define ECONNREFUSED 111

static __always_inline int refuse(void)
{
	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_set_retval))
		bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* Destination VIP -> backend, for connect() and unconnected sendmsg(): the hook's verdict. */
static __always_inline int forward(struct bpf_sock_addr *ctx, bool v6, bool datagram)
{
	struct service_endpoint vip, backend;
	struct clusterip_counters *count;

	if (!is_tcp_or_udp(ctx))
		return 1;
	if (v6)
		read6(ctx, &vip);
	else
		read4(ctx, &vip);
	switch (pick_backend(ctx, &vip, &backend, datagram)) {
	case NO_SERVICE:
		return 1;
	case REFUSED:
		count = counters();
		if (count)
			count->refused++;
		return refuse();
	case PICKED:
		break;
	}
	if (v6)
		write6(ctx, &backend);
	else
		write4(ctx, &backend);
	remember(ctx, &backend, &vip);
	return 1;
}

/* Backend -> VIP for a socket we translated, for recvmsg() and getpeername(). */
static __always_inline void reverse(struct bpf_sock_addr *ctx, bool v6)
{
	const struct service_endpoint *vip;
	struct service_endpoint peer;

	if (v6)
		read6(ctx, &peer);
	else
		read4(ctx, &peer);
	vip = recall(ctx, &peer);
	if (!vip || vip->family != peer.family)
		return;
	if (v6)
		write6(ctx, vip);
	else
		write4(ctx, vip);
}

/* Every hook allows the operation (1), rewriting the address, unless the service refuses. */
SEC("cgroup/connect4")
int cip_connect4(struct bpf_sock_addr *ctx)
{
	return forward(ctx, false, false);
}

SEC("cgroup/connect6")
int cip_connect6(struct bpf_sock_addr *ctx)
{
	return forward(ctx, true, false);
}

SEC("cgroup/sendmsg4")
int cip_sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward(ctx, false, true);
}

SEC("cgroup/sendmsg6")
int cip_sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward(ctx, true, true);
}

SEC("cgroup/recvmsg4")
int cip_recvmsg4(struct bpf_sock_addr *ctx)
{
	reverse(ctx, false);
	return 1;
}

SEC("cgroup/recvmsg6")
int cip_recvmsg6(struct bpf_sock_addr *ctx)
{
	reverse(ctx, true);
	return 1;
}

SEC("cgroup/getpeername4")
int cip_getpeer4(struct bpf_sock_addr *ctx)
{
	reverse(ctx, false);
	return 1;
}

SEC("cgroup/getpeername6")
int cip_getpeer6(struct bpf_sock_addr *ctx)
{
	reverse(ctx, true);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
