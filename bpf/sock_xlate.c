// SPDX-License-Identifier: GPL-2.0
/* clusterip: socket-level service load balancing. connect() and unconnected sendmsg() to a
 * service VIP:PORT go to one of its backends instead, chosen at random per connection (per
 * datagram for unconnected UDP); recvmsg() and getpeername() show the VIP again. No packet is
 * ever NATed: the socket itself talks to the backend. */
#include "common.h"
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

/* slot -> backend; a service owns a contiguous range. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CLUSTERIP_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct service_endpoint);
} clusterip_backends SEC(".maps");

/* (socket, backend) -> VIP, for the replies and getpeername of translated sockets. LRU:
 * entries of closed sockets age out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CLUSTERIP_MAX_REVERSE);
	__type(key, struct clusterip_reverse_key);
	__type(value, struct service_endpoint);
} clusterip_reverse SEC(".maps");

/* slot -> how often that backend was chosen. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CLUSTERIP_BACKEND_SLOTS);
	__type(key, __u32);
	__type(value, struct clusterip_stats);
} clusterip_stats SEC(".maps");

static __always_inline bool is_tcp_or_udp(const struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP;
}

/* A random backend of the service at `vip`; false when `vip` is no service. */
static __always_inline bool pick_backend(const struct service_endpoint *vip,
					 struct service_endpoint *backend, bool datagram)
{
	struct service_range *service, range;
	struct service_endpoint *found;
	struct clusterip_stats *stats;
	__u32 slot;

	service = bpf_map_lookup_elem(&clusterip_services, vip);
	if (!service)
		return false;
	range = *service;
	if (range.count == 0 || range.count > CLUSTERIP_MAX_BACKENDS_PER_SERVICE)
		return false;
	slot = range.base + bpf_get_prandom_u32() % range.count;
	found = bpf_map_lookup_elem(&clusterip_backends, &slot);
	if (!found || found->family != vip->family)
		return false;
	*backend = *found;
	stats = bpf_map_lookup_elem(&clusterip_stats, &slot);
	if (stats) {
		if (datagram)
			__sync_fetch_and_add(&stats->datagrams, 1);
		else
			__sync_fetch_and_add(&stats->connects, 1);
	}
	return true;
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

/* Destination VIP -> backend, for connect() and unconnected sendmsg(). */
static __always_inline void forward(struct bpf_sock_addr *ctx, bool v6, bool datagram)
{
	struct service_endpoint vip, backend;

	if (!is_tcp_or_udp(ctx))
		return;
	if (v6)
		read6(ctx, &vip);
	else
		read4(ctx, &vip);
	if (!pick_backend(&vip, &backend, datagram))
		return;
	if (v6)
		write6(ctx, &backend);
	else
		write4(ctx, &backend);
	remember(ctx, &backend, &vip);
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

/* Every hook allows the operation (1); it only rewrites the address. */
SEC("cgroup/connect4")
int cip_connect4(struct bpf_sock_addr *ctx)
{
	forward(ctx, false, false);
	return 1;
}

SEC("cgroup/connect6")
int cip_connect6(struct bpf_sock_addr *ctx)
{
	forward(ctx, true, false);
	return 1;
}

SEC("cgroup/sendmsg4")
int cip_sendmsg4(struct bpf_sock_addr *ctx)
{
	forward(ctx, false, true);
	return 1;
}

SEC("cgroup/sendmsg6")
int cip_sendmsg6(struct bpf_sock_addr *ctx)
{
	forward(ctx, true, true);
	return 1;
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
