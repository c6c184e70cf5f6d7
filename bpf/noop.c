// SPDX-License-Identifier: GPL-2.0
/* Do-nothing programs of each hook: the baseline that per-packet benchmarks compare against. */
#include "common.h"

SEC("tc")
int noop_tc(struct __sk_buff *skb)
{
	return TC_PASS_ON;
}

SEC("xdp")
int noop_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* The least an XDP load balancer does: send the frame back out with its MACs swapped. The
 * baseline of xdp-lb's per-packet cost. */
SEC("xdp")
int xdp_mac_swap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 mac[6];

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(mac, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, mac, 6);
	return XDP_TX;
}

/* cgroup sock_addr hooks: let the call go on untouched */
SEC("cgroup/connect4")
int noop_connect4(struct bpf_sock_addr *ctx)
{
	return 1;
}

SEC("cgroup/sendmsg4")
int noop_sendmsg4(struct bpf_sock_addr *ctx)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
